"""Automatic choice among the low-energy states: evaluate each on a validation split, gate-masked, keep the best.

The paper's own limitation ("the ground state does not always yield the best configuration … an automated selection
procedure would be desirable"): the top-K states are scored by validation perplexity on data separate from the
calibration set, with no copy of the model per candidate (gates switch the blocks off).
"""

from __future__ import annotations

import contextlib
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


SELECTIONS = ("validation", "energy")


def select_by_validation(
    model: nn.Module,
    candidates: list[Candidate],
    validation: CalibrationSet,
    batch_size: int = 8,
    gate: str = "auto",
    progress: bool = True,
    prepare: Callable[[Candidate], AbstractContextManager] | None = None,
) -> tuple[Candidate, list[Candidate]]:
    """(best candidate, every candidate with ``score`` = its validation perplexity); ties go to the lower rank.

    The candidates are evaluated together (:func:`hf_blockcbo.evaluation.many_states.perplexities`: the blocks
    they share run once). ``prepare(candidate)``, when given, returns a context entered while that candidate is scored (repair-aware
    selection fits the candidate's repair maps and hooks them); a candidate it refuses (`BlockCBOError`) scores
    infinity.
    """
    if not candidates:
        raise BlockCBOError("no candidate to select from")
    if prepare is None:  # one trie over the candidates: the blocks they share run once
        scores = perplexities(model, validation, [c.blocks for c in candidates], batch_size, gate, progress)
        scored = [replace(c, score=s) for c, s in zip(candidates, scores, strict=True)]
        return min(scored, key=lambda c: (c.score, c.rank)), scored
    scored = []
    for c in tqdm(candidates, desc="validating candidates", disable=not progress):
        try:
            context = prepare(c) if prepare is not None else contextlib.nullcontext()
        except BlockCBOError:
            scored.append(replace(c, score=math.inf))
            continue
        with context:
            scored.append(replace(c, score=perplexity(model, validation, c.blocks, batch_size=batch_size, gate=gate)))
    best = min(scored, key=lambda c: (c.score, c.rank))
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
