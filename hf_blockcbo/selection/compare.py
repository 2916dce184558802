"""Side-by-side comparison of CBO and the baselines on the same model and data: table, CSV and plots."""

from __future__ import annotations

import copy
import csv
import io
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..config import RepairSettings
from ..data import CalibrationSet
from ..errors import BlockCBOError
from ..evaluation.likelihood import (
    WindowLosses,
    multiple_choice_accuracy,
    paired_ratio_interval,
    perplexity,
    window_losses,
)
from ..io_utils import atomic_file
from .scorers import ScoringContext, merged_copy, score
from .validation import select_by_validation, spearman


logger = logging.getLogger(__name__)


@dataclass
class ComparisonRow:
    method: str
    num_remove: int
    blocks: list[int]
    energy: float
    validation_ppl: float
    test_ppl: float
    seconds: float
    note: str = ""
    accuracy: dict[str, float] = field(default_factory=dict)  # multiple-choice task -> zero-shot accuracy
    repaired_validation_ppl: float | None = None  # the same blocks with the training-free repair
    repaired_test_ppl: float | None = None
    repair_seconds: float | None = None
    decode_speedup: float | None = None  # measured on a physically pruned copy, over the original
    test_losses: WindowLosses | None = field(default=None, repr=False)  # each test sample's loss, for intervals
    vs_cbo: tuple[float, float, float] | None = None  # test ppl / CBO's at this M, 95 % paired-bootstrap interval


@dataclass
class Comparison:
    rows: list[ComparisonRow]
    baseline_validation_ppl: float
    baseline_test_ppl: float
    baseline_accuracy: dict[str, float] = field(default_factory=dict)
    spectra: dict[int, list[tuple[float, float]]] = field(default_factory=dict)  # M -> [(energy, validation ppl)]

    def spearman(self, num_remove: int) -> float:
        points = self.spectra.get(num_remove, [])
        return spearman([e for e, _ in points], [p for _, p in points])

    def markdown(self) -> str:
        tasks = sorted(self.baseline_accuracy)
        repaired = any(r.repaired_test_ppl is not None for r in self.rows)
        base_acc = "".join(f", {t} accuracy {self.baseline_accuracy[t]:.3f}" for t in tasks)
        rep_head = " repaired val ppl | repaired test ppl | repair s |" if repaired else ""
        timed = any(r.decode_speedup is not None for r in self.rows)
        paired = any(r.vs_cbo is not None for r in self.rows)
        lines = [
            f"Unpruned: validation perplexity {self.baseline_validation_ppl:.2f}, test {self.baseline_test_ppl:.2f}"
            f"{base_acc}.",
            "",
            "| M | method | blocks removed | CBO energy | validation ppl | test ppl |"
            + (" test ppl ÷ CBO's (95 % interval) |" if paired else "")
            + rep_head
            + "".join(f" {t} acc |" for t in tasks)
            + (" decode speed-up (measured) |" if timed else "")
            + " seconds | note |",
            "| --- | --- | --- | --- | --- | --- |"
            + " --- |" * (len(tasks) + 3 * repaired + timed + paired)
            + " --- | --- |",
        ]
        for r in self.rows:
            energy = "" if math.isnan(r.energy) else f"{r.energy:.4g}"
            accs = "".join(f" {r.accuracy.get(t, float('nan')):.3f} |" for t in tasks)
            rep = ""
            if repaired:
                rep = (
                    " | | |"
                    if r.repaired_test_ppl is None
                    else f" {r.repaired_validation_ppl:.2f} | {r.repaired_test_ppl:.2f} | {r.repair_seconds:.1f} |"
                )
            versus = ""
            if paired:
                versus = " |" if r.vs_cbo is None else " {:.3f} ({:.3f}–{:.3f}) |".format(*r.vs_cbo)
            fast = ""
            if timed:
                fast = " |" if r.decode_speedup is None else f" {r.decode_speedup:.2f}× |"
            lines.append(
                f"| {r.num_remove} | {r.method} | {r.blocks} | {energy} | {r.validation_ppl:.2f} | {r.test_ppl:.2f} |"
                f"{versus}{rep}{accs}{fast} {r.seconds:.1f} | {r.note} |"
            )
        if paired:
            lines += [
                "",
                "- test ppl ÷ CBO's: each row's test perplexity over CBO's pick at the same M, with a 95 % interval "
                "from resampling the test samples (the same draw for both); an interval that holds 1 is a "
                "difference the test set cannot resolve.",
            ]
        if self.spectra:
            lines.append("")
            for m in sorted(self.spectra):
                lines.append(
                    f"- M = {m}: Spearman correlation of energy and validation perplexity over the "
                    f"{len(self.spectra[m])} lowest CBO states: {self.spearman(m):.2f}"
                )
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(
            ["num_remove", "method", "blocks", "energy", "validation_ppl", "test_ppl"]
            + ["test_ppl_over_cbo", "test_ppl_over_cbo_low", "test_ppl_over_cbo_high"]
            + ["repaired_validation_ppl", "repaired_test_ppl", "repair_seconds", "decode_speedup", "seconds", "note"]
        )
        for r in self.rows:
            blocks = " ".join(map(str, r.blocks))
            writer.writerow(
                [r.num_remove, r.method, blocks, r.energy, r.validation_ppl, r.test_ppl]
                + list(r.vs_cbo or (None, None, None))
                + [
                    r.repaired_validation_ppl,
                    r.repaired_test_ppl,
                    r.repair_seconds,
                    r.decode_speedup,
                    r.seconds,
                    r.note,
                ]
            )
        return out.getvalue()


