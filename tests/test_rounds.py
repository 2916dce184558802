"""Rounds: the measured damage re-expanded around a state is exact there and at every swap, and the pipeline uses it."""

import itertools

import pytest
import torch

from hf_blockcbo.config import BlockRemovalConfig
from hf_blockcbo.data import CalibrationSet
from hf_blockcbo.errors import BlockCBOError
from hf_blockcbo.hessian.measured import measure_expansion
from hf_blockcbo.models import ModelSource
from hf_blockcbo.pipeline import calibrate, choose_blocks
from hf_blockcbo.selection.rounds import refine_by_rounds
from hf_blockcbo.solvers.dispatch import solve_artifact
from hf_blockcbo.surgery.gates import BlockGates


def _samples(m=4, width=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (m, width), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = 0
    return CalibrationSet(ids, mask, source="test")


def _direct_kl(model, cal, removed):
    """Mean per-token KL(unpruned ‖ pruned), each sample's mean over its targets, averaged over samples."""
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=cal.input_ids, attention_mask=cal.attention_mask).logits, -1)
        with BlockGates(model) as gates:
            gates.set_removed(list(removed))
            out = torch.log_softmax(model(input_ids=cal.input_ids, attention_mask=cal.attention_mask).logits, -1)
    token = (ref.exp() * (ref - out)).sum(-1)[:, :-1]
    valid = (cal.attention_mask[:, 1:] * cal.attention_mask[:, :-1]).double()
    return float(((token.double() * valid).sum(1) / valid.sum(1)).mean())


def _energy(q, state):
    idx = list(state)
    return float(q[idx][:, idx].sum())


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
def test_expansion_is_exact_at_the_centre_and_at_every_swap(fixture, request):
    model = request.getfixturevalue(fixture)
    cal = _samples()
    centre = [1, 3, 4]
    expansion = measure_expansion(model, cal, centre, batch_size=2, pairs=None, progress=False, log=lambda _: None)
    q = expansion.energy_matrix()
    n = q.shape[0]
    assert torch.allclose(q, q.T)
    assert _energy(q, centre) == pytest.approx(_direct_kl(model, cal, centre), rel=1e-4, abs=1e-7)
    outside = [b for b in range(n) if b not in centre]
    for out, into in itertools.product(centre, outside):
        state = sorted(set(centre) - {out} | {into})
        assert _energy(q, state) == pytest.approx(_direct_kl(model, cal, state), rel=1e-4, abs=1e-7), state
    # every state one flip away and every pair of flips was measured once (the unpruned model needs no forward)
    assert expansion.configurations == 1 + n + n * (n - 1) // 2


def test_a_one_swap_expansion_measures_only_swaps_and_is_exact_on_them(tiny_llama):
    cal = _samples()
    centre = [1, 3, 4]
    expansion = measure_expansion(
        tiny_llama, cal, centre, batch_size=2, pairs=None, progress=False, log=lambda _: None, swaps=1
    )
    q = expansion.energy_matrix()
    n = q.shape[0]
    outside = [b for b in range(n) if b not in centre]
    assert _energy(q, centre) == pytest.approx(_direct_kl(tiny_llama, cal, centre), rel=1e-4, abs=1e-7)
    for out, into in itertools.product(centre, outside):
        state = sorted(set(centre) - {out} | {into})
        assert _energy(q, state) == pytest.approx(_direct_kl(tiny_llama, cal, state), rel=1e-4, abs=1e-7), state
    assert expansion.configurations == 1 + n + len(centre) * len(outside)  # no pair inside or outside the centre
    assert bool(torch.isnan(expansion.flip_pair[:, 1, 3]).all()) and bool(
        torch.isnan(expansion.flip_pair[:, 0, 2]).all()
    )


def test_expansion_pairs_keep_the_centre_and_the_least_damaging_additions(tiny_llama):
    cal = _samples(m=2)
    expansion = measure_expansion(tiny_llama, cal, [0, 5], pairs=3, progress=False, log=lambda _: None)
    additions = [b for b in expansion.flip.mean(0).argsort().tolist() if b not in (0, 5)]
    assert expansion.flip_blocks == sorted([0, 5, *additions[:2]])  # at least two outside blocks
    q = expansion.energy_matrix()
    for into in additions[:2]:
        for out in (0, 5):
            state = sorted({0, 5} - {out} | {into})
            assert _energy(q, state) == pytest.approx(_direct_kl(tiny_llama, cal, state), rel=1e-4, abs=1e-7)


def test_a_bootstrap_draw_of_every_row_is_the_full_expansion(tiny_llama):
    cal = _samples()
    expansion = measure_expansion(tiny_llama, cal, [2, 3], progress=False, log=lambda _: None)
    assert torch.allclose(expansion.energy_matrix(torch.arange(len(cal))), expansion.energy_matrix())
    assert not torch.allclose(expansion.energy_matrix(torch.tensor([0, 0, 0, 0])), expansion.energy_matrix())


