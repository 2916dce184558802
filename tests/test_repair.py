"""Training-free repair: least-squares maps per removed run, folded into the weights of every registered family."""

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from hf_blockcbo.commands.cli import main
from hf_blockcbo.config import BlockRemovalConfig, RepairSettings
from hf_blockcbo.data import CalibrationSet
from hf_blockcbo.errors import BlockCBOError
from hf_blockcbo.evaluation.likelihood import perplexity
from hf_blockcbo.repair.least_squares import fit_repair, removed_runs
from hf_blockcbo.surgery.architectures import get_layers
from hf_blockcbo.surgery.gates import BlockGates
from hf_blockcbo.surgery.removal import remove_blocks, save_pruned

from .conftest import make_model, run_plain_transformers, tiny_gemma3_config, tiny_llama_config
from .test_architectures import FAMILIES, PROMPT, _config


REMOVED = [1, 3, 4]  # two runs: [1] and [3, 4]


def _random_calibration(num: int = 8, length: int = 24, seed: int = 0) -> CalibrationSet:
    ids = torch.randint(3, 256, (num, length), generator=torch.Generator().manual_seed(seed))
    return CalibrationSet(ids, torch.ones_like(ids), "random")


def test_runs_of_consecutive_blocks():
    assert removed_runs([4, 1, 3, 9, 8, 10]) == [(1, 2), (3, 5), (8, 11)]
    assert removed_runs([]) == []


RELOAD_ALL = """
import json, torch
from transformers import AutoModelForCausalLM
out = {{}}
for name, path in {paths!r}.items():
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor({prompt!r})
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    tokens = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    out[name] = {{"logits": logits.flatten().tolist(), "tokens": tokens[0].tolist(),
                 "layers": model.config.num_hidden_layers}}
print(json.dumps(out))
"""


def fold_and_save(model, repair, removed, path):
    """The gated model with ``repair`` hooked (logits on PROMPT and greedy tokens with the KV cache), then the repair
    folded and the blocks removed in memory (checked equal) and saved to ``path``: ``(logits, tokens, path)``."""
    ids = torch.tensor(PROMPT)
    with BlockGates(model) as gates, torch.no_grad():
        gates.set_removed(removed)
        with repair.applied(model):
            hooked = model(input_ids=ids).logits
            tokens = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    repair.fold_into(model)
    remove_blocks(model, removed)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, hooked, rtol=1e-4, atol=1e-4)
    return hooked, tokens[0].tolist(), str(save_pruned(model, None, path, {"removed_blocks": removed}))


def check_reloaded(saved: dict) -> dict:
    """Every folder of ``saved`` (name → `fold_and_save`'s triple) reloaded in a fresh plain-transformers process
    gives the hooked logits and greedy tokens; returns what that process printed."""
    paths = {name: path for name, (_, _, path) in saved.items()}
    result = run_plain_transformers(RELOAD_ALL.format(paths=paths, prompt=PROMPT), timeout=600)
    for name, (hooked, tokens, _) in saved.items():
        got = result[name]
        torch.testing.assert_close(torch.tensor(got["logits"]).view_as(hooked), hooked, rtol=1e-4, atol=1e-4)
        assert got["tokens"] == tokens, f"{name}: greedy generate with KV cache differs"
    return result


def test_every_family_folds_its_repair_and_reloads_in_plain_transformers(tmp_path):
    """Hooked repair (gates + maps) == folded weights in memory == the saved folder in a fresh plain process."""
    calibration = _random_calibration()
    ids = torch.tensor(PROMPT)
    saved = {}
    for family in FAMILIES:
        model = make_model(_config(family))
        repair = fit_repair(model, REMOVED, calibration, RepairSettings(ridge=1e-3))
        assert [(m.start, m.stop) for m in repair.maps] == [(1, 2), (3, 5)]
        assert repair.kind == ("renormalised" if family.startswith("gemma") else "linear")
        assert all(m.error_after <= m.error_before + 1e-9 for m in repair.maps), family
        with BlockGates(model) as gates, torch.no_grad():
            gates.set_removed(REMOVED)
            unrepaired = model(input_ids=ids).logits
        saved[family] = fold_and_save(model, repair, REMOVED, tmp_path / family)
        assert not torch.allclose(saved[family][0], unrepaired, atol=1e-4), f"{family}: the repair must change it"
    result = check_reloaded(saved)
    assert all(got["layers"] == 6 - len(REMOVED) for got in result.values())


