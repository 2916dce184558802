"""The verbs: calibrate → solve → remove, each a plain function over one `BlockRemovalConfig`.

The CLI commands (and later the Python API, callback and Space) are thin faces over these functions.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .config import BlockRemovalConfig
from .data import CalibrationSet, build_calibration_set, calibration_samples, repair_samples
from .errors import BlockCBOError
from .hessian.artifact import HessianArtifact
from .models import ModelSource
from .provenance import Provenance
from .solvers import SolveResult
from .solvers.dispatch import solve_artifact  # noqa: F401 - the solve verb the faces import from here
from .surgery.architectures import count_parameters, describe_blocks, get_architecture, get_layers
from .surgery.gates import resolve_gate_kind
from .surgery.removal import remove_blocks, save_pruned


logger = logging.getLogger(__name__)


def validation_samples(tokenizer, config: BlockRemovalConfig, split: str = "validation") -> CalibrationSet:
    """Held-out samples for selection (``split="validation"``) or reporting (``"test"``), disjoint from calibration."""
    source = config.validation_data if split == "validation" and config.validation_data else f"embedded:{split}"
    return build_calibration_set(
        tokenizer,
        source,
        num_samples=config.validation_samples,
        seq_len=config.seq_len,
        packing=config.packing,
        seed=config.seed,
    )


def calibrate(
    model: nn.Module,
    tokenizer,
    config: BlockRemovalConfig,
    source: ModelSource,
    progress: bool = True,
    output: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    fsdp: bool = False,
    calibration: CalibrationSet | None = None,
) -> HessianArtifact:
    """Estimate the energy matrix of ``config`` (curvature estimator ``config.curvature``) and return the artifact.

    Under `accelerate launch` each process computes a shard of the samples and every process returns the full
    artifact (rows gathered by sample index); the ``measured`` estimator runs whole on every process. With
    ``output`` and ``checkpoint_every``, rows done so far are checkpointed beside ``output`` and a rerun of the same
    command resumes from them. With ``fsdp`` (several processes) the weights are also sharded with FSDP2, so each
    process holds only its part of the model. ``calibration`` replaces the samples ``config`` describes (the
    callback passes its trainer's data).
    """
    from .hessian.curvature import CurvatureJob, get_curvature
    from .hessian.distributed import check_agreement, gather_rows, process_state, shard_bounds
    from .hessian.resume import PartialRows, fingerprint, partial_path

    estimator = get_curvature(config.curvature)
    spec = get_architecture(model)
    gate = resolve_gate_kind(spec, config.gate)
    blocks = describe_blocks(model, spec)
    if calibration is None:
        calibration = calibration_samples(tokenizer, config)
    rank, world, is_main, _ = process_state()
    from .models import model_fingerprint

    identity = model_fingerprint(model)  # before any sharding
    if not estimator.shardable:
        if fsdp:
            raise BlockCBOError(
                f"curvature {config.curvature!r} runs forward passes only and is not sharded; drop fsdp or use "
                "curvature fisher"
            )
        rank, world = 0, 1
    dtype = str(next(model.parameters()).dtype)
    key = fingerprint(
        model=source.model_id,
        revision=source.revision,
        blocks=[b.name for b in blocks],
        parameters=count_parameters(model),
        data=calibration.fingerprint,
        gate=gate,
        dtype=dtype,
        batch_size=config.batch_size,
        world=world,
        curvature=config.curvature,
        seed=config.seed if config.curvature == "fisher" else None,
    )
    if world > 1:
        check_agreement(key, "model, data or settings")
    lockstep = fsdp and world > 1
    if lockstep:
        from .hessian.distributed import shard_model_fsdp

        shard_model_fsdp(model, get_layers(model, spec))
    start, stop = shard_bounds(len(calibration), rank, world)
    shard = CalibrationSet(
        calibration.input_ids[start:stop], calibration.attention_mask[start:stop], calibration.source
    )
    checkpoint = None
    if output is not None and checkpoint_every > 0 and estimator.shardable:
        checkpoint = PartialRows(partial_path(output, rank, world), fingerprint(key=key, start=start, stop=stop))
    began = time.perf_counter()
    job = CurvatureJob(
        model=model,
        calibration=shard,
        config=config,
        gate=gate,
        block_names=[b.name for b in blocks],
        progress=progress and is_main,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        first_index=start,
        lockstep=lockstep,
    )
    terms = estimator.run(job)
    if world > 1:
        terms.A, terms.losses = gather_rows(start, terms.A, terms.losses)
    return HessianArtifact.from_rows(
        model,
        gate=gate,
        curvature=config.curvature,
        A=terms.A,
        Q_samples=terms.Q_samples,
        losses=terms.losses,
        extra=terms.extra,
        metadata={
            "model": source.model_id,
            "model_fingerprint": identity,
            "revision": source.revision or "",
            "base_model": source.base_model or "",
            "dataset": calibration.source,
            "data_fingerprint": calibration.fingerprint,
            "data_seed": config.seed,
            "num_samples": len(calibration),
            "seq_len": calibration.seq_len,
            "num_processes": world,
            "weights_sharded": "fsdp" if lockstep else "no",
            "seconds": f"{time.perf_counter() - began:.3f}",
            **terms.metadata,
        },
    )


def write_candidates(result: SolveResult, path: str | os.PathLike, artifact: HessianArtifact | None = None) -> None:
    """``{"model", "model_fingerprint", "block_names", "candidates": [{rank, blocks, energy}, ...]}`` sorted by
    energy, written atomically; the header (from ``artifact``) lets `prune --candidates` refuse another model."""
    from .io_utils import atomic_file

    meta = artifact.metadata if artifact is not None else {}
    payload = {
        "model": meta.get("model"),
        "model_fingerprint": meta.get("model_fingerprint"),
        "block_names": artifact.block_names if artifact is not None else None,
        "candidates": [c.to_dict() for c in result.candidates],
    }
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def read_candidates(path: str | os.PathLike, model: nn.Module | None = None) -> list[dict]:
    """The candidates of a `solve --output` file, sorted by rank; with ``model``, refused when they were solved for
    another model (block list or weights)."""
    from .models import model_fingerprint

    path = Path(path)
    if not path.is_file():
        raise BlockCBOError(f"no candidates file at {str(path)!r}; run `hf-blockcbo solve --output ...` first")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BlockCBOError(f"{str(path)!r} is not a candidates file (not JSON: {err})") from err
    rows = payload.get("candidates") if isinstance(payload, dict) else payload  # a bare list: an older file
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "blocks" in r for r in rows):
        raise BlockCBOError(f"{str(path)!r} is not a candidates file (written by `hf-blockcbo solve --output`)")
    if model is not None and isinstance(payload, dict):
        names = [b.name for b in describe_blocks(model)]
        if payload.get("block_names") not in (None, names):
            raise BlockCBOError(
                f"{str(path)!r} was solved for {payload.get('model')!r} with {len(payload['block_names'])} blocks, "
                f"not for this model ({len(names)} blocks); solve again with this model's Hessian"
            )
        recorded = payload.get("model_fingerprint")
        if recorded and recorded != model_fingerprint(model):
            raise BlockCBOError(
                f"{str(path)!r} was solved for {payload.get('model')!r}, whose weights differ from this model's; "
                "solve again with this model's Hessian"
            )
    return sorted(rows, key=lambda r: r.get("rank", 0))


@dataclass
class Selection:
    """The blocks chosen for removal and how they were chosen."""

    blocks: list[int]
    how: str
    energy: float | None = None
    rank: int | None = None
    solver: dict | None = None
    scorer: str = "cbo"
    merge_into: int | None = None  # sliding-window merging: the block that absorbs the removed ones
    validation_ppl: float | None = None
    spectrum: list[dict] | None = None  # every candidate considered, with energy and validation perplexity
    validation_data: str | None = None
    validation_ppl_unpruned: float | None = None


def _explicit_selection(config: BlockRemovalConfig, candidates_file: str | None, model=None) -> Selection | None:
    if config.blocks is not None:
        return Selection(blocks=config.blocks, how="explicit", scorer="explicit")
    if candidates_file:
        rows = read_candidates(candidates_file, model)
        rank = config.rank or 0
        if rank >= len(rows):
            raise BlockCBOError(f"`rank` {rank} is beyond the {len(rows)} states in {candidates_file}")
        row = rows[rank]
        return Selection(row["blocks"], "candidates file", row.get("energy"), row.get("rank", rank))
    return None


def choose_blocks(
    model: nn.Module,
    tokenizer,
    config: BlockRemovalConfig,
    source: ModelSource,
    artifact: HessianArtifact | None = None,
    candidates_file: str | None = None,
    progress: bool = True,
) -> tuple[Selection, HessianArtifact | None]:
    """Decide which blocks go: explicit blocks, a candidates file, CBO (+ validation selection) or a baseline scorer."""
    from .evaluation.likelihood import perplexity
    from .selection.rounds import rounds_run, solve_with_rounds
    from .selection.scorers import ScoringContext, score
    from .selection.validation import select_by_validation

    if config.repair:  # refuse a family that cannot fold before any expensive work
        from .repair.least_squares import check_repairable

        check_repairable(model, config.blocks or [], settings=config.repair_settings)
    explicit = _explicit_selection(config, candidates_file, model)
    if explicit is not None:
        return explicit, artifact
    if config.num_remove is None:
        raise BlockCBOError("say how many blocks to remove (`num_remove`), or pick them (`blocks`)")
    num_blocks = len(describe_blocks(model))
    if config.num_remove >= num_blocks:
        raise BlockCBOError(
            f"cannot remove {config.num_remove} of {num_blocks} blocks; choose K in 1..{num_blocks - 1}"
        )
    if config.scorer != "cbo":
        ctx = ScoringContext.from_config(model, tokenizer, config, artifact, progress=progress)
        chosen = score(config.scorer, ctx, config.num_remove)[0]
        merge_into = chosen.blocks[0] - 1 if config.scorer == "swm" else None
        energy = None if math.isnan(chosen.energy) else chosen.energy
        return Selection(
            list(chosen.blocks), f"{config.scorer} scorer", energy, None, None, config.scorer, merge_into
        ), artifact
    if artifact is None:
        from .solvers.dispatch import check_solvable

        blocks = describe_blocks(model)
        check_solvable(config, [b.kind for b in blocks], [b.num_parameters for b in blocks], count_parameters(model))
        artifact = calibrate(model, tokenizer, config, source, progress=progress)
    result, rounds = solve_with_rounds(
        model, artifact, config, lambda: calibration_samples(tokenizer, config), progress=progress
    )
    by_energy = config.select == "energy" and config.rank is None
    solver = solver_record(artifact, config, result, rounds, picked_by_energy=by_energy)
    candidates = result.candidates
    if config.rank is not None:
        if config.rank >= len(candidates):
            raise BlockCBOError(f"`rank` {config.rank} is beyond the {len(candidates)} states found")
        chosen, how = candidates[config.rank], f"rank {config.rank} by energy"
    elif config.select == "energy" or len(candidates) == 1:
        chosen, how = candidates[0], "ground state (energy)"
    else:
        validation = validation_samples(tokenizer, config)
        aware = config.repair and config.repair_aware
        prepare = repaired_candidate(model, tokenizer, config) if aware else None
        chosen, candidates = select_by_validation(
            model,
            candidates,
            validation,
            config.batch_size,
            gate=config.gate,
            progress=progress,
            prepare=prepare,
            metric=config.validation_metric,
        )
        metric = "KL from the unpruned model" if config.validation_metric == "kl" else "perplexity"
        how = f"validation {metric} over the {len(candidates)} lowest states ({validation.source})"
        ran = rounds_run(rounds)
        if ran:
            how += f", after {len(ran)} round(s) of re-expansion"
        if aware:
            how += ", each scored after its repair"
        unpruned = perplexity(model, validation, batch_size=config.batch_size)
    selection = Selection(
        list(chosen.blocks),
        how,
        chosen.energy,
        chosen.rank,
        solver,
        "cbo",
        None,
        chosen.score,
        [c.to_dict() for c in candidates],
    )
    if chosen.score is not None:
        selection.validation_data = validation.source
        selection.validation_ppl_unpruned = unpruned
    return selection, artifact


def solver_record(
    artifact: HessianArtifact, config: BlockRemovalConfig, result: SolveResult, rounds, picked_by_energy: bool
) -> dict:
    """The provenance's `solver` entry, as every face writes it: the solve (without its candidates), the rounds'
    records, and the ground state's lead over its runner-up where the energy is the artifact's (no round
    re-expanded it; :func:`ground_lead`, which warns when ``picked_by_energy`` and the rows do not resolve it)."""
    solver = {k: v for k, v in result.to_dict().items() if k != "candidates"}
    if rounds is not None:
        solver["rounds"] = rounds
    lead = ground_lead(artifact, config, result, rounds, picked_by_energy)
    if lead is not None:
        solver["ground_lead"] = lead
    return solver


def ground_lead(
    artifact: HessianArtifact, config: BlockRemovalConfig, result: SolveResult, rounds, picked_by_energy: bool
) -> dict | None:
    """The ground state's lead over its runner-up, paired over the calibration rows, as the provenance records it;
    None where rounds re-expanded the energy (the rows are the artifact's), without a runner-up or with one row. One
    warning line where the energy alone picks (``picked_by_energy``: `select: energy`, the callback's cut) between
    two states its rows do not resolve."""
    from .selection.diagnose import ground_margin
    from .selection.rounds import rounds_run

    candidates = result.candidates
    margin = None if rounds_run(rounds) else ground_margin(artifact, config, [c.blocks for c in candidates])
    if margin is None:
        return None
    if not margin.resolved and picked_by_energy:
        logger.warning(
            "the ground state %s leads %s by %.4g ± %.4g (energy, over %d calibration rows): a tie at this "
            "calibration size; more calibration samples, or selection on held-out text (`prune --select "
            "validation`), would decide it",
            list(candidates[0].blocks),
            list(margin.runner_up),
            margin.lead,
            margin.standard_error,
            artifact.num_samples,
        )
    return margin.to_dict()


def repaired_candidate(model: nn.Module, tokenizer, config: BlockRemovalConfig):
    """For repair-aware selection: ``candidate -> factory of contexts`` in which the gated model carries that
    candidate's repair."""
    from .repair.least_squares import repair_aware

    return repair_aware(
        model, repair_samples(tokenizer, config), config.repair_settings, config.batch_size, config.gate
    )


def repair_model(
    model: nn.Module,
    tokenizer,
    config: BlockRemovalConfig,
    blocks,
    progress: bool = False,
    unrepaired: float | None = None,
) -> dict:
    """Fit the repair of removing ``blocks`` and fold it into ``model``'s weights (blocks not yet removed); the
    record that goes into the provenance. With ``config.repair_check`` (the default) the repair is first checked on
    the validation data (`check_repair`; ``unrepaired``: the pruned model's validation perplexity where the selection
    measured it already): one that does not lower it is not folded, the model is left as it was, and the record
    says so (``validation.kept`` false)."""
    from .repair.least_squares import fit_repair

    repair = fit_repair(
        model,
        blocks,
        repair_samples(tokenizer, config),
        config.repair_settings,
        config.batch_size,
        config.gate,
        progress,
    )
    record = repair.to_dict()
    if config.repair_check:
        check = record["validation"] = check_repair(model, tokenizer, config, blocks, repair, unrepaired)
        if not check["kept"]:
            logger.warning(
                "not repaired: the repair did not lower the validation perplexity on %s (%.2f → %.2f), so it was "
                "not folded and the model is saved unrepaired; fit it on data like the validation's (`repair_data`, "
                "--repair-data), or fold it unchecked (`repair_check=false`, --no-repair-check)",
                check["data"],
                check["perplexity_unrepaired"],
                check["perplexity_repaired"],
            )
            return record
    repair.fold_into(model)
    return record


def check_repair(
    model: nn.Module, tokenizer, config: BlockRemovalConfig, blocks, repair, unrepaired: float | None = None
) -> dict:
    """The validation perplexity of the model with ``blocks`` gated off, without (measured unless ``unrepaired`` is
    given) and with ``repair`` (hooks, weights untouched), on the selection's validation data; ``kept``: the repair
    lowers it."""
    from .evaluation.likelihood import perplexity

    began = time.perf_counter()
    validation = validation_samples(tokenizer, config)
    if unrepaired is None:
        unrepaired = perplexity(model, validation, blocks, config.batch_size, config.gate)
    with repair.applied(model):
        repaired = perplexity(model, validation, blocks, config.batch_size, config.gate)
    return {
        "data": validation.source,
        "samples": len(validation),
        "perplexity_unrepaired": unrepaired,
        "perplexity_repaired": repaired,
        "kept": math.isfinite(repaired) and repaired < unrepaired,
        "seconds": round(time.perf_counter() - began, 3),
    }


def repair_rejected(record: dict | None) -> bool:
    """Whether a `repair_model` record is a repair its validation check did not fold."""
    return bool(record) and not record.get("validation", {}).get("kept", True)


def prune_and_save(
    model: nn.Module,
    tokenizer,
    selection: Selection,
    output_dir: str | os.PathLike,
    source: ModelSource,
    config: BlockRemovalConfig,
    artifact: HessianArtifact | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Remove ``selection.blocks`` from ``model`` (repaired first when ``config.repair``), save the plain checkpoint
    with its provenance; return the summary."""
    from .io_utils import check_output_dir
    from .selection.scorers import merge_window
    from .surgery.removal import check_removal

    check_output_dir(output_dir, overwrite)  # refusals first: nothing below may leave the model half changed
    num_blocks_before = len(describe_blocks(model))
    params_before = count_parameters(model)
    check_removal(model, selection.blocks)
    if config.repair:
        from .repair.least_squares import check_repairable

        check_repairable(model, selection.blocks, settings=config.repair_settings)
    if selection.merge_into is not None:
        merge_window(model, selection.merge_into, selection.blocks)
    repair = None
    if config.repair:  # the selection's validation perplexity of the unrepaired pick, where it measured this model
        measured = selection.validation_data and not config.repair_aware and selection.merge_into is None
        known = selection.validation_ppl if measured else None
        repair = repair_model(model, tokenizer, config, selection.blocks, progress, known)
    kept_out = repair_rejected(repair)  # fitted, checked and not folded: recorded beside, not as, the repair
    remove_blocks(model, selection.blocks)
    summary = Provenance(
        removed_blocks=list(selection.blocks),
        num_blocks_before=num_blocks_before,
        num_blocks_after=num_blocks_before - len(selection.blocks),
        num_parameters_before=params_before,
        num_parameters_after=count_parameters(model),
        model=source.model_id,
        revision=source.revision,
        base_model=source.base_model,
        note=source.note,
        scorer=selection.scorer,
        selection=selection.how,
        energy=selection.energy,
        rank=selection.rank,
        solver=selection.solver,
        spectrum=selection.spectrum,
        validation_perplexity=selection.validation_ppl,
        validation_data=selection.validation_data,
        validation_perplexity_unpruned=selection.validation_ppl_unpruned,
        merged_into=selection.merge_into,
        config=config.to_dict(),
        calibration=dict(artifact.metadata) if artifact is not None else {},
        repair=None if kept_out else repair,
        extra={"repair_rejected": repair} if kept_out else {},
    ).to_dict()
    save_pruned(model, tokenizer, output_dir, summary, overwrite=overwrite)
    return summary