def test_bad_centres_are_refused(tiny_llama):
    for centre in ([], [9]):
        with pytest.raises(BlockCBOError, match="centre"):
            measure_expansion(tiny_llama, _samples(m=2), centre, progress=False)


def _source():
    return ModelSource(model_id="tiny", revision=None, base_model=None, path="tiny")


@pytest.mark.parametrize("swaps", [1, 2])
def test_rounds_end_at_a_ground_state_that_no_swap_improves(swaps, tiny_llama, tokenizer):
    cal = _samples()
    config = BlockRemovalConfig(num_samples=4, seq_len=10, batch_size=4, measured_samples=4, num_remove=3, top_k=4)
    artifact = calibrate(tiny_llama, tokenizer, config, _source(), progress=False, calibration=cal)
    first = solve_artifact(artifact, config)
    rounds = config.replace(measured_rounds=4, measured_round_swaps=swaps)  # the trust region from the config
    result, records = refine_by_rounds(tiny_llama, artifact, rounds, cal, first, False)
    assert 1 <= len(records) <= 4
    assert records[0]["centre"] == list(first.candidates[0].blocks)
    for earlier, later in zip(records, records[1:], strict=False):
        assert later["centre"] == earlier["ground_state"]
    for record in records:  # the trust region: a round moves at most `swaps` swaps
        assert len(set(record["ground_state"]) - set(record["centre"])) <= record["swaps"] == swaps
    ground = list(result.candidates[0].blocks)
    assert ground == records[-1]["ground_state"]
    if ground == records[-1]["centre"]:  # converged: no swap of the ground state is measured to do less damage
        n = artifact.num_blocks
        measured = _direct_kl(tiny_llama, cal, ground)
        for out, into in itertools.product(ground, [b for b in range(n) if b not in ground]):
            assert _direct_kl(tiny_llama, cal, sorted(set(ground) - {out} | {into})) >= measured - 1e-7


def test_rounds_are_recorded_and_off_for_the_papers_estimator(tiny_llama, tokenizer):
    cal_config = dict(num_samples=4, seq_len=16, batch_size=4, measured_samples=4, num_remove=2, top_k=3)
    config = BlockRemovalConfig(measured_rounds=1, measured_round_trigger=0, select="energy", **cal_config)
    selection, artifact = choose_blocks(tiny_llama, tokenizer, config, _source(), progress=False)
    rounds = selection.solver["rounds"]
    assert len(rounds) == 1 and rounds[0]["configurations"] > 0
    assert list(selection.blocks) == rounds[0]["ground_state"]
    paper = config.replace(curvature="empirical")
    selection, _ = choose_blocks(tiny_llama, tokenizer, paper, _source(), progress=False)
    assert "rounds" not in selection.solver


def test_measured_rounds_must_be_a_count():
    for bad in (-1, 1.5, True):
        with pytest.raises(BlockCBOError, match="measured_rounds"):
            BlockRemovalConfig(measured_rounds=bad)
    for bad in (0, 3):
        with pytest.raises(BlockCBOError, match="measured_round_swaps must be 1 or 2"):
            BlockRemovalConfig(measured_round_swaps=bad)
    for bad in (True, "1"):
        with pytest.raises(BlockCBOError, match="measured_round_swaps"):
            BlockRemovalConfig(measured_round_swaps=bad)


def test_the_cli_flag_reaches_the_provenance(tiny_model_dir, tmp_path):
    import json

    from hf_blockcbo.commands.cli import main

    out = tmp_path / "out"
    argv = ["prune", "--model", str(tiny_model_dir), "--remove", "3", "--measured-rounds", "2", "--select", "energy"]
    argv += ["--measured-round-swaps", "1", "--measured-round-trigger", "0"]
    argv += ["--num-samples", "4", "--seq-len", "16", "--batch-size", "4", "--no-progress", "--output", str(out)]
    assert main(argv) == 0
    provenance = json.loads((out / "block_removal.json").read_text())
    rounds = provenance["solver"]["rounds"]
    assert 1 <= len(rounds) <= 2 and provenance["config"]["measured_rounds"] == 2
    assert provenance["config"]["measured_round_swaps"] == 1 and all(r["swaps"] == 1 for r in rounds)
    assert provenance["removed_blocks"] == rounds[-1]["ground_state"]


def test_the_callback_cuts_the_state_the_rounds_end_at(tiny_llama, tokenizer, tmp_path):
    from torch.utils.data import DataLoader
    from transformers import TrainingArguments

    from hf_blockcbo.callback import BlockRemovalCallback

    cal = _samples()
    config = BlockRemovalConfig(num_remove=3, top_k=3, measured_samples=4, measured_rounds=2, measured_round_trigger=0)
    rows = [{"input_ids": i, "attention_mask": m} for i, m in zip(cal.input_ids, cal.attention_mask, strict=True)]
    callback = BlockRemovalCallback(config)
    callback.compute(TrainingArguments(output_dir=str(tmp_path), report_to="none"), tiny_llama, DataLoader(rows, 4))
    first = solve_artifact(callback.artifact, config)
    expected, records = refine_by_rounds(tiny_llama, callback.artifact, config, callback.calibration, first, False)
    callback._remove(tiny_llama, optimizer=None)
    assert callback.removed == list(expected.candidates[0].blocks)
    timeless = [{k: v for k, v in r.items() if k != "seconds"} for r in records]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in callback.rounds] == timeless
    assert tiny_llama.config.num_hidden_layers == 3


