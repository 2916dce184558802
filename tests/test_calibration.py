import pytest
import torch

from hf_blockcbo.data import CalibrationSet
from hf_blockcbo.errors import BlockCBOError
from hf_blockcbo.hessian.gradients import compute_gate_gradients, per_sample_loss
from hf_blockcbo.surgery.gates import BlockGates


def _padded_set(seed=0, m=7, width=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (m, width), generator=g)
    mask = torch.ones_like(ids)
    for i, length in enumerate([12, 5, 9, 12, 2, 7, 11][:m]):
        mask[i, length:] = 0
        ids[i, length:] = 0
    return CalibrationSet(ids, mask, source="test")


def _one_sample_at_a_time(model, calibration, gate):
    """The paper code's method: a scalar α vector, one sample per forward/backward."""
    rows = []
    for i in range(len(calibration)):
        length = int(calibration.attention_mask[i].sum())
        ids = calibration.input_ids[i : i + 1, :length]
        with BlockGates(model, gate=gate) as gates:
            alpha = torch.ones(gates.num_blocks, requires_grad=True)
            gates.set(alpha)
            logits = model(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
            loss.backward()
        rows.append(alpha.grad.clone())
    return torch.stack(rows)


@pytest.mark.parametrize("gate", ["branch", "layer"])
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
def test_batched_gradients_equal_the_per_sample_loop(fixture, gate, request):
    model = request.getfixturevalue(fixture)
    calibration = _padded_set()
    A, losses = compute_gate_gradients(model, calibration, batch_size=3, gate=gate, progress=False)
    expected = _one_sample_at_a_time(model, calibration, gate)
    assert A.shape == (7, 6) and A.dtype == torch.float32
    torch.testing.assert_close(A, expected, rtol=1e-4, atol=1e-5)
    assert losses.shape == (7,) and bool(torch.isfinite(losses).all())


def test_weights_stay_frozen_and_untouched(tiny_llama):
    before = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    tiny_llama.train()
    compute_gate_gradients(tiny_llama, _padded_set(), batch_size=4, progress=False)
    assert tiny_llama.training, "train/eval mode is restored"
    for name, param in tiny_llama.named_parameters():
        assert param.grad is None, f"{name} got a weight gradient"
        assert param.requires_grad
        assert torch.equal(param, before[name])


def test_per_sample_loss_ignores_padding():
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    losses = per_sample_loss(logits, ids, mask)
    full = torch.nn.functional.cross_entropy(logits[1, :2], ids[1, 1:3])
    torch.testing.assert_close(losses[1], full)
    with pytest.raises(BlockCBOError, match="no target token"):
        per_sample_loss(logits, ids, torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]))


def test_nan_gradients_name_the_block_and_sample(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[3].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(BlockCBOError, match=r"sample 0 at block \d+"):
        compute_gate_gradients(tiny_llama, _padded_set(), batch_size=4, progress=False)


def test_empty_calibration_is_refused(tiny_llama):
    empty = CalibrationSet(torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4, dtype=torch.long), "empty")
    with pytest.raises(BlockCBOError, match="empty"):
        compute_gate_gradients(tiny_llama, empty, progress=False)
