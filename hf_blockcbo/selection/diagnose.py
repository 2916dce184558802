"""Does the energy predict the damage? Measure it: the true damage of the top-K states and of random states, rank
correlations between energy and measured damage, bootstrap stability of the ground state, and a plot.

The damage of a state is measured gate-masked on held-out samples (no model copy): the mean per-token KL from the
unpruned model's next-token distribution to the pruned one, and the perplexity; many states run per forward
(:func:`hf_blockcbo.hessian.measured.configuration_damage`).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import BlockRemovalConfig
from ..data import CalibrationSet
from ..errors import BlockCBOError
from ..evaluation.many_states import perplexities
from ..hessian.artifact import HessianArtifact
from ..hessian.gradients import frozen_eval
from ..hessian.measured import configuration_damage, fast_paths, reference_pass, rows_per_forward
from ..io_utils import atomic_file
from ..solvers.dispatch import solve_artifact
from ..surgery.gates import BlockGates


@dataclass
class StateDamage:
    """Measured damage of removal states on one held-out set: mean per-token KL and perplexity per state."""

    kl: list[float]
    perplexity: list[float]
    unpruned_perplexity: float


@torch.no_grad()
def measure_states(
    model: nn.Module,
    states: Sequence[Sequence[int]],
    held_out: CalibrationSet,
    gate: str = "auto",
    batch_size: int = 8,
    progress: bool = False,
    contexts: Sequence[Callable[[], AbstractContextManager] | None] | None = None,
) -> StateDamage:
    """KL to the unpruned model and perplexity of every state (blocks removed), gate-masked, several per forward.

    ``contexts[i]``, when given, makes the context state ``i`` is measured in (e.g. its repair maps hooked); the
    reference is the unpruned model outside every context, and such a state runs alone, its prefix not shared.
    """
    if len(held_out) == 0:
        raise BlockCBOError("the held-out set is empty")
    states = [tuple(sorted(int(b) for b in s)) for s in states]
    if contexts is not None and len(contexts) != len(states):
        raise BlockCBOError(f"{len(contexts)} contexts for {len(states)} states")
    hooked = [k for k in range(len(states)) if contexts is not None and contexts[k] is not None]
    plain = [k for k in range(len(states)) if contexts is None or contexts[k] is None]
    device = next(model.parameters()).device
    kl_sum = torch.zeros(len(states), dtype=torch.float64)
    ce_sum = torch.zeros(len(states), dtype=torch.float64)
    base_sum, tokens = 0.0, 0
    bar = tqdm(total=len(states) * len(held_out), desc="measuring states", disable=not progress, leave=False)
    with frozen_eval(model), BlockGates(model, gate=gate) as gates:
        paths = fast_paths(model, gates, held_out)
        rows = rows_per_forward(model, held_out.seq_len, paths.head)
        for _, ids, mask in held_out.batches(batch_size):
            ids, mask = ids.to(device), mask.to(device)
            reference = reference_pass(model, gates.layers, ids, mask, paths.head)
            counts = (mask[:, 1:] * mask[:, :-1]).sum(1).double().cpu()
            base_sum += float((reference.ce.double().cpu() * counts).sum())
            tokens += int(counts.sum())
            per_forward = max(1, rows // ids.shape[0])
            order = sorted(plain, key=lambda k: min(states[k]) if states[k] else 0)
            chunks = [(order[lo : lo + per_forward], None) for lo in range(0, len(order), per_forward)]
            chunks += [([k], contexts[k]) for k in hooked]
            for chunk, context in chunks:
                configs = [states[k] for k in chunk]
                if any(not c for c in configs):
                    raise BlockCBOError("a state removes no block")
                with context() if context is not None else contextlib.nullcontext():
                    kl, dce = configuration_damage(
                        model, gates, ids, mask, configs, reference, paths.share_prefix and context is None, paths.head
                    )
                kl_sum[chunk] += (kl * counts[:, None]).sum(0)
                ce_sum[chunk] += ((dce + reference.ce.double().cpu()[:, None]) * counts[:, None]).sum(0)
                bar.update(len(chunk) * ids.shape[0])
    bar.close()
    return StateDamage(
        kl=(kl_sum / tokens).tolist(),
        perplexity=[math.exp(v) for v in (ce_sum / tokens).tolist()],
        unpruned_perplexity=math.exp(base_sum / tokens),
    )


def rank_correlations(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(Spearman, Kendall τ-b) of two sequences; NaN where undefined."""
    from scipy.stats import kendalltau, spearmanr

    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan"), float("nan")
    return float(spearmanr(x, y).statistic), float(kendalltau(x, y).statistic)


def random_states(num_blocks: int, num_remove: int, count: int, seed: int, protected=()) -> list[tuple[int, ...]]:
    """``count`` distinct random states (seeded), none touching ``protected``."""
    pool = [b for b in range(num_blocks) if b not in set(protected)]
    rng = np.random.default_rng(seed)
    found: list[tuple[int, ...]] = []
    limit = math.comb(len(pool), num_remove)
    while len(found) < min(count, limit):
        state = tuple(sorted(int(b) for b in rng.choice(pool, size=num_remove, replace=False)))
        if state not in found:
            found.append(state)
    return found


