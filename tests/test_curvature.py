"""The three curvature estimators: empirical bit for bit, fisher against a one-sample reference, measured against
directly measured damage; batched configurations against one at a time."""

import itertools

import pytest
import torch

from hf_blockcbo.config import BlockRemovalConfig
from hf_blockcbo.data import CalibrationSet
from hf_blockcbo.errors import BlockCBOError
from hf_blockcbo.hessian.artifact import HessianArtifact
from hf_blockcbo.hessian.gradients import compute_gate_gradients, fisher_sample_seed
from hf_blockcbo.hessian.measured import configuration_damage, measure_damage, reference_pass
from hf_blockcbo.models import ModelSource
from hf_blockcbo.pipeline import calibrate
from hf_blockcbo.solvers.dispatch import solve_artifact
from hf_blockcbo.surgery.gates import BlockGates


def _samples(m=6, width=10, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (m, width), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[1, 6:] = 0
        ids[1, 6:] = 0
    return CalibrationSet(ids, mask, source="test")


def _source():
    return ModelSource(model_id="tiny", revision=None, base_model=None, path="tiny")


def test_empirical_is_the_papers_rows_bit_for_bit(tiny_llama, tokenizer):
    cal = _samples()
    config = BlockRemovalConfig(curvature="empirical", num_samples=6, seq_len=10, batch_size=4)
    artifact = calibrate(tiny_llama, tokenizer, config, _source(), progress=False, calibration=cal)
    A, losses = compute_gate_gradients(tiny_llama, cal, batch_size=4, progress=False)
    assert torch.equal(artifact.A, A) and torch.equal(artifact.losses, losses)
    assert artifact.metadata["curvature"] == "empirical"
    torch.testing.assert_close(artifact.H, A.double().T @ A.double() / 6)


def _fisher_one_at_a_time(model, cal, seed):
    rows = []
    for i in range(len(cal)):
        length = int(cal.attention_mask[i].sum())
        ids = cal.input_ids[i : i + 1, :length]
        with BlockGates(model) as gates:
            alpha = torch.ones(gates.num_blocks, requires_grad=True)
            gates.set(alpha)
            logits = model(input_ids=ids).logits[0]
            probs = torch.softmax(logits.detach(), dim=-1)
            drawn = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(fisher_sample_seed(seed, i)))
            loss = torch.nn.functional.cross_entropy(logits[:-1], drawn[:-1, 0], reduction="sum") / (length - 1) ** 0.5
            loss.backward()
        rows.append(alpha.grad.clone())
    return torch.stack(rows)


def test_fisher_equals_a_one_sample_at_a_time_reference(tiny_llama):
    cal = _samples(pad=False)
    A, _ = compute_gate_gradients(tiny_llama, cal, batch_size=4, progress=False, fisher_seed=3)
    torch.testing.assert_close(A, _fisher_one_at_a_time(tiny_llama, cal, seed=3), rtol=1e-4, atol=1e-6)
    again, _ = compute_gate_gradients(tiny_llama, cal, batch_size=2, progress=False, fisher_seed=3)
    torch.testing.assert_close(again, A, rtol=1e-5, atol=1e-7)  # the draw does not depend on the batching
    other, _ = compute_gate_gradients(tiny_llama, cal, batch_size=4, progress=False, fisher_seed=4)
    assert not torch.allclose(other, A)


def test_fisher_has_zero_mean_gradient_within_sampling_error(tiny_llama):
    one = _samples(m=1, width=12, seed=1, pad=False)
    cal = CalibrationSet(one.input_ids.repeat(96, 1), one.attention_mask.repeat(96, 1), "one sequence, 96 times")
    A, _ = compute_gate_gradients(tiny_llama, cal, batch_size=32, progress=False, fisher_seed=0)
    stderr = A.std(0) / len(cal) ** 0.5
    assert bool((stderr > 0).all()), "every row has its own draw"
    assert bool((A.mean(0).abs() < 4 * stderr).all()), (A.mean(0), stderr)
    # the same 96 rows from the data's own next tokens all equal one nonzero gradient: the ggᵀ term fisher avoids
    empirical, _ = compute_gate_gradients(tiny_llama, cal, batch_size=32, progress=False)
    assert bool((empirical.mean(0).abs() > 4 * stderr).any()) and float(empirical.std(0).max()) < 1e-5


