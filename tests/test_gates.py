import pytest
import torch

from hf_blockcbo.errors import BlockCBOError
from hf_blockcbo.surgery.architectures import get_layers
from hf_blockcbo.surgery.gates import BlockGates
from hf_blockcbo.surgery.removal import remove_blocks


IDS = torch.tensor([[5, 17, 33, 2, 9, 41, 100, 7], [3, 3, 8, 12, 200, 6, 1, 90]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
@pytest.mark.parametrize("gate", ["branch", "layer"])
def test_alpha_one_is_bit_exact(fixture, gate, request):
    model = request.getfixturevalue(fixture)
    reference = _logits(model)
    with BlockGates(model, gate=gate) as gates:
        gates.set(torch.ones(gates.num_blocks))
        assert torch.equal(_logits(model), reference)
        gates.set(torch.ones(2, gates.num_blocks))  # per-sample form
        assert torch.equal(_logits(model), reference)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
@pytest.mark.parametrize("gate", ["branch", "layer"])
def test_alpha_zero_equals_removed_block(fixture, gate, request):
    model = request.getfixturevalue(fixture)
    removed = [1, 4]
    with BlockGates(model, gate=gate) as gates:
        gates.set_removed(removed)
        gated = _logits(model)
    reference_unpruned = _logits(model)
    assert not torch.allclose(gated, reference_unpruned, atol=1e-3), "the removed blocks must matter"
    pruned = remove_blocks(model, removed)
    torch.testing.assert_close(_logits(pruned), gated, rtol=1e-5, atol=1e-5)


def test_gemma_branch_gate_scales_after_the_post_norm(tiny_gemma3):
    """Scaling attention/MLP outputs would be undone by Gemma's post-norms; the spec gates the post-norm outputs."""
    with BlockGates(tiny_gemma3, gate="branch") as gates:
        gates.set(torch.full((gates.num_blocks,), 0.5))
        half = _logits(tiny_gemma3)
    assert not torch.allclose(half, _logits(tiny_gemma3), atol=1e-3)


def test_gates_are_removable(tiny_llama):
    reference = _logits(tiny_llama)
    gates = BlockGates(tiny_llama)
    gates.set_removed([0, 2])
    assert not torch.equal(_logits(tiny_llama), reference)
    gates.remove()
    assert torch.equal(_logits(tiny_llama), reference)
    for module in tiny_llama.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


@pytest.mark.parametrize("family", ["llama", "opt"])  # OPT's MLP runs on [batch·T, d]
def test_per_sample_gates_scale_each_sample_separately(family):
    from .conftest import make_model
    from .test_architectures import _config

    model = make_model(_config(family))
    with BlockGates(model) as gates:
        values = torch.ones(2, gates.num_blocks)
        values[1, 3] = 0.0
        gates.set(values)
        mixed = _logits(model)
        gates.set_removed([3])
        removed = _logits(model)
    torch.testing.assert_close(mixed[0], _logits(model)[0])
    torch.testing.assert_close(mixed[1], removed[1])


def test_bad_gate_values_are_refused(tiny_llama):
    with BlockGates(tiny_llama) as gates:
        with pytest.raises(BlockCBOError, match="shape"):
            gates.set(torch.ones(gates.num_blocks + 1))
        gates.set(torch.ones(3, gates.num_blocks))
        with pytest.raises(BlockCBOError, match="rows"):
            _logits(tiny_llama)
    with pytest.raises(BlockCBOError, match="unknown gate"):
        BlockGates(tiny_llama, gate="attention")


def test_layer_gate_works_without_a_registered_spec(tiny_llama):
    from hf_blockcbo.surgery.architectures import GENERIC

    assert len(get_layers(tiny_llama, GENERIC)) == 6
    reference = _logits(tiny_llama)
    with BlockGates(tiny_llama, gate="auto", spec=GENERIC) as gates:
        assert gates.gate == "layer"
        gates.set(torch.ones(gates.num_blocks))
        assert torch.equal(_logits(tiny_llama), reference)
    with pytest.raises(BlockCBOError, match="gate=layer"):
        BlockGates(tiny_llama, gate="branch", spec=GENERIC)