@dataclass
class Margin:
    """How far the ground state leads its runner-up (the solver's second state), paired over the calibration rows.

    ``lead`` is the runner-up's energy minus the ground state's (≥ 0); ``standard_error`` that of the mean of the
    rows' differences. A lead of under about 2 standard errors is a tie at this calibration size: a bootstrap of the
    rows moves the ground state often, and the validation selection, not the energy, decides between the two.
    """

    runner_up: tuple[int, ...]
    lead: float
    standard_error: float

    @property
    def resolved(self) -> bool:
        return self.lead >= 2.0 * self.standard_error

    def to_dict(self) -> dict:
        """As the provenance records it (`solver.ground_lead`)."""
        return {
            "runner_up": list(self.runner_up),
            "lead": self.lead,
            "standard_error": self.standard_error,
            "resolved": self.resolved,
        }


def ground_margin(artifact: HessianArtifact, config: BlockRemovalConfig, states: Sequence[tuple[int, ...]]):
    """The :class:`Margin` of ``states[0]`` (the ground state) over ``states[1]``; None with one state or one row."""
    if len(states) < 2 or artifact.num_samples < 2:
        return None
    rows = artifact.row_energies(states[:2], config.beta)
    difference = (rows[:, 1] - rows[:, 0]).numpy()
    return Margin(
        runner_up=tuple(states[1]),
        lead=float(difference.mean()),
        standard_error=float(difference.std(ddof=1) / math.sqrt(len(difference))),
    )


@dataclass
class Stability:
    """How often a bootstrap resample of the calibration rows keeps the full sample's choice."""

    ground_kept: float  # share of resamples whose ground state is the full sample's
    top_overlap: float  # mean share of the full top-K that a resample's top-K keeps
    pick_kept: float | None = None  # share whose validation pick (among its own top-K) is the full sample's pick
    states_validated: int = 0  # distinct states the picks were chosen among (each validated once)
    pick: tuple[int, ...] | None = None  # the full sample's validation pick


def bootstrap_stability(
    artifact: HessianArtifact,
    config: BlockRemovalConfig,
    draws: int = 100,
    seed: int = 0,
    model: nn.Module | None = None,
    validation: CalibrationSet | None = None,
    progress: bool = False,
) -> Stability:
    """Resample the calibration rows ``draws`` times (seeded) and re-solve (without rounds, which need the model
    and the calibration windows: where `prune`'s trigger would fire, the pick here is the first pass's).

    With ``model`` and ``validation``, also the stability of what the pipeline removes: each resample's top-K is
    ranked by ``config.validation_metric`` on ``validation`` (ties to the lower rank, as the selection does), every
    distinct state measured once, and the pick compared with the full sample's.
    """
    if (model is None) != (validation is None):
        raise BlockCBOError("the pick's stability needs both the model and the validation set")
    base = [c.blocks for c in solve_artifact(artifact, config).candidates]
    rng = np.random.default_rng(seed)
    m = artifact.num_samples
    tops: list[list[tuple[int, ...]]] = []
    for _ in range(draws):
        rows = rng.integers(0, m, size=m)
        resampled = artifact.resampled(rows)
        tops.append([c.blocks for c in solve_artifact(resampled, config).candidates])
    stability = Stability(
        ground_kept=sum(top[0] == base[0] for top in tops) / draws,
        top_overlap=sum(len(set(top) & set(base)) / len(base) for top in tops) / draws,
    )
    if validation is not None:
        union = list(dict.fromkeys(state for top in [base, *tops] for state in top))
        if config.validation_metric == "kl":
            scores = measure_states(model, union, validation, config.gate, config.batch_size, progress).kl
        else:
            scores = perplexities(
                model, validation, union, config.batch_size, config.gate, progress, "bootstrap picks"
            )
        by_state = dict(zip(union, scores, strict=True))

        def pick(top: list[tuple[int, ...]]) -> tuple[int, ...]:
            return min(top, key=lambda state: (by_state[state], top.index(state)))

        chosen = stability.pick = pick(base)
        stability.pick_kept = sum(pick(top) == chosen for top in tops) / draws
        stability.states_validated = len(union)
    return stability


@dataclass
class MDiagnosis:
    num_remove: int
    states: list[tuple[int, ...]]
    kinds: list[str]  # "top" (rank r of the spectrum) or "random"
    energies: list[float]
    damage: StateDamage
    spearman: float
    kendall: float
    spearman_top: float
    margin: Margin | None = None