def run_comparison(
    ctx: ScoringContext,
    methods: list[str],
    removes: list[int],
    validation: CalibrationSet,
    test: CalibrationSet,
    select: str = "validation",
    progress: bool = True,
    tokenizer=None,
    mc_tasks: dict[str, list[dict]] | None = None,
    repair_data: CalibrationSet | None = None,
    repair_settings: RepairSettings | None = None,
    harness_tasks: list[str] | None = None,
    harness_limit: int | None = None,
    speed: bool = False,
) -> Comparison:
    """Every method × every M: choose blocks, then validation and test perplexity (gate-masked; swm on a merged copy),
    and zero-shot accuracy on each multiple-choice task in ``mc_tasks`` (name → items).

    With ``repair_data`` every row also gets the perplexities after the training-free repair fitted on it as
    ``repair_settings`` say (default: `RepairSettings()`), and a row ``cbo (repair-aware)`` selects among the CBO
    states by their repaired validation score (`validation_metric`). With ``harness_tasks`` every row gets
    lm-evaluation-harness accuracies (gated model, no copy); with ``speed`` the measured decode speed-up of a
    physically pruned copy over the original.
    """
    from ..repair.least_squares import fit_repair, repair_aware

    model = ctx.model
    gate = getattr(ctx.config, "gate", "auto")
    metric = getattr(ctx.config, "validation_metric", "perplexity")

    def repaired(target, blocks) -> tuple[float, float, float]:
        began = time.perf_counter()
        try:
            fitted = fit_repair(target, blocks, repair_data, repair_settings, ctx.batch_size, gate)
        except BlockCBOError as err:
            logger.warning("no repair for blocks %s: %s", list(blocks), err)
            return math.nan, math.nan, time.perf_counter() - began
        seconds = time.perf_counter() - began
        with fitted.applied(target):
            val = perplexity(target, validation, blocks, batch_size=ctx.batch_size, gate=gate)
            test_ppl = perplexity(target, test, blocks, batch_size=ctx.batch_size, gate=gate)
        return val, test_ppl, seconds

    mc_tasks = mc_tasks or {}
    rows = []
    spectra = {}
    base_val = perplexity(model, validation, batch_size=ctx.batch_size)
    base_test = perplexity(model, test, batch_size=ctx.batch_size)

    def accuracy(target, removed=()):
        scores = {
            name: multiple_choice_accuracy(target, tokenizer, items, removed=removed)
            for name, items in mc_tasks.items()
        }
        if harness_tasks:
            from ..evaluation.harness import evaluate_tasks

            harness = evaluate_tasks(
                target, tokenizer, harness_tasks, removed=removed, limit=harness_limit, batch_size=ctx.batch_size
            )
            scores.update({task: row["acc"] for task, row in harness.items() if "acc" in row})
        return scores

    def decode_speedup(blocks, merged=None) -> float | None:
        if not speed:
            return None
        from ..evaluation.speed import benchmark
        from ..surgery.removal import remove_blocks

        pruned = merged if merged is not None else remove_blocks(copy.deepcopy(model), list(blocks))
        report = benchmark({"original": model, "pruned": pruned}, prompt_len=64, new_tokens=32, repeats=3)
        return report.ratio("decode_tokens_per_s", "pruned", "original")

    base_acc = accuracy(model)
    for num_remove in removes:
        for method in tqdm(methods, desc=f"compare M={num_remove}", disable=not progress):
            start = time.perf_counter()
            candidates = score(method, ctx, num_remove)
            note = ""
            if method == "cbo":
                best, scored = select_by_validation(
                    model, candidates, validation, ctx.batch_size, progress=False, metric=metric
                )
                spectra[num_remove] = [(c.energy, c.score) for c in scored]
                if select == "validation":
                    chosen, note = best, f"state {best.rank} of {len(scored)} (validation)"
                else:
                    chosen, note = scored[0], "ground state"
                ground = scored[0]
                if repair_data is not None:
                    began = time.perf_counter()
                    aware, _ = select_by_validation(
                        model,
                        candidates,
                        validation,
                        ctx.batch_size,
                        progress=False,
                        prepare=repair_aware(model, repair_data, repair_settings, ctx.batch_size, gate),
                        metric=metric,
                    )
                    row = ComparisonRow(
                        "cbo (repair-aware)",
                        num_remove,
                        list(aware.blocks),
                        aware.energy,
                        perplexity(model, validation, aware.blocks, batch_size=ctx.batch_size),
                        perplexity(model, test, aware.blocks, batch_size=ctx.batch_size),
                        time.perf_counter() - began,
                        f"state {aware.rank} of {len(candidates)} (validation after repair)",
                    )
                    row.repaired_validation_ppl, row.repaired_test_ppl, row.repair_seconds = repaired(
                        model, aware.blocks
                    )
                    rows.append(row)
                rows.append(
                    ComparisonRow(
                        "cbo (ground state)",
                        num_remove,
                        list(ground.blocks),
                        ground.energy,
                        ground.score,
                        perplexity(model, test, ground.blocks, batch_size=ctx.batch_size),
                        0.0,
                        "rank 0",
                        accuracy(model, ground.blocks),
                    )
                )
                val = chosen.score
            else:
                chosen = candidates[0]
                val = None
            fixed = None
            if method == "swm":
                merged = merged_copy(model, chosen)
                val = perplexity(merged, validation, batch_size=ctx.batch_size)
                losses = window_losses(merged, test, batch_size=ctx.batch_size)
                test_ppl = losses.perplexity
                accs = accuracy(merged)
                note = f"window merged into block {chosen.blocks[0] - 1}"
                speedup = decode_speedup(chosen.blocks, merged)
                del merged
                if repair_data is not None:  # the merge happens before the cut: repair the merged model, gated
                    merged_uncut = merged_copy(model, chosen, remove=False)
                    fixed = repaired(merged_uncut, chosen.blocks)
                    del merged_uncut
            else:
                if val is None:
                    val = perplexity(model, validation, chosen.blocks, batch_size=ctx.batch_size)
                losses = window_losses(model, test, chosen.blocks, batch_size=ctx.batch_size)
                test_ppl = losses.perplexity
                accs = accuracy(model, chosen.blocks)
                speedup = decode_speedup(chosen.blocks)
            seconds = time.perf_counter() - start
            row = ComparisonRow(
                method, num_remove, list(chosen.blocks), chosen.energy, val, test_ppl, seconds, note, accs
            )
            row.decode_speedup = speedup
            row.test_losses = losses
            if repair_data is not None:
                if fixed is None:
                    fixed = repaired(model, chosen.blocks)
                row.repaired_validation_ppl, row.repaired_test_ppl, row.repair_seconds = fixed
            rows.append(row)
    pair_with_cbo(rows)
    return Comparison(rows, base_val, base_test, base_acc, spectra)


