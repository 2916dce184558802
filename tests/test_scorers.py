import math

import numpy as np
import pytest
import torch

from hf_blockcbo.data import build_calibration_set
from hf_blockcbo.errors import BlockCBOError
from hf_blockcbo.evaluation.likelihood import multiple_choice_accuracy, perplexity, read_multiple_choice
from hf_blockcbo.hessian.artifact import HessianArtifact
from hf_blockcbo.hessian.gradients import compute_gate_gradients
from hf_blockcbo.selection.scorers import ScoringContext, available_scorers, merged_copy, score
from hf_blockcbo.selection.validation import select_by_validation, spearman
from hf_blockcbo.surgery.removal import remove_blocks

from .conftest import make_model, tiny_llama_config


@pytest.fixture
def setup(tokenizer):
    model = make_model(tiny_llama_config(vocab_size=len(tokenizer)))
    calibration = build_calibration_set(tokenizer, None, num_samples=6, seq_len=24)
    A, _ = compute_gate_gradients(model, calibration, batch_size=3, progress=False)
    artifact = HessianArtifact(A=A, block_names=[str(i) for i in range(6)], block_kinds=["attention"] * 6)
    validation = build_calibration_set(tokenizer, "embedded:validation", num_samples=4, seq_len=24)
    ctx = ScoringContext(model, calibration, artifact, top_k=5, seed=3, batch_size=3, sleb_samples=4)
    return model, ctx, validation


def test_registry_holds_every_method():
    assert set(available_scorers()) == {"cbo", "bi", "angular", "norm_ratio", "sleb", "swm", "random"}


@pytest.mark.parametrize("method", ["cbo", "bi", "angular", "norm_ratio", "sleb", "swm", "random"])
def test_every_scorer_returns_the_right_shape_deterministically(setup, method):
    _, ctx, _ = setup
    first = score(method, ctx, 2)
    again = score(method, ScoringContext(**{**ctx.__dict__, "_stats": None, "_sleb_steps": [], "_sleb_key": None}), 2)
    assert [c.blocks for c in first] == [c.blocks for c in again]
    for c in first:
        assert len(c.blocks) == 2 and list(c.blocks) == sorted(set(c.blocks)) and all(0 <= b < 6 for b in c.blocks)
        assert math.isfinite(c.energy), "every method is placed on the CBO energy axis"
    assert len(first) == (5 if method == "cbo" else 1)
    if method in ("angular", "swm"):
        assert first[0].blocks[1] == first[0].blocks[0] + 1, "contiguous run"


def test_block_influence_removes_the_most_similar_blocks(setup):
    _, ctx, _ = setup
    bi = ctx.stats()["block_influence"]
    assert score("bi", ctx, 2)[0].blocks == tuple(sorted(np.argsort(bi)[:2]))
    assert ctx.stats()["angular"].shape == (7, 7)


def test_protected_blocks_are_respected_by_baselines(setup):
    _, ctx, _ = setup
    ctx.protected = [0, 1, 2]
    for method in ("bi", "norm_ratio", "random", "sleb", "angular"):
        assert not {0, 1, 2} & set(score(method, ctx, 2)[0].blocks)


def token_kl(model, data, removed, hooks=None):
    """Token-weighted mean KL(unpruned ‖ gated) over the targets, one state at a time; ``hooks``: a context the gated
    model runs in (the reference runs outside it)."""
    import contextlib

    from hf_blockcbo.surgery.gates import BlockGates

    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits, -1)
        with hooks or contextlib.nullcontext(), BlockGates(model) as gates:
            gates.set_removed(list(removed))
            out = torch.log_softmax(model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits, -1)
    token = (ref.exp() * (ref - out)).sum(-1)[:, :-1].double()
    valid = (data.attention_mask[:, 1:] * data.attention_mask[:, :-1]).double()
    return float((token * valid).sum() / valid.sum())


def test_selection_by_default_picks_the_argmin_of_validation_perplexity(setup):
    model, ctx, validation = setup
    candidates = score("cbo", ctx, 2)
    best, scored = select_by_validation(model, candidates, validation, batch_size=2, progress=False)
    assert best.score == min(c.score for c in scored)
    assert [c.blocks for c in scored] == [c.blocks for c in candidates]
    assert all(c.validation_kl is None for c in scored)


def test_selection_by_kl_picks_the_argmin_of_validation_kl(setup):
    model, ctx, validation = setup
    candidates = score("cbo", ctx, 3)
    best, scored = select_by_validation(model, candidates, validation, batch_size=2, progress=False, metric="kl")
    assert [c.blocks for c in scored] == [c.blocks for c in candidates]
    for c in scored:
        assert c.validation_kl == pytest.approx(token_kl(model, validation, c.blocks), rel=1e-4, abs=1e-7)
        assert c.score == pytest.approx(perplexity(model, validation, c.blocks, batch_size=2), rel=1e-5)
    assert best.validation_kl == min(c.validation_kl for c in scored)
    assert "validation_kl" in best.to_dict()


def test_an_unknown_validation_metric_is_refused(setup):
    model, ctx, validation = setup
    with pytest.raises(BlockCBOError, match="validation metric must be one of kl, perplexity"):
        select_by_validation(model, score("cbo", ctx, 2), validation, progress=False, metric="accuracy")
    from hf_blockcbo.config import BlockRemovalConfig

    with pytest.raises(BlockCBOError, match="validation_metric must be 'kl' or 'perplexity'"):
        BlockRemovalConfig(validation_metric="ppl")