@dataclass
class Diagnosis:
    curvature: str
    rows: list[MDiagnosis] = field(default_factory=list)
    bootstrap: dict[int, Stability] = field(default_factory=dict)

    def markdown(self) -> str:
        lines = [
            f"Curvature `{self.curvature}`: energy vs measured damage (held-out mean per-token KL to the unpruned model)",
            "",
            "| M | states (top-K + random) | Spearman | Kendall | Spearman over top-K | ground state | its KL | "
            "best measured state | its KL | lead over the runner-up (± s.e.) | bootstrap: ground state kept | "
            "top-K overlap | validation pick kept |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in self.rows:
            best = int(np.argmin(r.damage.kl))
            boot = self.bootstrap.get(r.num_remove)
            kept = "" if boot is None else f"{100 * boot.ground_kept:.0f} %"
            over = "" if boot is None else f"{100 * boot.top_overlap:.0f} %"
            picked = "" if boot is None or boot.pick is None else f"{100 * boot.pick_kept:.0f} % of {list(boot.pick)}"
            lead = "" if r.margin is None else _lead_text(r.margin)
            lines.append(
                f"| {r.num_remove} | {r.kinds.count('top')} + {r.kinds.count('random')} | {r.spearman:.2f} | "
                f"{r.kendall:.2f} | {r.spearman_top:.2f} | {list(r.states[0])} | {r.damage.kl[0]:.4f} | "
                f"{list(r.states[best])} | {r.damage.kl[best]:.4f} | {lead} | {kept} | {over} | {picked} |"
            )
        lines += [
            "",
            "The lead is the runner-up's energy minus the ground state's, paired over the calibration rows; under 2 "
            "standard errors (marked *tie*) the rows do not resolve the two states, a bootstrap moves the ground state "
            "often, and the validation selection decides between them.",
        ]
        return "\n".join(lines) + "\n"


def _lead_text(margin: Margin) -> str:
    tie = "" if margin.resolved else ", *tie*"
    return f"{margin.lead:.4f} ± {margin.standard_error:.4f} over {list(margin.runner_up)}{tie}"


def diagnose(
    model: nn.Module,
    artifact: HessianArtifact,
    config: BlockRemovalConfig,
    held_out: CalibrationSet,
    removes: Sequence[int],
    random_count: int = 10,
    bootstraps: int = 0,
    progress: bool = False,
    validation: CalibrationSet | None = None,
) -> Diagnosis:
    """For each M: the top-K states of ``artifact`` and ``random_count`` random states, measured on ``held_out``.

    With ``bootstraps``, the stability of the ground state; with ``validation`` too, that of the validation pick."""
    diagnosis = Diagnosis(artifact.curvature)
    for m in removes:
        cfg = config.replace(num_remove=m)
        top = [c.blocks for c in solve_artifact(artifact, cfg).candidates]
        rand = random_states(artifact.num_blocks, m, random_count, config.seed + m, config.protected)
        rand = [s for s in rand if s not in top]
        states = list(top) + rand
        q = artifact.energy_matrix(config.beta).numpy()
        energies = [float(q[np.ix_(s, s)].sum()) for s in states]
        damage = measure_states(model, states, held_out, config.gate, config.batch_size, progress)
        rho, tau = rank_correlations(energies, damage.kl)
        rho_top, _ = rank_correlations(energies[: len(top)], damage.kl[: len(top)])
        kinds = ["top"] * len(top) + ["random"] * len(rand)
        margin = ground_margin(artifact, cfg, top)
        diagnosis.rows.append(MDiagnosis(m, states, kinds, energies, damage, rho, tau, rho_top, margin))
        if bootstraps:
            diagnosis.bootstrap[m] = bootstrap_stability(
                artifact, cfg, bootstraps, config.seed, model if validation is not None else None, validation, progress
            )
    return diagnosis


def plot_diagnoses(diagnoses: Sequence[Diagnosis], path: str | os.PathLike, title: str = "") -> Path:
    """Predicted (energy) vs measured damage, one panel per curvature, one colour per M; random states hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(diagnoses), figsize=(5.2 * len(diagnoses), 4.4), squeeze=False)
    for ax, diagnosis in zip(axes[0], diagnoses, strict=True):
        for r in diagnosis.rows:
            top = [i for i, k in enumerate(r.kinds) if k == "top"]
            rand = [i for i, k in enumerate(r.kinds) if k == "random"]
            (dots,) = ax.plot(
                [r.energies[i] for i in top],
                [r.damage.kl[i] for i in top],
                "o",
                ms=4,
                label=f"M={r.num_remove} ρ={r.spearman:.2f}",
            )
            ax.plot(
                [r.energies[i] for i in rand],
                [r.damage.kl[i] for i in rand],
                "o",
                ms=4,
                mfc="none",
                color=dots.get_color(),
            )
        ax.set_xlabel(f"energy xᵀQx ({diagnosis.curvature})")
        ax.set_ylabel("measured held-out KL (nats/token)")
        ax.set_xscale("symlog", linthresh=1e-4)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.set_title(f"{diagnosis.curvature}: filled = top-K, hollow = random", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