def pair_with_cbo(rows: list[ComparisonRow]) -> None:
    """Set each row's test perplexity over CBO's pick at the same M, with its paired-bootstrap interval (rows
    without test losses, and every M without a ``cbo`` row, are left without)."""
    for row in rows:
        reference = next((r for r in rows if r.method == "cbo" and r.num_remove == row.num_remove), None)
        if row is reference or reference is None or row.test_losses is None or reference.test_losses is None:
            continue
        ours, theirs = reference.test_losses, row.test_losses
        row.vs_cbo = paired_ratio_interval(theirs.nll, ours.nll, ours.tokens)


def write_comparison(comparison: Comparison, output_dir: str | os.PathLike, num_blocks: int) -> list[Path]:
    """compare.md, compare.csv and the PNG plots into ``output_dir``; returns the written paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("compare.md", comparison.markdown()), ("compare.csv", comparison.csv())):
        with atomic_file(output_dir / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
        written.append(output_dir / name)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(17, 4.8))
    methods = sorted({r.method for r in comparison.rows})
    cap = 30 * comparison.baseline_test_ppl  # a collapsed method would squash every other curve: clip and mark it
    for method in methods:
        points = sorted((r.num_remove, r.test_ppl) for r in comparison.rows if r.method == method)
        shown = [min(p[1], cap) if math.isfinite(p[1]) else cap for p in points]
        (line,) = left.plot([p[0] for p in points], shown, "o-", label=method)
        for (m, value), y in zip(points, shown, strict=True):
            if y == cap and not value <= cap:
                left.annotate(f"{value:.2g}", (m, y), fontsize=6, color=line.get_color(), ha="center", va="bottom")
    left.axhline(comparison.baseline_test_ppl, color="grey", ls=":", label="unpruned")
    left.set_yscale("log")
    left.set_xlabel("blocks removed")
    left.set_ylabel(f"test perplexity (clipped at {cap:.0f})")
    left.legend(fontsize=7)
    left.set_title("perplexity vs blocks removed")
    for m, points in sorted(comparison.spectra.items()):
        mid.scatter(
            [e for e, _ in points], [p for _, p in points], s=12, label=f"M={m} (ρ={comparison.spearman(m):.2f})"
        )
    mid.set_xlabel("energy xᵀHx")
    mid.set_ylabel("validation perplexity")
    mid.set_yscale("log")
    mid.legend(fontsize=7)
    mid.set_title("CBO spectrum: energy vs perplexity")
    cbo = [r for r in comparison.rows if r.method == "cbo"]
    grid = [[1.0 if b in r.blocks else 0.0 for b in range(num_blocks)] for r in comparison.rows]
    right.imshow(grid, aspect="auto", cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
    right.set_yticks(range(len(comparison.rows)))
    right.set_yticklabels([f"{r.method} M={r.num_remove}" for r in comparison.rows], fontsize=6)
    right.set_xlabel("block")
    right.set_title(f"blocks removed by each method ({len(cbo)} CBO rows)")
    fig.tight_layout()
    with atomic_file(output_dir / "compare.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    written.append(output_dir / "compare.png")
    return written
