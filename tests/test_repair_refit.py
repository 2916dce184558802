"""`repair_depth`: the output projections of kept blocks after a gap refitted by ridge least squares, folded."""

import json

import pytest
import torch

from hf_blockcbo.commands.cli import main
from hf_blockcbo.config import BlockRemovalConfig, RepairSettings
from hf_blockcbo.errors import BlockCBOError
from hf_blockcbo.repair.forms import NormalEquations
from hf_blockcbo.repair.least_squares import fit_repair, removed_runs
from hf_blockcbo.repair.refit import refit_blocks, solve_refit
from hf_blockcbo.surgery.architectures import get_layers
from hf_blockcbo.surgery.gates import BlockGates
from hf_blockcbo.surgery.removal import remove_blocks

from .conftest import make_model, tiny_gemma3_config, tiny_llama_config
from .test_architectures import FAMILIES, PROMPT, _config
from .test_repair import REMOVED, _random_calibration, assert_saved_is_the_hooked_repair, check_reloaded, fold_and_save


def test_the_refitted_blocks_are_the_first_kept_ones_after_each_gap_before_the_next():
    runs = removed_runs([1, 3, 4])  # gaps [1] and [3, 4] in 8 blocks
    assert [refit_blocks(runs, j, 0, 8) for j in range(2)] == [[], []]
    assert [refit_blocks(runs, j, 1, 8) for j in range(2)] == [[2], [5]]
    assert [refit_blocks(runs, j, 3, 8) for j in range(2)] == [[2], [5, 6, 7]]  # block 3 is the next gap's
    assert refit_blocks(removed_runs([6, 7]), 0, 2, 8) == []  # nothing after the last block


def test_the_refit_is_the_ridge_least_squares_correction():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=gen, dtype=torch.float64)
    true = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    e = x @ true.t() + 0.01 * torch.randn(200, 5, generator=gen, dtype=torch.float64)
    g = torch.randn(200, 5, generator=gen, dtype=torch.float64)
    ones = torch.ones(200, 1, dtype=torch.float64)
    exact = NormalEquations.zeros(12, 5)
    for rows in range(0, 200, 50):  # accumulated in batches
        exact.add(x[rows : rows + 50], e[rows : rows + 50], g[rows : rows + 50], ones[rows : rows + 50])
    refit = solve_refit(exact, block=4, ridge=0.0)
    expected = torch.linalg.lstsq(x, e).solution.t()
    torch.testing.assert_close(refit.delta, expected, rtol=1e-8, atol=1e-8)
    residual = e - x @ refit.delta.t()
    assert refit.error_before == pytest.approx(float(e.pow(2).sum() / g.pow(2).sum()), rel=1e-10)
    assert refit.error_after == pytest.approx(float(residual.pow(2).sum() / g.pow(2).sum()), rel=1e-6)
    shrunk = solve_refit(exact, block=4, ridge=1e9)
    assert shrunk.delta.abs().max() < 1e-6 and shrunk.error_after == pytest.approx(shrunk.error_before, rel=1e-6)


def _stream_errors(model, calibration, removed, block, repair=None):
    """Σ‖g − h‖² / Σ‖g‖² after ``block``, measured here with hooks: the unpruned stream g, the gated one h (repaired
    with ``repair`` if given)."""
    captured = {}
    handle = get_layers(model)[block].register_forward_hook(
        lambda m, a, o: captured.__setitem__("h", (o[0] if isinstance(o, tuple) else o).detach().double())
    )
    num = den = 0.0
    with torch.no_grad():
        for _, ids, mask in calibration.batches(4):
            model(input_ids=ids, attention_mask=mask)
            g = captured["h"]
            with BlockGates(model) as gates:
                gates.set_removed(removed)
                if repair is None:
                    model(input_ids=ids, attention_mask=mask)
                else:
                    with repair.applied(model):
                        model(input_ids=ids, attention_mask=mask)
            num += float((g - captured["h"]).pow(2).sum())
            den += float(g.pow(2).sum())
    handle.remove()
    return num / den