def _direct_kl(model, cal, removed):
    """Mean per-token KL(unpruned ‖ pruned), each sample's mean over its targets, averaged over samples."""
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=cal.input_ids, attention_mask=cal.attention_mask).logits, -1)
        with BlockGates(model) as gates:
            gates.set_removed(removed)
            out = torch.log_softmax(model(input_ids=cal.input_ids, attention_mask=cal.attention_mask).logits, -1)
    token = (ref.exp() * (ref - out)).sum(-1)[:, :-1]
    valid = (cal.attention_mask[:, 1:] * cal.attention_mask[:, :-1]).double()
    return float(((token.double() * valid).sum(1) / valid.sum(1)).mean())


def test_measured_energy_is_the_measured_damage_of_every_single_and_pair(tiny_llama):
    cal = _samples(m=5)
    damage = measure_damage(tiny_llama, cal, batch_size=2, pairs=None, progress=False, log=lambda _: None)
    q = damage.per_sample_energy("kl").mean(0)
    n = q.shape[0]
    for state in [(i,) for i in range(n)] + list(itertools.combinations(range(n), 2)):
        idx = list(state)
        energy = float(q[idx][:, idx].sum())
        assert energy == pytest.approx(_direct_kl(tiny_llama, cal, state), rel=1e-4, abs=1e-7), state
    assert damage.configurations == n + n * (n - 1) // 2


def test_measured_pairs_are_restricted_to_the_least_damaging_blocks(tiny_llama):
    cal = _samples(m=3)
    damage = measure_damage(tiny_llama, cal, pairs=3, progress=False, log=lambda _: None)
    singles = damage.single["kl"].mean(0)
    assert damage.pair_blocks == sorted(singles.argsort()[:3].tolist())
    q = damage.per_sample_energy("kl").mean(0)
    outside = [b for b in range(q.shape[0]) if b not in damage.pair_blocks]
    assert float(q[outside[0], damage.pair_blocks[0]]) == 0.0  # unmeasured: additive
    assert damage.configurations == q.shape[0] + 3


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
def test_batched_configurations_equal_one_at_a_time(fixture, request):
    model = request.getfixturevalue(fixture)
    cal = _samples(m=3)
    configs = [(0,), (1, 3), (2,), (3,), (1, 2)]
    with torch.no_grad(), BlockGates(model) as gates:
        ref = reference_pass(model, gates.layers, cal.input_ids, cal.attention_mask)
        together = configuration_damage(model, gates, cal.input_ids, cal.attention_mask, configs, ref)
        for share in (True, False):
            for k, config in enumerate(configs):
                alone = configuration_damage(
                    model, gates, cal.input_ids, cal.attention_mask, [config], ref, share_prefix=share
                )
                torch.testing.assert_close(alone[0][:, 0], together[0][:, k], rtol=1e-4, atol=1e-7)
                torch.testing.assert_close(alone[1][:, 0], together[1][:, k], rtol=1e-4, atol=1e-6)
    for k, config in enumerate(configs):
        assert float(together[0][:, k].mean()) == pytest.approx(_direct_kl(model, cal, config), rel=1e-4, abs=1e-7)


