"""Curvature estimators: how the N×N energy matrix of CBO is estimated, one registry, one setting (``curvature``).

- ``empirical``: the paper's Eq. 6. Rows are gradients of each sample's mean cross-entropy on the data's next tokens
  w.r.t. the gates, H = AᵀA/m. Its mean gradient g enters H as ggᵀ, so low energy can mean *cancelling* gradients.
- ``fisher``: the Fisher information of the model's own predictive distribution. Targets are drawn (seeded) from the
  unpruned model, rows are gradients of (1/√T)·Σ_t −log p(ŷ_t); E[H] is the Hessian at α = 1 of the mean per-token
  KL(unpruned ‖ gated). PSD, zero mean gradient in expectation, no ggᵀ artefact. Same cost as ``empirical``.
- ``measured``: the damage itself, measured: D(e_i) and D(e_i + e_j) (mean per-token KL) for every single and pair
  removal (pairs among the ``measured_pairs`` least damaging blocks), forward passes only; xᵀQx is exact for every
  single and pair removal. See :mod:`hf_blockcbo.hessian.measured`.

Solvers, spectrum, selection, plots, card and Space consume the resulting matrix unchanged. A new estimator is one
``@register_curvature`` function here; no verb changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import BlockCBOError


if TYPE_CHECKING:  # the registry itself imports no torch: `--help` lists the estimators instantly
    import torch
    from torch import nn

    from ..data import CalibrationSet


@dataclass
class CurvatureJob:
    """What an estimator gets: the model, its shard of calibration samples and the run's settings."""

    model: nn.Module
    calibration: CalibrationSet
    config: object  # BlockRemovalConfig
    gate: str
    block_names: list[str]
    progress: bool = True
    checkpoint: object | None = None
    checkpoint_every: int = 0
    first_index: int = 0
    lockstep: bool = False


@dataclass
class CurvatureTerms:
    """An estimator's per-sample terms: gradient rows ``A`` or energy matrices ``Q_samples``, and what to record."""

    A: torch.Tensor | None = None
    Q_samples: torch.Tensor | None = None
    losses: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CurvatureEstimator:
    name: str
    run: Callable[[CurvatureJob], CurvatureTerms]
    shardable: bool  # rows are per sample: processes split the samples and rows are gathered


_CURVATURES: dict[str, CurvatureEstimator] = {}


def register_curvature(name: str, shardable: bool = True):
    def wrap(fn: Callable[[CurvatureJob], CurvatureTerms]):
        _CURVATURES[name] = CurvatureEstimator(name, fn, shardable)
        return fn

    return wrap


def available_curvatures() -> list[str]:
    return list(_CURVATURES)


def get_curvature(name: str) -> CurvatureEstimator:
    if name not in _CURVATURES:
        raise BlockCBOError(f"unknown curvature {name!r}; choose one of {', '.join(available_curvatures())}")
    return _CURVATURES[name]


def _gradient_rows(job: CurvatureJob, fisher_seed: int | None) -> CurvatureTerms:
    from .gradients import compute_gate_gradients

    A, losses = compute_gate_gradients(
        job.model,
        job.calibration,
        batch_size=job.config.batch_size,
        gate=job.gate,
        progress=job.progress,
        block_names=job.block_names,
        checkpoint=job.checkpoint,
        checkpoint_every=job.checkpoint_every,
        first_index=job.first_index,
        lockstep=job.lockstep,
        fisher_seed=fisher_seed,
    )
    return CurvatureTerms(A=A, losses=losses)


@register_curvature("empirical")
def empirical_curvature(job: CurvatureJob) -> CurvatureTerms:
    """The paper's Eq. 6: gradients of the data cross-entropy, H = AᵀA/m."""
    return _gradient_rows(job, fisher_seed=None)


@register_curvature("fisher")
def fisher_curvature(job: CurvatureJob) -> CurvatureTerms:
    """Gradients of the log-likelihood of targets drawn from the unpruned model (seed: ``config.seed``)."""
    terms = _gradient_rows(job, fisher_seed=job.config.seed)
    terms.metadata["fisher_seed"] = str(job.config.seed)
    return terms


@register_curvature("measured", shardable=False)
def measured_curvature(job: CurvatureJob) -> CurvatureTerms:
    """Pairwise expansion of the measured damage over the first ``measured_samples`` calibration samples."""
    from ..data import CalibrationSet
    from .measured import measure_damage

    config = job.config
    count = min(len(job.calibration), config.measured_samples)
    subset = CalibrationSet(
        job.calibration.input_ids[:count], job.calibration.attention_mask[:count], job.calibration.source
    )
    damage = measure_damage(
        job.model,
        subset,
        gate=job.gate,
        batch_size=config.batch_size,
        pairs=config.measured_pairs,
        progress=job.progress,
        log=(lambda line: print(line, flush=True)) if job.progress else (lambda line: None),
    )
    other = "ce" if config.damage == "kl" else "kl"
    return CurvatureTerms(
        Q_samples=damage.per_sample_energy(config.damage),
        extra={f"Q_samples_{other}": damage.per_sample_energy(other)},
        metadata={
            "damage": config.damage,
            "measured_samples": str(count),
            "measured_pair_blocks": str(damage.pair_blocks),
            "measured_configurations": str(damage.configurations),
            "measured_tokens": str(damage.tokens),
        },
    )
