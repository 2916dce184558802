"""Bootstrap stability: the ground state's and the validation pick's, each against a direct re-solve and reselection;
the ground state's lead over its runner-up, paired over the calibration rows."""

import math

import numpy as np
import pytest
import torch

from hf_blockcbo.config import BlockRemovalConfig
from hf_blockcbo.data import CalibrationSet
from hf_blockcbo.errors import BlockCBOError
from hf_blockcbo.hessian.artifact import HessianArtifact
from hf_blockcbo.selection.diagnose import bootstrap_stability, ground_margin
from hf_blockcbo.selection.validation import select_by_validation
from hf_blockcbo.solvers.dispatch import solve_artifact


def _samples(m, width=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (m, width), generator=g)
    return CalibrationSet(ids, torch.ones_like(ids), source="test")


@pytest.fixture
def setting(tiny_llama):
    """Few, noisy gradient rows: resamples disagree, so the kept shares are neither 0 nor 1."""
    g = torch.Generator().manual_seed(5)
    artifact = HessianArtifact(
        A=torch.randn(5, 6, generator=g) + 0.3,
        block_names=[f"model.layers.{i}" for i in range(6)],
        block_kinds=["attention"] * 6,
        metadata={"curvature": "empirical"},
    )
    config = BlockRemovalConfig(curvature="empirical", seq_len=12, batch_size=4, num_remove=2, top_k=4)
    return tiny_llama, config, artifact, _samples(4, seed=1)


def _direct(model, config, artifact, validation, draws, seed):
    """The same resamples (same seeded rows), each re-solved and reselected through the pipeline's own selection."""

    def choose(art):
        candidates = solve_artifact(art, config).candidates
        best, _ = select_by_validation(
            model, candidates, validation, config.batch_size, progress=False, metric=config.validation_metric
        )
        return candidates[0].blocks, best.blocks

    base_ground, base_pick = choose(artifact)
    rng = np.random.default_rng(seed)
    grounds, picks = 0, 0
    for _ in range(draws):
        rows = rng.integers(0, artifact.num_samples, size=artifact.num_samples)
        resampled = artifact.resampled(rows)
        ground, pick = choose(resampled)
        grounds += ground == base_ground
        picks += pick == base_pick
    return grounds / draws, picks / draws, base_pick


@pytest.mark.parametrize("metric", ["perplexity", "kl"])
def test_the_pick_kept_is_that_of_a_direct_reselection(setting, metric):
    model, config, artifact, validation = setting
    config = config.replace(validation_metric=metric)
    stability = bootstrap_stability(artifact, config, draws=6, seed=3, model=model, validation=validation)
    ground, pick, chosen = _direct(model, config, artifact, validation, draws=6, seed=3)
    assert stability.ground_kept == pytest.approx(ground)
    assert stability.pick_kept == pytest.approx(pick) and stability.pick == chosen
    assert 4 <= stability.states_validated <= 4 * 7  # every distinct state of the 7 top-Ks, each validated once
    plain = bootstrap_stability(artifact, config, draws=6, seed=3)
    assert plain.pick_kept is None and plain.pick is None and plain.ground_kept == stability.ground_kept


def test_the_pick_needs_both_the_model_and_the_validation(setting):
    model, config, artifact, validation = setting
    with pytest.raises(BlockCBOError, match="both the model and the validation"):
        bootstrap_stability(artifact, config, draws=2, model=model)
    with pytest.raises(BlockCBOError, match="both the model and the validation"):
        bootstrap_stability(artifact, config, draws=2, validation=validation)


def _measured(q_samples):
    n = q_samples.shape[-1]
    return HessianArtifact(
        A=None,
        Q_samples=q_samples,
        block_names=[f"model.layers.{i}" for i in range(n)],
        block_kinds=["attention"] * n,
        metadata={"curvature": "measured"},
    )


@pytest.mark.parametrize("curvature, beta", [("empirical", 0.0), ("empirical", 0.7), ("fisher", 0.0), ("measured", 0)])
def test_the_rows_energies_average_to_the_energy_of_each_state(curvature, beta):
    g = torch.Generator().manual_seed(2)
    if curvature == "measured":
        q = torch.randn(7, 5, 5, generator=g, dtype=torch.float64)
        artifact = _measured(q + q.transpose(1, 2))
    else:
        artifact = HessianArtifact(
            A=torch.randn(7, 5, generator=g),
            block_names=[f"model.layers.{i}" for i in range(5)],
            block_kinds=["attention"] * 5,
            metadata={"curvature": curvature},
        )
    states = [(0, 1), (1, 3), (2, 3, 4), (4,)]
    rows = artifact.row_energies(states, beta)
    q = artifact.energy_matrix(beta)
    assert rows.shape == (7, 4)
    for k, state in enumerate(states):
        assert rows[:, k].mean().item() == pytest.approx(q[list(state)][:, list(state)].sum().item(), rel=1e-9)
    one_row = artifact.resampled([3]).row_energies(states, beta)  # a single row is that row's own energy
    if curvature == "measured":
        assert torch.allclose(one_row[0], rows[3])