def test_measured_artifact_round_trips_and_solves(tiny_llama, tokenizer, tmp_path):
    cal = _samples(m=4)
    config = BlockRemovalConfig(curvature="measured", num_remove=2, top_k=3, measured_samples=3, measured_pairs=None)
    artifact = calibrate(tiny_llama, tokenizer, config, _source(), progress=False, calibration=cal)
    assert artifact.A is None and artifact.Q_samples.shape == (3, 6, 6) and "Q_samples_ce" in artifact.extra
    assert artifact.metadata["curvature"] == "measured" and artifact.metadata["damage"] == "kl"
    artifact.save(tmp_path / "h.safetensors")
    back = HessianArtifact.load(tmp_path / "h.safetensors")
    torch.testing.assert_close(back.H, artifact.H)
    assert back.curvature == "measured" and set(back.extra) == {"Q_samples_ce"}
    ground = solve_artifact(back, config).candidates[0]
    best = min(
        itertools.combinations(range(6), 2),
        key=lambda s: _direct_kl(tiny_llama, CalibrationSet(cal.input_ids[:3], cal.attention_mask[:3], "t"), s),
    )
    assert ground.blocks == best  # every pair measured: the ground state is the least damaging pair


def test_beta_is_refused_for_estimators_without_a_data_gradient():
    with pytest.raises(BlockCBOError, match="beta"):
        BlockRemovalConfig(curvature="fisher", beta=1.0)
    with pytest.raises(BlockCBOError, match="curvature must be one of"):
        BlockRemovalConfig(curvature="hutchinson")