def test_each_refit_lowers_the_stream_error_it_reports_as_measured_independently():
    model = make_model(tiny_llama_config())
    calibration = _random_calibration(num=16, length=32)
    shallow = fit_repair(model, [2], calibration, RepairSettings(ridge=1e-3, depth=0))
    deep = fit_repair(model, [2], calibration, RepairSettings(ridge=1e-3, depth=2))
    assert [r.block for r in deep.refits] == [3, 4] and deep.depth == 2
    torch.testing.assert_close(deep.maps[0].matrix, shallow.maps[0].matrix, rtol=0, atol=0)  # the map comes first
    for refit in deep.refits:
        assert refit.error_after < refit.error_before
        assert refit.error_after == pytest.approx(_stream_errors(model, calibration, [2], refit.block, deep), rel=1e-3)
    # before block 3's refit, its stream error is that of the gap's map alone
    first = deep.refits[0]
    assert first.error_before == pytest.approx(_stream_errors(model, calibration, [2], 3, shallow), rel=1e-3)
    record = deep.to_dict()
    assert record["depth"] == 2 and [r["block"] for r in record["refits"]] == [3, 4]
    assert "refits" not in shallow.to_dict()  # depth 0 records what it always did


@pytest.mark.parametrize(
    "family, refitted",
    [("llama", [2, 5]), ("gpt2", [2, 5]), ("gemma3", []), ("mixtral", []), ("qwen2_moe", [2])],
)
def test_by_default_one_block_is_refitted_after_each_gap_where_it_ends_in_a_dense_projection(family, refitted):
    """Unset depth (the default): 1 over the blocks with a dense output projection (qwen2_moe's block 5 is sparse,
    block 2 dense), none behind Gemma's post-norm; the record says which."""
    model = make_model(_config(family))
    repair = fit_repair(model, REMOVED, _random_calibration(), RepairSettings(ridge=1e-3))
    assert RepairSettings().depth is None and BlockRemovalConfig().repair_depth is None
    assert [r.block for r in repair.refits] == refitted
    assert repair.depth == (1 if refitted else 0)
    assert ("refits" in repair.to_dict()) == bool(refitted)


def test_the_deep_fit_is_deterministic_and_leaves_the_model_unchanged():
    model = make_model(tiny_llama_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibration = _random_calibration()
    first = fit_repair(model, REMOVED, calibration, RepairSettings(depth=1))
    second = fit_repair(model, REMOVED, calibration, RepairSettings(depth=1))
    for a, b in zip(first.refits, second.refits, strict=True):
        assert a.block == b.block and torch.equal(a.delta, b.delta)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not layer.mlp.down_proj._forward_hooks for layer in get_layers(model))


# the families whose kept blocks after the gaps of REMOVED end in a dense projection, and the others' refusal
FOLDS = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", "gpt_neox", "opt", "falcon", "nemotron_h"}
REFUSES = {
    "gemma2": "through a norm after it",
    "gemma3": "through a norm after it",
    "mixtral": "ends in none",
    "qwen2_moe": "ends in none",
    "qwen3_moe": "ends in none",
    "deepseek_v3": "ends in none",
}


def test_every_family_folds_its_refits_and_reloads_in_plain_transformers_or_refuses_in_one_line(tmp_path):
    """Hooked (gates + maps + refits) == folded in memory == the saved folder in a fresh plain process; a family
    with no dense projection to refit refuses before any forward pass and changes nothing."""
    assert FOLDS | set(REFUSES) == set(FAMILIES)
    calibration = _random_calibration()
    ids = torch.tensor(PROMPT)
    saved = {}
    for family in FAMILIES:
        model = make_model(_config(family))
        if family in REFUSES:
            before = {k: v.clone() for k, v in model.state_dict().items()}
            with pytest.raises(BlockCBOError, match=REFUSES[family]):
                fit_repair(model, REMOVED, calibration, RepairSettings(ridge=1e-3, depth=1))
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), family
            continue
        repair = fit_repair(model, REMOVED, calibration, RepairSettings(ridge=1e-3, depth=1))
        assert [r.block for r in repair.refits] == [2, 5], family
        plain = fit_repair(model, REMOVED, calibration, RepairSettings(ridge=1e-3, depth=0))
        with BlockGates(model) as gates, torch.no_grad(), plain.applied(model):
            gates.set_removed(REMOVED)
            shallow = model(input_ids=ids).logits
        saved[family] = fold_and_save(model, repair, REMOVED, tmp_path / family)
        assert not torch.allclose(saved[family][0], shallow, atol=1e-4), f"{family}: the refits must change it"
    check_reloaded(saved)