def test_gate_masked_evaluation_equals_the_pruned_model(setup):
    model, ctx, validation = setup
    masked = perplexity(model, validation, [1, 4], batch_size=2)
    pruned = remove_blocks(model, [1, 4])
    assert masked == pytest.approx(perplexity(pruned, validation, batch_size=2), rel=1e-5)


def test_swm_merges_the_window_into_its_first_block(setup):
    model, ctx, validation = setup
    candidate = score("swm", ctx, 2)[0]
    target = candidate.blocks[0] - 1
    before = {n: p.clone() for n, p in model.model.layers[target].named_parameters()}
    merged = merged_copy(model, candidate)
    assert merged.config.num_hidden_layers == 4
    name = "mlp.down_proj.weight"
    expected = before[name] + sum(
        dict(model.model.layers[k].named_parameters())[name] - before[name] for k in candidate.blocks
    )
    torch.testing.assert_close(dict(merged.model.layers[target].named_parameters())[name], expected)
    assert torch.equal(model.model.layers[target].mlp.down_proj.weight, before[name]), "the original is untouched"


def test_multiple_choice_reader_and_accuracy(setup, tokenizer, tmp_path):
    model, _, _ = setup
    path = tmp_path / "mc.jsonl"
    path.write_text(
        '{"question": "The sky is", "choices": ["blue.", "green."], "labels": ["A", "B"], "answer": "A"}\n'
        '{"question": "ok", "passage": "Text.", "answer": "yes"}\n'
    )
    items = read_multiple_choice(path)
    assert items[0]["answer_index"] == 0 and items[1]["choices"] == ["no", "yes"] and items[1]["answer_index"] == 1
    accuracy = multiple_choice_accuracy(model, tokenizer, items)
    assert accuracy in (0.0, 0.5, 1.0)


def test_spearman_and_bad_method(setup):
    _, ctx, _ = setup
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    with pytest.raises(BlockCBOError, match="unknown method"):
        score("magic", ctx, 2)


def test_sleb_reuses_its_nested_greedy_picks(setup, monkeypatch):
    import hf_blockcbo.selection.scorers as scorers

    _, ctx, _ = setup
    fresh = ScoringContext(**{**ctx.__dict__, "_stats": None, "_sleb_steps": [], "_sleb_key": None})
    calls = []
    real = scorers.perplexity
    monkeypatch.setattr(scorers, "perplexity", lambda *a, **k: calls.append(1) or real(*a, **k))
    three = score("sleb", fresh, 3)[0]
    assert len(calls) == 6 + 5 + 4
    two = score("sleb", fresh, 2)[0]
    assert len(calls) == 15 and set(two.blocks) < set(three.blocks), "M=2 is the first two greedy picks, no new work"
    alone = score("sleb", ScoringContext(**{**ctx.__dict__, "_stats": None, "_sleb_steps": [], "_sleb_key": None}), 2)
    assert alone[0].blocks == two.blocks
    fresh.protected = [two.blocks[0]]
    assert two.blocks[0] not in score("sleb", fresh, 2)[0].blocks, "other settings: the picks are recomputed"


def test_window_losses_recombine_to_the_perplexity_and_equal_each_sample_alone(setup):
    from hf_blockcbo.data import CalibrationSet
    from hf_blockcbo.evaluation.likelihood import window_losses

    model, _, validation = setup
    losses = window_losses(model, validation, [1, 3], batch_size=3)
    assert len(losses.nll) == len(losses.tokens) == len(validation)
    assert losses.perplexity == pytest.approx(perplexity(model, validation, [1, 3], batch_size=2), rel=1e-6)
    for i in range(len(validation)):
        one = CalibrationSet(validation.input_ids[i : i + 1], validation.attention_mask[i : i + 1], "one")
        alone = window_losses(model, one, [1, 3])
        assert alone.tokens == [losses.tokens[i]]
        assert alone.nll[0] == pytest.approx(losses.nll[i], rel=1e-5)


def test_paired_ratio_interval():
    from hf_blockcbo.evaluation.likelihood import paired_ratio_interval

    rng = np.random.default_rng(0)
    tokens = rng.integers(50, 128, size=16)
    a = rng.normal(3.0, 0.4, size=16) * tokens
    assert paired_ratio_interval(a, a, tokens) == (1.0, 1.0, 1.0)
    # the same per-token shift on every sample: the ratio is exact and no resample moves it
    ratio, low, high = paired_ratio_interval(a + 0.05 * tokens, a, tokens)
    assert ratio == pytest.approx(math.exp(0.05)) and low == pytest.approx(ratio) and high == pytest.approx(ratio)
    # a noisy difference: the interval holds the ratio, the same seed gives the same interval, more noise a wider one
    small = a + (0.02 + rng.normal(0, 0.05, size=16)) * tokens
    large = a + (0.02 + rng.normal(0, 0.5, size=16)) * tokens
    r1, lo1, hi1 = paired_ratio_interval(small, a, tokens)
    r2, lo2, hi2 = paired_ratio_interval(large, a, tokens)
    assert lo1 < r1 < hi1 and lo2 < r2 < hi2 and hi2 - lo2 > hi1 - lo1
    assert paired_ratio_interval(small, a, tokens) == (r1, lo1, hi1)
    with pytest.raises(BlockCBOError, match="paired samples must match"):
        paired_ratio_interval(a[:3], a, tokens)