def test_state_damage_is_the_directly_measured_kl(tiny_llama):
    from hf_blockcbo.hessian.measured import measure_state_damage

    cal = _samples()
    states = [[1, 3], [0, 4, 5], [1, 3]]
    damage = measure_state_damage(tiny_llama, cal, states, batch_size=3)
    assert damage.shape == (len(cal), len(states))
    for k, state in enumerate(states):
        assert float(damage[:, k].mean()) == pytest.approx(_direct_kl(tiny_llama, cal, state), rel=1e-4, abs=1e-7)
    with pytest.raises(BlockCBOError, match="at least one block"):
        measure_state_damage(tiny_llama, cal, [[]])


def _trigger_setup(tiny_llama, tokenizer, num_remove, pairs=14):
    cal = _samples()
    config = BlockRemovalConfig(
        num_samples=4,
        seq_len=10,
        batch_size=4,
        measured_samples=4,
        num_remove=num_remove,
        top_k=4,
        measured_pairs=pairs,
        measured_rounds=2,
        measured_round_swaps=1,
    )
    artifact = calibrate(tiny_llama, tokenizer, config, _source(), progress=False, calibration=cal)
    return cal, config, artifact


def test_the_trigger_measures_the_ground_state_and_gates_the_rounds(tiny_llama, tokenizer):
    from hf_blockcbo.selection.rounds import solve_with_rounds

    cal, config, artifact = _trigger_setup(tiny_llama, tokenizer, num_remove=3)
    first = solve_artifact(artifact, config)
    ground = list(first.candidates[0].blocks)
    measured = _direct_kl(tiny_llama, cal, ground)
    miss = abs(measured - first.candidates[0].energy) / measured
    assert miss > 1e-3  # three removed blocks interact: the pairwise expansion is off at M = 3

    lenient = config.replace(measured_round_trigger=miss * 2)  # the miss is under the trigger: no round runs
    result, records = solve_with_rounds(tiny_llama, artifact, lenient, lambda: cal, progress=False)
    assert [r["round"] for r in records] == [0] and records[0]["rounds_run"] is False
    assert records[0]["state"] == ground and records[0]["measured"] == pytest.approx(measured, rel=1e-4)
    assert records[0]["miss"] == pytest.approx(miss, rel=1e-3)
    assert [c.blocks for c in result.candidates] == [c.blocks for c in first.candidates]

    strict = config.replace(measured_round_trigger=miss / 2)  # over the trigger: the rounds run as without one
    result, records = solve_with_rounds(tiny_llama, artifact, strict, lambda: cal, progress=False)
    assert records[0]["round"] == 0 and records[0]["rounds_run"] is True
    always = config.replace(measured_round_trigger=0)
    untriggered, plain = solve_with_rounds(tiny_llama, artifact, always, lambda: cal, progress=False)
    timeless = [{k: v for k, v in r.items() if k != "seconds"} for r in plain]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in records[1:]] == timeless
    assert [c.blocks for c in result.candidates] == [c.blocks for c in untriggered.candidates]


def test_the_trigger_never_fires_where_the_expansion_is_exact(tiny_llama, tokenizer):
    from hf_blockcbo.selection.rounds import solve_with_rounds

    cal, config, artifact = _trigger_setup(tiny_llama, tokenizer, num_remove=2, pairs=None)
    config = config.replace(measured_round_trigger=1e-3)
    _, records = solve_with_rounds(tiny_llama, artifact, config, lambda: cal, progress=False)
    assert len(records) == 1 and records[0]["miss"] < 1e-4 and records[0]["rounds_run"] is False


def test_the_trigger_is_a_fraction_and_reaches_the_provenance(tiny_model_dir, tmp_path):
    import json

    from hf_blockcbo.commands.cli import main

    for bad in (-0.1, True, "0.1", float("inf"), float("nan")):
        with pytest.raises(BlockCBOError, match="measured_round_trigger"):
            BlockRemovalConfig(measured_round_trigger=bad)
    out = tmp_path / "out"
    argv = ["prune", "--model", str(tiny_model_dir), "--remove", "3", "--measured-rounds", "2", "--select", "energy"]
    argv += ["--measured-round-trigger", "1e9", "--num-samples", "4", "--seq-len", "16", "--batch-size", "4"]
    assert main([*argv, "--no-progress", "--output", str(out)]) == 0
    provenance = json.loads((out / "block_removal.json").read_text())
    (check,) = provenance["solver"]["rounds"]
    assert (
        check["round"] == 0 and check["rounds_run"] is False and provenance["config"]["measured_round_trigger"] == 1e9
    )
    assert provenance["removed_blocks"] == check["state"]