def test_a_refit_of_the_next_gaps_source_block_folds_before_that_gaps_map():
    """Gaps [1] and [3]: block 2 is refitted after the first gap and is the source of the second gap's map, which
    was fitted on top of the refit; folding must compose them in that order."""
    model = make_model(tiny_llama_config())
    repair = fit_repair(model, [1, 3], _random_calibration(), RepairSettings(ridge=1e-3, depth=1))
    assert [r.block for r in repair.refits] == [2, 4] and [m.source for m in repair.maps] == [0, 2]
    ids = torch.tensor(PROMPT)
    with BlockGates(model) as gates, torch.no_grad(), repair.applied(model):
        gates.set_removed([1, 3])
        hooked = model(input_ids=ids).logits
    repair.fold_into(model)
    remove_blocks(model, [1, 3])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, hooked, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "case, message",
    [
        ("negative depth", "repair_depth must be an integer >= 0"),
        ("fractional depth", "repair_depth must be an integer >= 0"),
        ("few tokens for the projection", "needs at least 64 calibration tokens"),
        ("post-norm family", "through a norm after it"),
    ],
)
def test_bad_depth_input_is_one_clear_error_and_changes_nothing(case, message):
    model = make_model(tiny_gemma3_config() if case == "post-norm family" else tiny_llama_config())
    calibration, depth = _random_calibration(), {"negative depth": -1, "fractional depth": 1.5}.get(case, 1)
    if case == "few tokens for the projection":
        calibration = _random_calibration(num=2, length=24)  # 48 tokens: enough for d = 32, not for 64 inputs
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BlockCBOError, match=message):
        fit_repair(model, [2, 3], calibration, RepairSettings(ridge=1e-3, depth=depth))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "depth, message",
    [(-1, "repair_depth must be an integer >= 0"), (1.5, "repair_depth` must be int"), (True, "repair_depth")],
)
def test_the_config_checks_repair_depth(depth, message):
    with pytest.raises(BlockCBOError, match=message):
        BlockRemovalConfig(repair_depth=depth)
    assert BlockRemovalConfig(repair_depth=2).repair_settings.depth == 2


def test_prune_repair_depth_records_prints_and_saves_the_refitted_model(tiny_model_dir, tmp_path, capsys):

    from hf_blockcbo.hub.publish import model_card

    out = tmp_path / "pruned"
    args = ["prune", "--model", str(tiny_model_dir), "--blocks", "2,3", "--repair", "--repair-samples", "4"]
    assert main([*args, "--repair-depth", "1", "--seq-len", "24", "--no-progress", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Refitted the output projection of 1 kept block(s) after the gaps: 4:" in printed
    record = json.loads((out / "block_removal.json").read_text())
    assert record["config"]["repair_depth"] == 1 and record["repair"]["depth"] == 1
    (refit,) = record["repair"]["refits"]
    assert refit["block"] == 4 and refit["fit_error_after"] < refit["fit_error_before"]
    card = str(model_card(out, "tester/x"))
    assert "| refitted block | stream error before | after |" in card and "\n| 4 | " in card

    config = BlockRemovalConfig(blocks=[2, 3], repair=True, repair_samples=4, seq_len=24, repair_depth=1)
    assert_saved_is_the_hooked_repair(tiny_model_dir, out, config)


def test_a_post_norm_family_refuses_repair_depth_before_the_selection(tmp_path, capsys, tokenizer):
    model = make_model(tiny_gemma3_config())
    model.save_pretrained(tmp_path / "gemma")
    tokenizer.save_pretrained(tmp_path / "gemma")
    capsys.readouterr()
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(tmp_path / "gemma"), "--remove", "2", "--repair", "--repair-depth", "1"]
    assert main([*argv, "--no-progress", "--output", str(out)]) != 0
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert errors == [err.strip().splitlines()[-1]] and "set --repair-depth 0" in errors[0]
    assert "Traceback" not in err and not out.exists()


def test_the_callback_refuses_a_depth_its_family_cannot_fold_before_the_first_step():
    from types import SimpleNamespace

    from hf_blockcbo import BlockRemovalCallback

    model = make_model(tiny_gemma3_config())
    config = BlockRemovalConfig(num_remove=2, repair=True, repair_depth=1)
    callback = BlockRemovalCallback(config, at="train_begin", remove_at_step=1)
    args = SimpleNamespace(world_size=1, ddp_find_unused_parameters=False)
    with pytest.raises(BlockCBOError, match="through a norm after it"):
        callback.on_train_begin(args, None, None, model=model)
    assert callback.artifact is None  # refused before the Hessian pass
