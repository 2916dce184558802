"""Bootstrap stability: the ground state's and the validation pick's, each against a direct re-solve and reselection."""

import numpy as np
import pytest
import torch

from hf_blockcbo.config import BlockRemovalConfig
from hf_blockcbo.data import CalibrationSet
from hf_blockcbo.errors import BlockCBOError
from hf_blockcbo.hessian.artifact import HessianArtifact
from hf_blockcbo.selection.diagnose import bootstrap_stability
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