def _linear_first_block_model():
    """Block 0 computes h + h·A exactly (attention output zeroed, norm bypassed, MLP a linear map)."""
    model = make_model(tiny_llama_config())
    block = get_layers(model)[0]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
    block.post_attention_layernorm = nn.Identity()
    block.mlp = nn.Linear(32, 32, bias=False)
    with torch.no_grad():
        block.mlp.weight.normal_(0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize("weighting", ["relative", "uniform"])
def test_a_block_whose_branch_is_linear_is_repaired_exactly(weighting):
    model = _linear_first_block_model()
    calibration = _random_calibration(num=16, length=32)
    repair = fit_repair(model, [0], calibration, RepairSettings(ridge=0.0, weighting=weighting))
    (only,) = repair.maps
    assert only.source == -1 and only.error_before > 0.1 and only.error_after < 1e-10
    expected = torch.eye(32, dtype=torch.float64) + model.model.layers[0].mlp.weight.double().t()
    torch.testing.assert_close(only.matrix, expected, rtol=1e-6, atol=1e-6)
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        with BlockGates(model) as gates, repair.applied(model):
            gates.set_removed([0])
            torch.testing.assert_close(model(input_ids=ids).logits, reference, rtol=1e-5, atol=1e-5)


def _streams_around_block_2(model, calibration):
    """u (block 1's MLP output), h (the stream after block 2, block 2 gated off) and g (the unpruned stream after
    block 2), every token, float64: what the fit of removing block 2 regresses."""
    layers, captured = get_layers(model), {}
    handles = [
        layers[1].mlp.register_forward_hook(lambda m, a, o: captured.__setitem__("u", o.detach())),
        layers[2].register_forward_hook(
            lambda m, a, o: captured.__setitem__("out", o[0] if isinstance(o, tuple) else o)
        ),
    ]
    rows = {"u": [], "h": [], "g": []}
    with torch.no_grad():
        for _, ids, mask in calibration.batches(4):
            model(input_ids=ids, attention_mask=mask)
            rows["g"].append(captured["out"].reshape(-1, 32).double())
            with BlockGates(model) as gates:
                gates.set_removed([2])
                model(input_ids=ids, attention_mask=mask)
            rows["u"].append(captured["u"].reshape(-1, 32).double())
            rows["h"].append(captured["out"].reshape(-1, 32).double())
    for handle in handles:
        handle.remove()
    return (torch.cat(rows[k]) for k in ("u", "h", "g"))


@pytest.mark.parametrize("weighting", ["relative", "uniform"])
def test_the_fit_is_the_weighted_ridge_solution(weighting):
    """T = (UᵀWU + λI)⁻¹(UᵀW(G − B) + λI) with W = d/‖g‖² per token (relative) or I (uniform), computed here from
    streams captured independently of the fit; the two weightings give different maps."""
    model = make_model(tiny_llama_config())
    with torch.no_grad():  # one token's stream 50x larger than the rest, like an attention sink
        model.get_input_embeddings().weight[7] *= 50.0
    ids = _random_calibration(num=8, length=24).input_ids
    ids[:, 0] = 7
    calibration = CalibrationSet(ids, torch.ones_like(ids), "random with a sink token")
    ridge = 0.05
    fitted = fit_repair(model, [2], calibration, RepairSettings(ridge, weighting))
    u, h, g = _streams_around_block_2(model, calibration)
    w = 32.0 / g.pow(2).sum(-1, keepdim=True) if weighting == "relative" else torch.ones(len(g), 1, dtype=g.dtype)
    uwu, uwr = (u * w).t() @ u, (u * w).t() @ (g - h + u)
    lam = ridge * float(torch.diagonal(uwu).mean())
    eye = torch.eye(32, dtype=torch.float64)
    expected = torch.linalg.solve(uwu + lam * eye, uwr + lam * eye)
    torch.testing.assert_close(fitted.maps[0].matrix, expected, rtol=1e-5, atol=1e-6)
    relative_error = ((g - h).pow(2).sum(-1) / g.pow(2).sum(-1)).mean()
    if weighting == "relative":  # the reported error is the mean per-token relative error
        assert fitted.maps[0].error_before == pytest.approx(float(relative_error), rel=1e-5)
        other = fit_repair(model, [2], calibration, RepairSettings(ridge, "uniform"))
        assert not torch.allclose(other.maps[0].matrix, fitted.maps[0].matrix, atol=1e-3)
    assert fitted.to_dict()["weighting"] == weighting


def test_fit_is_deterministic_and_leaves_the_model_unchanged():
    model = make_model(tiny_llama_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibration = _random_calibration()
    first = fit_repair(model, REMOVED, calibration)
    second = fit_repair(model, REMOVED, calibration)
    for a, b in zip(first.maps, second.maps, strict=True):
        assert torch.equal(a.matrix, b.matrix) and a.error_after == b.error_after
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model._forward_hooks and not get_layers(model)[0].mlp._forward_hooks


def test_the_ridge_shrinks_towards_no_repair():
    model = make_model(tiny_llama_config())
    huge = fit_repair(model, [2], _random_calibration(), RepairSettings(ridge=1e9))
    torch.testing.assert_close(huge.maps[0].matrix, torch.eye(32, dtype=torch.float64), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "case, message",
    [
        ("few tokens", "needs at least 32 calibration tokens"),
        ("nan", "not finite"),
        ("generic family", "cannot be folded"),
        ("tied embeddings", "tied to the LM head"),
        ("negative ridge", "repair_ridge must be a number >= 0"),
        ("unknown weighting", "repair_weighting must be one of uniform, relative"),
    ],
)
def test_bad_input_is_one_clear_error_and_changes_nothing(case, message):
    model = make_model(tiny_llama_config())
    removed, calibration, ridge = [2, 3], _random_calibration(), 1e-3
    if case == "few tokens":
        calibration = _random_calibration(num=1, length=16)
    elif case == "nan":
        with torch.no_grad():
            get_layers(model)[1].mlp.down_proj.weight[0, 0] = float("nan")
    elif case == "generic family":
        model.config.model_type = "my_new_llama"
    elif case == "tied embeddings":
        model = make_model(tiny_gemma3_config())
        removed = [0, 1]
    elif case == "negative ridge":
        ridge = -1.0
    weighting = "per-token" if case == "unknown weighting" else "relative"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BlockCBOError, match=message):
        fit_repair(model, removed, calibration, RepairSettings(ridge, weighting))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) or before[k].isnan().any() for k in before)


