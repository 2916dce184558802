"""Automatic choice among the low-energy states: evaluate each on a validation split, gate-masked, keep the best.

The paper's own limitation ("the ground state does not always yield the best configuration … an automated selection
procedure would be desirable"): the top-K states are scored by validation perplexity on data separate from the
calibration set, with no copy of the model per candidate (gates switch the blocks off). ``metric="kl"`` decides by
the mean per-token KL from the unpruned model's next-token distribution instead, the damage the measured energy
predicts (docs/results.md §1, "Which rule picks", compares the two).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import replace

from torch import nn
from tqdm.auto import tqdm

from ..data import CalibrationSet
from ..errors import BlockCBOError
from ..evaluation.likelihood import perplexity
from ..evaluation.many_states import perplexities
from ..solvers import Candidate
from .diagnose import measure_states


SELECTIONS = ("validation", "energy")
METRICS = ("kl", "perplexity")


def select_by_validation(
    model: nn.Module,
    candidates: list[Candidate],
    validation: CalibrationSet,
    batch_size: int = 8,
    gate: str = "auto",
    progress: bool = True,
    prepare: Callable[[Candidate], Callable[[], AbstractContextManager]] | None = None,
    metric: str = "perplexity",
) -> tuple[Candidate, list[Candidate]]:
    """(best candidate, every candidate scored); ties go to the lower rank.

    Every candidate gets ``score`` = its validation perplexity, and the best has the least. With ``metric="kl"``
    every candidate also gets ``validation_kl`` = its mean per-token KL from the unpruned model on the same tokens,
    and the best has the least KL (the damage the energy predicts). Measured on two models and two held-out domains
    (docs/results.md §1, "Which rule picks"), neither rule wins everywhere at 16 validation windows; perplexity on
    more windows does best, so it is the default. The candidates are evaluated together (the
    blocks they share run once). ``prepare(candidate)``, when given, fits that candidate's repair and returns a
    factory of contexts in which the gated model carries it (repair-aware selection); a candidate it refuses
    (`BlockCBOError`) scores infinity.
    """
    if metric not in METRICS:
        raise BlockCBOError(f"validation metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if not candidates:
        raise BlockCBOError("no candidate to select from")
    contexts: list[Callable[[], AbstractContextManager] | None] | None = None
    refused: set[int] = set()
    if prepare is not None:
        contexts = []
        for i, c in enumerate(tqdm(candidates, desc="repairing candidates", disable=not progress)):
            try:
                contexts.append(prepare(c))
            except BlockCBOError:
                contexts.append(None)
                refused.add(i)
    scorable = [i for i in range(len(candidates)) if i not in refused]
    states = [candidates[i].blocks for i in scorable]
    ppl = dict.fromkeys(range(len(candidates)), math.inf)
    kl = dict.fromkeys(range(len(candidates)), math.inf)
    if states and metric == "kl":
        hooks = [contexts[i] for i in scorable] if contexts is not None else None
        damage = measure_states(model, states, validation, gate, batch_size, progress, contexts=hooks)
        ppl.update(zip(scorable, damage.perplexity, strict=True))
        kl.update(zip(scorable, damage.kl, strict=True))
    elif states and contexts is None:  # one trie over the candidates: the blocks they share run once
        ppl.update(zip(scorable, perplexities(model, validation, states, batch_size, gate, progress), strict=True))
    elif states:
        for i in tqdm(scorable, desc="validating candidates", disable=not progress):
            with contexts[i]():
                ppl[i] = perplexity(model, validation, candidates[i].blocks, batch_size=batch_size, gate=gate)
    scored = [
        replace(c, score=ppl[i], validation_kl=kl[i] if metric == "kl" else None) for i, c in enumerate(candidates)
    ]
    key = (lambda c: (c.validation_kl, c.rank)) if metric == "kl" else (lambda c: (c.score, c.rank))
    best = min(scored, key=key)
    if not math.isfinite(best.score):
        raise BlockCBOError(
            "no candidate could be scored: every one was refused (e.g. repair cannot fold into tied embeddings); "
            "protect block 0 (`protected`) or do without the repair (`repair=false`)"
        )
    return best, scored


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    import numpy as np

    def ranks(values):
        values = np.asarray(values, dtype=float)
        order = values.argsort(kind="stable")
        out = np.empty(len(values))
        out[order] = np.arange(len(values), dtype=float)
        for v in np.unique(values):
            tie = values == v
            out[tie] = out[tie].mean()
        return out

    if len(x) < 2:
        return float("nan")
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])
