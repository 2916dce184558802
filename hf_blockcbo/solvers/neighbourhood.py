"""The K lowest states within a few swaps of a centre state: the trust region of a round's re-expansion.

A round (:mod:`hf_blockcbo.selection.rounds`) expands the measured damage around a state s; the expansion is exact at
s and at every state one swap away (one removed block put back, one kept block removed) and a pairwise extrapolation
beyond. Far from s it is not a model of the damage at all (it can predict a negative KL), so its minimum is searched
only among the states at most ``swaps`` swaps from s, enumerated exactly: C(M, r)·C(N − M, r) states at r swaps.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence

import numpy as np

from ..errors import BlockCBOError
from .base import Candidate, SolveResult, check_matrix
from .constrained import Constraints


_CHUNK = 1 << 15  # states whose energy is summed per numpy call


def region_size(num_blocks: int, num_remove: int, swaps: int) -> int:
    """States at most ``swaps`` swaps from a state removing ``num_remove`` of ``num_blocks`` blocks (itself included)."""
    return sum(math.comb(num_remove, r) * math.comb(num_blocks - num_remove, r) for r in range(swaps + 1))


def _region(centre: list[int], outside: list[int], swaps: int):
    kept = set(centre)
    for r in range(swaps + 1):
        for back in itertools.combinations(centre, r):
            rest = sorted(kept.difference(back))
            for added in itertools.combinations(outside, r):
                yield tuple(sorted(rest + list(added)))


def solve_near(
    Q,
    centre: Sequence[int],
    swaps: int = 2,
    top_k: int = 10,
    protected: Sequence[int] = (),
    constraints: Constraints | None = None,
) -> SolveResult:
    """The ``top_k`` lowest states of ``Q`` (xᵀQx) among those at most ``swaps`` swaps from ``centre`` that keep the
    ``protected`` blocks and meet ``constraints``; exact (``certified``) within that region.

    Args:
        Q (`array-like` of shape `[N, N]`): the energy matrix.
        centre (`Sequence[int]`): the removed blocks of the centre state (its size is M).
        swaps (`int`, defaults to 2): the trust region's radius in swaps.
        top_k (`int`, defaults to 10): states to return (all of the region's if fewer).
    """
    Q = check_matrix(Q)
    n = Q.shape[0]
    centre = sorted({int(b) for b in centre})
    if not centre or centre[-1] >= n or centre[0] < 0:
        raise BlockCBOError(f"the centre must be a non-empty set of blocks in 0..{n - 1}, got {centre}")
    if not isinstance(swaps, int) or swaps < 0:
        raise BlockCBOError(f"swaps must be a non-negative integer, got {swaps!r}")
    banned = {int(p) for p in protected}
    outside = [i for i in range(n) if i not in set(centre) and i not in banned]
    constraints = constraints if constraints is not None and constraints.active else None
    began = time.perf_counter()
    best: list[tuple[float, tuple[int, ...]]] = []
    states = _region(centre, outside, swaps)
    while raw := list(itertools.islice(states, _CHUNK)):
        chunk = [s for s in raw if not banned.intersection(s) and (constraints is None or constraints.admits(s))]
        if not chunk:
            continue
        idx = np.asarray(chunk, dtype=np.int64)
        energies = Q[idx[:, :, None], idx[:, None, :]].sum(axis=(1, 2))
        keep = np.argsort(energies, kind="stable")[:top_k]
        best = sorted(best + [(float(energies[k]), chunk[k]) for k in keep])[:top_k]
    if not best:
        raise BlockCBOError(
            f"no state within {swaps} swaps of {centre} keeps the protected blocks and meets the constraints"
        )
    candidates = [Candidate(rank, blocks, value) for rank, (value, blocks) in enumerate(best)]
    return SolveResult(
        candidates=candidates,
        method="neighbourhood",
        certified=True,
        num_blocks=n,
        num_remove=len(centre),
        seconds=time.perf_counter() - began,
        info={"centre": centre, "swaps": swaps, "region": region_size(len(centre) + len(outside), len(centre), swaps)},
    )