def test_prune_repair_records_the_repair_and_saves_the_hooked_model(tiny_model_dir, tmp_path, capsys):

    out = tmp_path / "pruned"
    args = ["prune", "--model", str(tiny_model_dir), "--blocks", "2,3", "--repair", "--repair-samples", "4"]
    assert main([*args, "--seq-len", "24", "--no-progress", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Repaired 1 removed run(s)" in printed and "fitted on 96 tokens of embedded + embedded:play" in printed
    record = json.loads((out / "block_removal.json").read_text())
    assert record["repair"]["kind"] == "linear" and record["repair"]["tokens"] == 96
    assert record["repair"]["data"] == "embedded + embedded:play"  # the default: the novel and the embedded play
    from hf_blockcbo.hub.publish import model_card

    assert "96 calibration tokens of embedded + embedded:play" in str(model_card(out, "tester/x"))
    assert record["repair"]["weighting"] == "uniform" and record["config"]["repair_weighting"] == "uniform"
    (run,) = record["repair"]["runs"]
    assert run["removed"] == [2, 3] and run["mapped_into"] == "block 1"
    assert run["fit_error_after"] < run["fit_error_before"]
    assert record["config"]["repair"] is True

    assert_saved_is_the_hooked_repair(
        tiny_model_dir, out, BlockRemovalConfig(blocks=[2, 3], repair=True, repair_samples=4, seq_len=24)
    )


def assert_saved_is_the_hooked_repair(model_dir, out, config: BlockRemovalConfig) -> None:
    """The folder `prune` wrote to ``out`` computes what the model in ``model_dir`` does with ``config.blocks`` gated
    off and the repair ``config`` describes hooked on (fitted again here, on the same samples)."""
    from transformers import AutoModelForCausalLM

    from hf_blockcbo.data import repair_samples
    from hf_blockcbo.models import load_model, resolve_model

    model, tokenizer = load_model(resolve_model(str(model_dir), None))
    repair = fit_repair(model, config.blocks, repair_samples(tokenizer, config), config.repair_settings)
    ids = torch.tensor(PROMPT)
    with torch.no_grad(), BlockGates(model) as gates, repair.applied(model):
        gates.set_removed(config.blocks)
        hooked = model(input_ids=ids).logits
    saved = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=ids).logits, hooked, rtol=1e-4, atol=1e-4)