def test_chunked_logsumexp_and_target_logits_equal_the_full_head(monkeypatch):
    from hf_blockcbo.hessian import head_kl

    monkeypatch.setattr(head_kl, "_MIN_CHUNK", 7)  # 50 entries in 8 chunks, the last one short
    monkeypatch.setattr(head_kl, "_CHUNK_BYTES", 1)
    g = torch.Generator().manual_seed(0)
    head = head_kl.LinearHead(torch.randn(50, 6, generator=g) * 3, torch.randn(50, generator=g))
    hidden, targets = torch.randn(9, 6, generator=g), torch.randint(0, 50, (9,), generator=g)
    logits = hidden @ head.weight.T + head.bias
    torch.testing.assert_close(head.logsumexp(hidden), torch.logsumexp(logits, -1))
    torch.testing.assert_close(head.target_logits(hidden, targets), logits.gather(-1, targets[:, None])[:, 0])
    probs = torch.softmax(torch.randn(2, 3, 50, generator=g), -1)
    p_weight, p_bias = head.reference_terms(probs)
    z = torch.randn(2, 3, 6, generator=g)
    torch.testing.assert_close((z * p_weight).sum(-1) + p_bias, (probs * (z @ head.weight.T + head.bias)).sum(-1))


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
def test_chunked_head_gives_the_full_logits_damage(fixture, request, monkeypatch):
    from hf_blockcbo.hessian import head_kl
    from hf_blockcbo.hessian.measured import FastPaths, fast_paths

    monkeypatch.setattr(head_kl, "_MIN_CHUNK", 16)
    monkeypatch.setattr(head_kl, "_CHUNK_BYTES", 1)  # 256 entries in 16 chunks
    model = request.getfixturevalue(fixture)
    cal = _samples(m=3)
    configs = [(0,), (1, 3), (2,), (3, 5)]
    head = head_kl.LinearHead.of(model)
    assert head is not None
    with torch.no_grad(), BlockGates(model) as gates:
        full_ref = reference_pass(model, gates.layers, cal.input_ids, cal.attention_mask)
        chunked_ref = reference_pass(model, gates.layers, cal.input_ids, cal.attention_mask, head)
        full = configuration_damage(model, gates, cal.input_ids, cal.attention_mask, configs, full_ref)
        chunked = configuration_damage(
            model, gates, cal.input_ids, cal.attention_mask, configs, chunked_ref, True, head
        )
        with pytest.raises(BlockCBOError, match="same head"):
            configuration_damage(model, gates, cal.input_ids, cal.attention_mask, configs, full_ref, True, head)
        assert fast_paths(model, gates, cal) == FastPaths(share_prefix=True, head=head)
    assert model.get_output_embeddings() is not None and type(model.get_output_embeddings()) is torch.nn.Linear
    torch.testing.assert_close(chunked[0], full[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(chunked[1], full[1], rtol=1e-4, atol=1e-5)
    plain = measure_damage(model, cal, pairs=None, progress=False, log=lambda _: None, chunked_head=False)
    fast = measure_damage(model, cal, pairs=None, progress=False, log=lambda _: None)
    torch.testing.assert_close(fast.per_sample_energy(), plain.per_sample_energy(), rtol=1e-4, atol=1e-6)


def test_a_forward_that_changes_the_logits_after_the_head_is_measured_with_full_logits():
    from hf_blockcbo.hessian.measured import fast_paths

    from .conftest import make_model, tiny_gemma3_config

    model = make_model(tiny_gemma3_config(final_logit_softcapping=2.0))  # Gemma 2's soft-capping, after the head
    cal = _samples(m=2)
    with torch.no_grad(), BlockGates(model) as gates:
        paths = fast_paths(model, gates, cal)
    assert paths.share_prefix and paths.head is None
    damage = measure_damage(model, cal, pairs=None, progress=False, log=lambda _: None)
    direct = _direct_kl(model, cal, (2, 4))
    q = damage.per_sample_energy().mean(0)
    assert float(q[[2, 4]][:, [2, 4]].sum()) == pytest.approx(direct, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
def test_pairs_started_from_the_single_removal_state_equal_full_forwards(fixture, request):
    from hf_blockcbo.hessian.measured import removal_states

    model = request.getfixturevalue(fixture)
    cal = _samples(m=3)
    tree = measure_damage(model, cal, batch_size=2, pairs=None, progress=False, log=lambda _: None)
    full = measure_damage(model, cal, batch_size=2, pairs=None, progress=False, log=lambda _: None, share_prefix=False)
    for metric in ("kl", "ce"):
        torch.testing.assert_close(tree.pair[metric], full.pair[metric], rtol=1e-4, atol=1e-6, equal_nan=True)
    with torch.no_grad(), BlockGates(model) as gates:
        ref = reference_pass(model, gates.layers, cal.input_ids, cal.attention_mask)
        with pytest.raises(BlockCBOError, match="after block 3"):
            removal_states(model, gates, cal.input_ids, cal.attention_mask, ref, 3, [2, 5])
        states = removal_states(model, gates, cal.input_ids, cal.attention_mask, ref, 1, [3, 5])
        gates.set_removed([1])
        captured = {}
        handles = [
            gates.layers[j].register_forward_pre_hook(
                lambda mod, args, kwargs, j=j: captured.__setitem__(j, args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True,
            )
            for j in (3, 5)
        ]
        model(input_ids=cal.input_ids, attention_mask=cal.attention_mask)
        for handle in handles:
            handle.remove()
    assert sorted(states) == [3, 5]
    for j in (3, 5):
        torch.testing.assert_close(states[j], captured[j], rtol=1e-5, atol=1e-6)


def test_the_shortcuts_are_checked_once_per_model_structure(tiny_llama, monkeypatch):
    from hf_blockcbo.hessian import measured
    from hf_blockcbo.surgery.removal import remove_blocks

    calls = []
    check = measured._check_fast_paths
    monkeypatch.setattr(measured, "_check_fast_paths", lambda *a: calls.append(1) or check(*a))
    cal = _samples(m=2)
    for _ in range(2):
        with torch.no_grad(), BlockGates(tiny_llama) as gates:
            paths = measured.fast_paths(tiny_llama, gates, cal)
    assert len(calls) == 1 and paths.share_prefix and paths.head is not None
    remove_blocks(tiny_llama, [0])  # another structure: checked again
    with torch.no_grad(), BlockGates(tiny_llama) as gates:
        measured.fast_paths(tiny_llama, gates, cal)
    assert len(calls) == 2