def test_beta_is_refused_for_the_rows_of_an_estimator_without_a_data_gradient():
    artifact = _measured(torch.eye(4, dtype=torch.float64).expand(3, 4, 4).clone())
    with pytest.raises(BlockCBOError, match="beta"):
        artifact.row_energies([(0, 1)], beta=1.0)


def test_the_lead_is_paired_over_the_rows_and_a_tie_is_named():
    # rows: per-block damages; block 0 and 1 are cheapest, 0 by 0.01 on average, noisy across rows
    base = torch.tensor([0.20, 0.21, 0.5, 0.6], dtype=torch.float64)
    noise = torch.tensor([[0.0, 0.05], [0.0, -0.05], [0.02, 0.0], [-0.02, 0.0]], dtype=torch.float64)
    diag = base.expand(4, 4).clone()
    diag[:, :2] += noise
    tie = _measured(torch.diag_embed(diag))
    config = BlockRemovalConfig(curvature="measured", num_remove=1, top_k=3)
    states = [c.blocks for c in solve_artifact(tie, config).candidates]
    assert states[:2] == [(0,), (1,)]
    margin = ground_margin(tie, config, states)
    difference = (diag[:, 1] - diag[:, 0]).numpy()
    assert margin.runner_up == (1,) and margin.lead == pytest.approx(0.01)
    assert margin.standard_error == pytest.approx(difference.std(ddof=1) / math.sqrt(4))
    assert not margin.resolved  # 0.01 against a standard error of ~0.03
    assert bootstrap_stability(tie, config, draws=200, seed=0).ground_kept < 0.9  # and the bootstrap agrees
    quiet = base.expand(4, 4).clone()
    quiet[:, :2] += 0.001 * noise  # the same lead, little noise
    clear = _measured(torch.diag_embed(quiet))
    margin = ground_margin(clear, config, [c.blocks for c in solve_artifact(clear, config).candidates])
    assert margin.resolved and margin.lead == pytest.approx(0.01)
    assert bootstrap_stability(clear, config, draws=200, seed=0).ground_kept == 1.0
    assert ground_margin(clear, config, states[:1]) is None  # no runner-up
    assert ground_margin(clear.resampled([0]), config, states) is None  # one row: no spread to pair


def _planted(model, diag):
    from hf_blockcbo.surgery.architectures import describe_blocks

    blocks = describe_blocks(model)
    return HessianArtifact(
        A=None,
        Q_samples=torch.diag_embed(diag),
        block_names=[b.name for b in blocks],
        block_kinds=[b.kind for b in blocks],
        metadata={"curvature": "measured"},
    )


def test_prune_records_the_lead_and_warns_where_the_energy_alone_picks_a_tie(tiny_model_dir, caplog):
    from hf_blockcbo.models import load_model, resolve_model
    from hf_blockcbo.pipeline import choose_blocks

    source = resolve_model(str(tiny_model_dir), None)
    model, tokenizer = load_model(source)
    n = model.config.num_hidden_layers
    diag = torch.linspace(0.2, 0.8, n, dtype=torch.float64).expand(4, n).clone()
    diag[:, 1] = diag[:, 0] + torch.tensor([0.06, -0.04, -0.01, 0.03], dtype=torch.float64)  # a noisy runner-up
    config = BlockRemovalConfig(num_remove=1, top_k=3, select="energy", curvature="measured", measured_rounds=0)
    with caplog.at_level("WARNING", logger="hf_blockcbo.pipeline"):
        tie, _ = choose_blocks(model, tokenizer, config, source, _planted(model, diag), progress=False)
    lead = tie.solver["ground_lead"]
    assert tie.blocks == [0] and lead["runner_up"] == [1] and not lead["resolved"]
    assert lead["lead"] == pytest.approx(0.01) and "a tie at this calibration size" in caplog.text
    caplog.clear()
    diag[:, 1] = diag[:, 0] + 0.01  # the same lead, the same on every row
    with caplog.at_level("WARNING", logger="hf_blockcbo.pipeline"):
        clear, _ = choose_blocks(model, tokenizer, config, source, _planted(model, diag), progress=False)
    assert clear.solver["ground_lead"]["resolved"] and "a tie" not in caplog.text


def test_the_callbacks_cut_records_the_lead_and_warns_on_a_tie(tiny_llama, caplog):
    from hf_blockcbo.callback import BlockRemovalCallback

    n = tiny_llama.config.num_hidden_layers
    diag = torch.linspace(0.2, 0.8, n, dtype=torch.float64).expand(4, n).clone()
    diag[:, 1] = diag[:, 0] + torch.tensor([0.06, -0.04, -0.01, 0.03], dtype=torch.float64)
    callback = BlockRemovalCallback(BlockRemovalConfig(num_remove=1, top_k=3, measured_rounds=0))
    callback.artifact = _planted(tiny_llama, diag)
    with caplog.at_level("WARNING", logger="hf_blockcbo.pipeline"):
        callback._remove(tiny_llama, optimizer=None)
    assert callback.removed == [0] and callback.ground_lead["runner_up"] == [1]
    assert not callback.ground_lead["resolved"] and "a tie at this calibration size" in caplog.text