def test_prune_refuses_an_unfoldable_repair_before_writing(tmp_path, capsys):
    from hf_blockcbo.surgery.removal import save_pruned as save

    model = make_model(tiny_gemma3_config())
    source = tmp_path / "gemma"
    save(model, None, source, {})
    from .conftest import make_tokenizer

    make_tokenizer().save_pretrained(source)
    capsys.readouterr()
    out = tmp_path / "out"
    code = main(["prune", "--model", str(source), "--blocks", "0,1", "--repair", "--output", str(out)])
    err = capsys.readouterr().err
    assert code != 0 and "tied to the LM head" in err and "--protect" in err and "--no-repair" in err
    assert [line for line in err.splitlines() if "error:" in line] == [err.strip().splitlines()[-1]]
    assert "Traceback" not in err
    assert not out.exists()


def test_by_default_repair_selects_among_the_repaired_candidates(tiny_model_dir):
    from hf_blockcbo.models import load_model, resolve_model
    from hf_blockcbo.pipeline import choose_blocks

    source = resolve_model(str(tiny_model_dir), None)
    model, tokenizer = load_model(source)
    config = BlockRemovalConfig(
        num_remove=2, num_samples=4, measured_samples=4, seq_len=24, top_k=3, validation_samples=4, repair_samples=4
    )
    plain, artifact = choose_blocks(model, tokenizer, config, source, progress=False)
    aware, _ = choose_blocks(model, tokenizer, config.replace(repair=True), source, artifact, progress=False)
    assert "after its repair" in aware.how and aware.spectrum != plain.spectrum  # scored repaired
    unaware, _ = choose_blocks(
        model, tokenizer, config.replace(repair=True, repair_aware=False), source, artifact, progress=False
    )
    assert unaware.blocks == plain.blocks and unaware.spectrum == plain.spectrum
    assert "after its repair" not in unaware.how


def test_repair_aware_selection_scores_candidates_after_repair(tiny_model_dir):
    from hf_blockcbo.data import repair_samples
    from hf_blockcbo.models import load_model, resolve_model
    from hf_blockcbo.pipeline import choose_blocks, validation_samples

    source = resolve_model(str(tiny_model_dir), None)
    model, tokenizer = load_model(source)
    config = BlockRemovalConfig(
        num_remove=2,
        num_samples=4,
        measured_samples=4,
        seq_len=24,
        top_k=3,
        validation_samples=4,
        repair=True,
        repair_aware=True,
        validation_metric="kl",
    )
    config.repair_samples = 4
    from .test_scorers import token_kl

    selection, _ = choose_blocks(model, tokenizer, config, source, progress=False)
    assert "after its repair" in selection.how and "KL" in selection.how
    validation = validation_samples(tokenizer, config)
    data = repair_samples(tokenizer, config)
    for state in selection.spectrum:
        repair = fit_repair(model, state["blocks"], data, config.repair_settings, config.batch_size)
        with repair.applied(model):
            assert perplexity(model, validation, state["blocks"]) == pytest.approx(state["score"], rel=1e-5)
        # the KL is to the unpruned model without the repair's hooks
        kl = token_kl(model, validation, state["blocks"], hooks=repair.applied(model))
        assert state["validation_kl"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
    chosen = min(selection.spectrum, key=lambda s: s["validation_kl"])
    assert selection.blocks == chosen["blocks"] and selection.validation_ppl == chosen["score"]
    by_perplexity, _ = choose_blocks(
        model, tokenizer, config.replace(validation_metric="perplexity"), source, progress=False
    )
    assert by_perplexity.validation_ppl == min(s["score"] for s in by_perplexity.spectrum)


def test_config_validates_repair_fields():
    with pytest.raises(BlockCBOError, match="`repair` must be bool"):
        BlockRemovalConfig(repair="yes")
    with pytest.raises(BlockCBOError, match="repair_samples must be a positive integer"):
        BlockRemovalConfig(repair_samples=0)
    with pytest.raises(BlockCBOError, match="repair_weighting must be one of uniform, relative, got 'l2'"):
        BlockRemovalConfig(repair_weighting="l2")
    assert BlockRemovalConfig.from_dict(BlockRemovalConfig(repair=True).to_dict()).repair is True


def test_the_weighting_is_a_flag_of_every_repairing_verb(capsys):
    from hf_blockcbo.commands.cli import build_parser

    parser = build_parser()
    for verb, required in (("prune", ["--output", "o"]), ("compare", ["--remove", "2", "--output-dir", "o"])):
        args = parser.parse_args([verb, "--model", "m", *required, "--repair-weighting", "relative"])
        assert args.repair_weighting == "relative"
        with pytest.raises(SystemExit):
            parser.parse_args([verb, "--model", "m", *required, "--repair-weighting", "l2"])
        assert "invalid choice: 'l2'" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["rotation", "renormalised"])
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_the_maps_before_the_post_norm_fold_into_the_mlp_and_the_norm(family, kind, monkeypatch):
    """x̂(y·A)·s (rotation: A orthogonal; renormalised: any A): A folds into the MLP's down projection, s into the
    post-norm; the folded model equals the hooks."""
    import dataclasses

    import hf_blockcbo.surgery.architectures.registry as registry
    from hf_blockcbo.surgery.architectures import get_architecture

    model = make_model(_config(family))
    spec = dataclasses.replace(get_architecture(model), repair=kind)
    for model_type in spec.model_types:
        monkeypatch.setitem(registry._REGISTRY, model_type, spec)
    repair = fit_repair(model, REMOVED, _random_calibration(), RepairSettings(ridge=0.3))
    assert [m.kind for m in repair.maps] == [kind, kind]
    for m in repair.maps:
        if kind == "rotation":
            torch.testing.assert_close(m.matrix.t() @ m.matrix, torch.eye(32, dtype=torch.float64), rtol=0, atol=1e-8)
        assert m.error_after <= m.error_before
    ids = torch.tensor(PROMPT)
    with BlockGates(model) as gates, torch.no_grad():
        gates.set_removed(REMOVED)
        with repair.applied(model):
            hooked = model(input_ids=ids).logits
    repair.fold_into(model)
    remove_blocks(model, REMOVED)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, hooked, rtol=1e-4, atol=1e-4)


