"""Rounds: re-expand the measured damage around the current ground state, then solve again.

The first ``measured`` pass expands the damage around the unpruned model (single and pair removals), so it is exact
only for M ≤ 2; for larger M the interactions of three or more removed blocks are missing. A round measures the
damage at the current ground state s, at every state one flip away and at every pair of flips among s's blocks and
the most promising outside ones (:func:`~hf_blockcbo.hessian.measured.measure_expansion`), which gives a new N×N
energy exact at s and at every swap of one of its blocks. Beyond that the expansion is an extrapolation that can go
badly wrong (on Gemma-3-270M at M = 6 an unrestricted solve jumped four swaps to a state it predicted at −0.003 nats
of KL, which had 1.9× the test perplexity on Persuasion), so each round searches a trust region: the K lowest states
within ``config.measured_round_swaps`` (default ``ROUND_SWAPS``) swaps of s, enumerated exactly with the same protected blocks and constraints
(:func:`~hf_blockcbo.solvers.neighbourhood.solve_near`). One swap is exact, the second is the expansion's pairwise
prediction. Rounds stop early once the ground state no longer moves.

With ``config.measured_round_trigger`` > 0 the rounds run only when they are needed: the first pass's ground state
is measured (one configuration), and rounds start only if the energy misses that damage by more than the trigger's
fraction. The pairwise expansion is exact for M ≤ 2, so a miss measures the interactions of three or more removed
blocks that it leaves out, at the one state that matters most.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from torch import nn

from ..data import CalibrationSet
from ..hessian.artifact import HessianArtifact
from ..hessian.measured import measure_expansion, measure_state_damage
from ..solvers import SolveResult
from ..solvers.dispatch import solve_artifact, solve_artifact_near


ROUND_SWAPS = 1  # a round's trust region (the config's default): states this many swaps from its centre


def rounds_apply(config, artifact: HessianArtifact | None) -> bool:
    """Whether ``config`` asks for rounds and the energy they refine is the measured one."""
    return config.measured_rounds > 0 and artifact is not None and artifact.curvature == "measured"


def rounds_run(records: list[dict] | None) -> list[dict]:
    """The records of rounds that re-expanded the energy (``round`` 0 is the trigger's check, not a round)."""
    return [r for r in records or [] if r["round"] > 0]


def solve_with_rounds(
    model: nn.Module,
    artifact: HessianArtifact,
    config,
    samples: Callable[[], CalibrationSet],
    progress: bool = True,
) -> tuple[SolveResult, list[dict] | None]:
    """The K lowest states of ``config``, after ``config.measured_rounds`` rounds when they apply (``samples()``, the
    calibration samples, is called only then); (result, the rounds' records or None). With a trigger the first
    record is its check (``round`` 0, :func:`expansion_miss`), and rounds follow only if it fired. Every face solves
    through it.
    """
    result = solve_artifact(artifact, config)
    if not rounds_apply(config, artifact):
        return result, None
    calibration = samples()
    if config.measured_round_trigger > 0:
        check = expansion_miss(model, artifact, config, calibration, result)
        if progress:
            print(
                f"rounds: the energy predicts {check['predicted']:.4f} at the ground state {check['state']}, "
                f"measured {check['measured']:.4f} (miss {check['miss']:.1%}; rounds run above "
                f"{config.measured_round_trigger:.0%})"
            )
        if not check["rounds_run"]:
            return result, [check]
        refined, records = refine_by_rounds(model, artifact, config, calibration, result, progress=progress)
        return refined, [check, *records]
    return refine_by_rounds(model, artifact, config, calibration, result, progress=progress)


def _measured_subset(config, calibration: CalibrationSet) -> CalibrationSet:
    """The first ``config.measured_samples`` samples: the windows the first pass measured when the config is its."""
    count = min(len(calibration), config.measured_samples)
    return CalibrationSet(calibration.input_ids[:count], calibration.attention_mask[:count], calibration.source)


def expansion_miss(
    model: nn.Module, artifact: HessianArtifact, config, calibration: CalibrationSet, result: SolveResult
) -> dict:
    """How far the first pass's energy is off at its ground state: the damage measured there (the artifact's kind, on
    the first ``config.measured_samples`` samples), the relative miss, and whether it exceeds the trigger. The record
    has ``round`` 0, ahead of the rounds' own records."""
    ground = result.candidates[0]
    began = time.perf_counter()
    subset = _measured_subset(config, calibration)
    damage = measure_state_damage(
        model,
        subset,
        [ground.blocks],
        gate=artifact.metadata.get("gate", "auto"),
        batch_size=config.batch_size,
        damage=artifact.metadata.get("damage", "kl"),
    )
    measured = float(damage.mean())
    miss = abs(measured - ground.energy) / max(abs(measured), 1e-12)
    return {
        "round": 0,
        "check": "first pass's energy at its ground state",
        "state": list(ground.blocks),
        "predicted": float(ground.energy),
        "measured": measured,
        "miss": miss,
        "trigger": config.measured_round_trigger,
        "rounds_run": miss > config.measured_round_trigger,
        "tokens": int(subset.attention_mask.sum()),
        "seconds": round(time.perf_counter() - began, 3),
    }


def refine_by_rounds(
    model: nn.Module,
    artifact: HessianArtifact,
    config,
    calibration: CalibrationSet,
    result: SolveResult,
    progress: bool = True,
    log=print,
    expansions: list | None = None,
    swaps: int | None = None,
) -> tuple[SolveResult, list[dict]]:
    """Up to ``config.measured_rounds`` rounds from ``result``'s ground state; (last result, one record per round).

    The damage is measured on the first ``config.measured_samples`` samples of ``calibration`` (the windows of the
    first pass when the config is the artifact's). Each round's `Expansion` is appended to ``expansions`` if given;
    each round's states lie within ``swaps`` (default: ``config.measured_round_swaps``) swaps of its centre.
    """
    swaps = swaps if swaps is not None else getattr(config, "measured_round_swaps", ROUND_SWAPS)
    subset = _measured_subset(config, calibration)
    records = []
    for index in range(config.measured_rounds):
        centre = list(result.candidates[0].blocks)
        began = time.perf_counter()
        expansion = measure_expansion(
            model,
            subset,
            centre,
            gate=artifact.metadata.get("gate", "auto"),
            batch_size=config.batch_size,
            pairs=config.measured_pairs,
            progress=progress,
            log=log if progress else (lambda line: None),
            swaps=swaps,
        )
        if expansions is not None:
            expansions.append(expansion)
        result = solve_artifact_near(artifact, config, expansion.energy_matrix().numpy(), centre, swaps)
        ground = list(result.candidates[0].blocks)
        records.append(
            {
                "round": index + 1,
                "centre": centre,
                "centre_damage": float(expansion.centre_damage.mean()),
                "ground_state": ground,
                "energy": result.candidates[0].energy,
                "swaps": swaps,
                "flip_blocks": expansion.flip_blocks,
                "configurations": expansion.configurations,
                "tokens": expansion.tokens,
                "seconds": round(time.perf_counter() - began, 3),
            }
        )
        if progress:
            log(
                f"round {index + 1}: ground state {centre} -> {ground} (predicted KL {result.candidates[0].energy:.4f}; "
                f"{expansion.configurations} states, {expansion.tokens:,} tokens, {records[-1]['seconds']:.1f} s)"
            )
        if ground == centre:
            break
    return result, records