def test_an_unreadable_repair_source_fails_before_the_selection(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    args = ["prune", "--model", str(tiny_model_dir), "--remove", "2", "--repair", "--seq-len", "24", "--no-progress"]
    assert main([*args, "--repair-data", str(tmp_path / "missing.txt"), "--output", str(out)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.txt" in err[0], err
    assert not out.exists()


def test_the_callback_refuses_repair_data():
    from hf_blockcbo.callback import BlockRemovalCallback

    with pytest.raises(BlockCBOError, match="leave it unset here"):
        BlockRemovalCallback(BlockRemovalConfig(repair=True, repair_data="other.txt"))


def test_the_renormalised_map_carries_a_linear_map_behind_the_norm():
    """Residuals made exactly as u·T with T = diag(1/γ)·Q·diag(s*) (Q orthogonal), which x̂(y·A)·s can express while
    the start A = diag(γ)·T, with its scale in closed form, does not: the fit drives the error to ~0."""
    from hf_blockcbo.repair.forms import NormalEquations, rms_normalise, solve_renormalised

    gen = torch.Generator().manual_seed(0)
    d, n, eps = 8, 600, 1e-6
    y = torch.randn(n, d, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 3.0, d, dtype=torch.float64)
    gamma = 0.5 + torch.rand(d, generator=gen, dtype=torch.float64)
    rotation = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    scale_true = 0.2 + 2 * torch.rand(d, generator=gen, dtype=torch.float64)
    u = rms_normalise(y, eps).double() * gamma
    r = u @ (torch.diag(1 / gamma) @ rotation @ torch.diag(scale_true))
    normal = NormalEquations(uu=u.t() @ u, ur=u.t() @ r, rr=float(r.pow(2).sum()))
    start = solve_renormalised(normal, y.float(), r.float(), torch.ones(n, 1), gamma, eps, ridge=0.0, steps=0)
    A, scale, before, after = solve_renormalised(
        normal, y.float(), r.float(), torch.ones(n, 1), gamma, eps, ridge=0.0, steps=200
    )
    assert start[3] > 1e-3 * before  # the start alone is off
    assert after < 1e-5 * before
    fitted = rms_normalise(y.float() @ A.float(), eps) * scale.float()
    torch.testing.assert_close(fitted, r.float(), rtol=0, atol=1e-3)


def test_a_map_form_is_taken_only_where_the_family_folds_it():
    """`kind` overrides the registry's form within the forms a family folds; anything else is one clear error."""
    llama = make_model(_config("llama"))
    with pytest.raises(BlockCBOError, match="'renormalised' repair map does not fold into the 'llama'.*takes linear"):
        fit_repair(llama, REMOVED, _random_calibration(), RepairSettings(kind="renormalised"))
    gemma = make_model(_config("gemma3"))
    with pytest.raises(BlockCBOError, match="'linear' repair map does not fold into the 'gemma'.*diagonal"):
        fit_repair(gemma, REMOVED, _random_calibration(), RepairSettings(kind="linear"))
    diagonal = fit_repair(gemma, REMOVED, _random_calibration(), RepairSettings(kind="diagonal"))
    assert diagonal.kind == "diagonal" and [m.matrix.dim() for m in diagonal.maps] == [1, 1]


def test_the_map_form_is_a_setting_of_every_repairing_verb_and_is_checked_before_the_selection(
    tiny_model_dir, tmp_path, capsys
):
    """`repair_kind` reaches the CLI with its choices; a form the family cannot fold fails in one line before any
    selection work, and writes nothing."""
    from hf_blockcbo.commands.cli import build_parser

    with pytest.raises(BlockCBOError, match="repair_kind must be one of auto, linear, diagonal, rotation, renorm"):
        BlockRemovalConfig(repair_kind="affine")
    assert BlockRemovalConfig.from_dict(BlockRemovalConfig(repair_kind="diagonal").to_dict()).repair_kind == "diagonal"
    parser = build_parser()
    for verb, required in (("prune", ["--output", "o"]), ("compare", ["--remove", "2", "--output-dir", "o"])):
        assert (
            parser.parse_args([verb, "--model", "m", *required, "--repair-kind", "diagonal"]).repair_kind == "diagonal"
        )
    out = tmp_path / "pruned"
    args = ["prune", "--model", str(tiny_model_dir), "--remove", "2", "--repair", "--seq-len", "24", "--no-progress"]
    assert main([*args, "--repair-kind", "renormalised", "--output", str(out)]) != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # beside the loading bar
    assert len(errors) == 1 and "'renormalised' repair map does not fold" in errors[0], errors
    assert "takes linear" in errors[0] and not out.exists()


def test_the_repair_settings_are_one_checked_object_with_the_configs_defaults():
    """Every face passes `config.repair_settings` down; its defaults are the config's and a bad value is one line,
    whether it comes through the config or is built directly."""
    assert BlockRemovalConfig().repair_settings == RepairSettings()
    config = BlockRemovalConfig(repair_ridge=0.05, repair_weighting="relative", repair_kind="diagonal")
    assert config.repair_settings == RepairSettings(0.05, "relative", "diagonal")
    for bad, message, through_the_config in (
        ({"ridge": -1.0}, "repair_ridge must be a number >= 0, got -1.0", None),
        ({"ridge": True}, "repair_ridge must be a number >= 0, got True", "`repair_ridge` must be float, got True"),
        ({"weighting": "l2"}, "repair_weighting must be one of uniform, relative, got 'l2'", None),
        ({"kind": "affine"}, "repair_kind must be one of auto, linear, diagonal, rotation, renormalised", None),
    ):
        with pytest.raises(BlockCBOError, match=message):
            RepairSettings(**bad)
        with pytest.raises(BlockCBOError, match=re.escape(through_the_config or message)):
            BlockRemovalConfig(**{f"repair_{key}": value for key, value in bad.items()})


@pytest.fixture(scope="module")
def tiny_gemma3_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny_gemma3")
    make_model(tiny_gemma3_config(vocab_size=len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_auto_takes_the_familys_start_for_training_only_where_training_follows(tiny_gemma3_dir, tmp_path, monkeypatch):
    """`auto` fits Gemma's renormalised map for a training-free repair, and its diagonal scale (the better start
    for distillation) under `prune --heal`; a form the user names is kept; families with one form are unchanged."""
    from hf_blockcbo.commands import prune as prune_command
    from hf_blockcbo.repair.least_squares import kind_before_training

    gemma, llama = make_model(_config("gemma3")), make_model(tiny_llama_config())
    assert kind_before_training(gemma, "auto") == "diagonal"
    assert kind_before_training(gemma, "renormalised") == "renormalised"
    assert kind_before_training(llama, "auto") == "auto"

    records = {}

    def healed(args, student, teacher):  # the pruned folder healing would start from, before it is cleaned up
        records[args.output] = json.loads((Path(student) / "block_removal.json").read_text())

    monkeypatch.setattr(prune_command, "run_heal", healed)
    base = ["prune", "--model", str(tiny_gemma3_dir), "--blocks", "2,3", "--repair", "--repair-samples", "8"]
    base += ["--seq-len", "24", "--no-progress", "--no-repair-check"]  # the form fitted, whatever it does here
    for name, extra in (("plain", []), ("heal", ["--heal"]), ("named", ["--heal", "--repair-kind", "renormalised"])):
        out = tmp_path / name
        assert main([*base, *extra, "--output", str(out)]) == 0
        if not extra:
            records[str(out)] = json.loads((out / "block_removal.json").read_text())
    kinds = {Path(k).name: (r["repair"]["kind"], r["config"]["repair_kind"]) for k, r in records.items()}
    assert kinds == {
        "plain": ("renormalised", "auto"),
        "heal": ("diagonal", "diagonal"),
        "named": ("renormalised", "renormalised"),
    }


def test_the_callbacks_removal_repairs_with_the_start_for_training(tiny_gemma3_dir, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from hf_blockcbo import BlockRemovalCallback
    from hf_blockcbo.data import build_calibration_set

    model = AutoModelForCausalLM.from_pretrained(tiny_gemma3_dir)
    rows = [{"input_ids": ids.tolist()} for ids in build_calibration_set(tokenizer, None, 16, 16).input_ids]
    config = BlockRemovalConfig(num_remove=2, top_k=3, curvature="empirical", repair=True)
    callback = BlockRemovalCallback(config, at="train_begin", remove_at_step=1)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_steps=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[callback]).train()
    assert callback.removed is not None and callback.repair["kind"] == "diagonal"


def _prune_repaired(model_dir, out, *extra):
    args = ["prune", "--model", str(model_dir), "--blocks", "2,3", "--repair", "--repair-samples", "4"]
    return main([*args, "--seq-len", "24", "--validation-samples", "4", "--no-progress", *extra, "--output", str(out)])


def _validation_perplexities(model_dir, blocks, repair_scale: float) -> tuple[float, float]:
    """The pruned model's validation perplexity (the check's windows) without and with its repair, maps scaled by
    ``repair_scale``, measured here directly."""
    from hf_blockcbo.data import repair_samples
    from hf_blockcbo.models import load_model, resolve_model
    from hf_blockcbo.pipeline import validation_samples

    config = BlockRemovalConfig(blocks=blocks, repair=True, repair_samples=4, seq_len=24, validation_samples=4)
    model, tokenizer = load_model(resolve_model(str(model_dir), None))
    repair = fit_repair(model, blocks, repair_samples(tokenizer, config), config.repair_settings)
    for m in repair.maps:
        m.matrix = m.matrix * repair_scale
    validation = validation_samples(tokenizer, config)
    with repair.applied(model):
        repaired = perplexity(model, validation, blocks)
    return perplexity(model, validation, blocks), repaired


def test_the_repair_check_folds_a_repair_that_lowers_validation_perplexity(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert _prune_repaired(tiny_model_dir, out) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "block_removal.json").read_text())
    check = record["repair"]["validation"]
    unrepaired, repaired = _validation_perplexities(tiny_model_dir, [2, 3], 1.0)
    assert check["kept"] is True and check["data"] == "embedded:validation" and check["samples"] == 4
    assert check["perplexity_unrepaired"] == pytest.approx(unrepaired, rel=1e-6)
    assert check["perplexity_repaired"] == pytest.approx(repaired, rel=1e-6) and repaired < unrepaired
    assert f"from {unrepaired:.2f} to {repaired:.2f}" in printed and "repair_rejected" not in record
    from hf_blockcbo.hub.publish import model_card

    assert f"from {unrepaired:.2f} to {repaired:.2f}" in str(model_card(out, "tester/x"))


def test_the_repair_check_keeps_the_model_unrepaired_when_the_repair_hurts(
    tiny_model_dir, tmp_path, capsys, caplog, monkeypatch
):
    """A repair that raises validation perplexity (here: the fitted maps negated) is not folded: the saved
    weights are those of the plain removal, the provenance keeps it under `repair_rejected`, prune says so in one
    line and the card says the weights are unrepaired. `--no-repair-check` folds it anyway."""
    from hf_blockcbo.hub.publish import model_card
    from hf_blockcbo.repair import least_squares

    real_fit = least_squares.fit_repair

    def harmful_fit(*args, **kwargs):
        repair = real_fit(*args, **kwargs)
        for m in repair.maps:
            m.matrix = -m.matrix
        return repair

    monkeypatch.setattr(least_squares, "fit_repair", harmful_fit)
    unrepaired, repaired = _validation_perplexities(tiny_model_dir, [2, 3], -1.0)
    assert repaired > unrepaired
    plain, checked, unchecked = tmp_path / "plain", tmp_path / "checked", tmp_path / "unchecked"
    args = ["prune", "--model", str(tiny_model_dir), "--blocks", "2,3", "--seq-len", "24", "--no-progress"]
    assert main([*args, "--output", str(plain)]) == 0
    caplog.clear()
    assert _prune_repaired(tiny_model_dir, checked) == 0
    printed = capsys.readouterr()
    (warning,) = [r.getMessage() for r in caplog.records if "repair" in r.getMessage()]  # one line, no echo
    assert warning.startswith(
        "not repaired: the repair did not lower the validation perplexity on embedded:validation "
        f"({unrepaired:.2f} → {repaired:.2f})"
    )
    assert "--repair-data" in warning and "--no-repair-check" in warning
    assert "Repaired" not in printed.out and "The repair lowered" not in printed.out
    assert "not repaired" not in (printed.out + printed.err).lower()  # the warning is the only line of it
    record = json.loads((checked / "block_removal.json").read_text())
    assert record["repair"] is None and record["repair_rejected"]["validation"]["kept"] is False
    assert record["repair_rejected"]["validation"]["perplexity_repaired"] == pytest.approx(repaired, rel=1e-6)
    from safetensors.torch import load_file

    def weights(folder):
        return load_file(folder / "model.safetensors")

    expected, got = weights(plain), weights(checked)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    card = str(model_card(checked, "tester/x"))
    assert "not applied" in card and "these weights are the\npruned model's, unrepaired" in card

    assert _prune_repaired(tiny_model_dir, unchecked, "--no-repair-check") == 0
    record = json.loads((unchecked / "block_removal.json").read_text())
    assert "validation" not in record["repair"] and "repair_rejected" not in record
    got = weights(unchecked)
    assert not all(torch.equal(expected[k], got[k]) for k in expected), "--no-repair-check folds the repair"


def test_the_repair_check_is_a_repair_flag(tiny_model_dir, tmp_path, capsys):
    """`--no-repair-check` without `--repair` is refused like every repair flag (one line, nothing written)."""
    out = tmp_path / "out"
    args = ["prune", "--model", str(tiny_model_dir), "--blocks", "2,3", "--repair-check", "--output", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--repair-check" in err and "--repair" in err and not out.exists()
    assert BlockRemovalConfig().repair_check is True
    with pytest.raises(BlockCBOError, match="`repair_check` must be bool, got 'yes'"):
        BlockRemovalConfig(repair_check="yes")
    from hf_blockcbo.commands.cli import build_parser

    parser = build_parser()  # prune folds, so it checks; compare measures both and folds nothing: no such flag
    assert parser.parse_args(["prune", "--model", "m", "--output", "o", "--no-repair-check"]).repair_check is False
    with pytest.raises(SystemExit):
        parser.parse_args(["compare", "--model", "m", "--remove", "2", "--output-dir", "o", "--no-repair-check"])
    assert "unrecognized arguments: --no-repair-check" in capsys.readouterr().err


def test_the_repair_check_reuses_the_selections_validation_perplexity(tiny_model_dir, tmp_path):
    """Where validation selection scored the unrepaired pick on the same windows, the check takes that figure
    instead of measuring it again; repair-aware selection scored it repaired, so the check measures it."""
    base = ["prune", "--model", str(tiny_model_dir), "--remove", "2", "--repair", "--repair-samples", "4"]
    base += ["--seq-len", "24", "--num-samples", "4", "--top-k", "3", "--validation-samples", "4", "--no-progress"]
    records = {}
    for name, extra in (("plain", ["--no-repair-aware"]), ("aware", [])):
        assert main([*base, *extra, "--output", str(tmp_path / name)]) == 0
        record = json.loads((tmp_path / name / "block_removal.json").read_text())
        records[name] = record, (record["repair"] or record["repair_rejected"])["validation"]
    record, check = records["plain"]
    assert check["perplexity_unrepaired"] == record["validation_perplexity"]
    record, check = records["aware"]
    assert check["perplexity_repaired"] == pytest.approx(record["validation_perplexity"], rel=1e-5)
    assert check["perplexity_unrepaired"] != record["validation_perplexity"]
