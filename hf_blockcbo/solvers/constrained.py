"""Constraints beyond Σx = M: per-kind counts (hybrid models) and a parameter budget, with an exact enumerator.

The enumerator walks the same depth-first tree as :mod:`.exact` but prunes any branch that can no longer meet a
per-kind count, and admits a leaf only if the removed parameters reach the budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from ..errors import BlockCBOError
from .kbest import archive_contents, archive_insert, new_archive


@dataclass(frozen=True)
class Constraints:
    """Extra constraints on which blocks may go.

    Args:
        per_kind (`Mapping[str, int]`): exact number of blocks of each named kind to remove (e.g. `{"attention": 2,
            "moe": 1}`); kinds not named are free.
        kinds (`Sequence[str]`): the kind of each block (from the Hessian artifact).
        min_removed_parameters (`int`): remove at least this many parameters (with `block_parameters`).
        block_parameters (`Sequence[int]`): parameters of each block.
    """

    per_kind: Mapping[str, int] = field(default_factory=dict)
    kinds: Sequence[str] = ()
    min_removed_parameters: int = 0
    block_parameters: Sequence[int] = ()

    @property
    def active(self) -> bool:
        return bool(self.per_kind) or self.min_removed_parameters > 0

    def admits(self, removed: Sequence[int]) -> bool:
        """Whether removing exactly the blocks ``removed`` meets every per-kind count and the parameter budget."""
        for kind, count in self.per_kind.items():
            if count >= 0 and sum(self.kinds[i] == kind for i in removed) != count:
                return False
        if self.min_removed_parameters > 0:
            return sum(self.block_parameters[i] for i in removed) >= self.min_removed_parameters
        return True

    def encode(self, index_map: np.ndarray, num_remove: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """(kind id per variable, required count per kind id (-1 = free), weights, min weight) for the reduced problem."""
        n = len(index_map)
        if self.per_kind:
            if len(self.kinds) <= int(index_map.max()):
                raise BlockCBOError("per-kind counts need the kind of every block (the artifact's block_kinds)")
            names = sorted(set(self.kinds))
            unknown = sorted(k for k, count in self.per_kind.items() if count > 0 and k not in names)
            if unknown:
                raise BlockCBOError(f"no blocks of kind {unknown}; this model has kinds {names}")
            kind_ids = np.array([names.index(self.kinds[i]) for i in index_map], dtype=np.int64)
            required = np.array([self.per_kind.get(name, -1) for name in names], dtype=np.int64)
            fixed = int(required[required >= 0].sum())
            free_kinds = [k for k, r in enumerate(required) if r < 0]
            for k, r in enumerate(required):
                if r > int((kind_ids == k).sum()):
                    raise BlockCBOError(
                        f"cannot remove {r} blocks of kind {names[k]!r}: only {(kind_ids == k).sum()} can go"
                    )
            if fixed > num_remove or (not free_kinds and fixed != num_remove):
                raise BlockCBOError(
                    f"per-kind counts {dict(self.per_kind)} sum to {fixed}, which cannot make {num_remove} blocks"
                )
        else:
            kind_ids = np.zeros(n, dtype=np.int64)
            required = np.array([-1], dtype=np.int64)
        if self.min_removed_parameters > 0:
            if len(self.block_parameters) <= int(index_map.max()):
                raise BlockCBOError("a parameter budget needs each block's parameter count (the artifact's)")
            weights = np.array([self.block_parameters[i] for i in index_map], dtype=np.float64)
        else:
            weights = np.zeros(n, dtype=np.float64)
        return kind_ids, required, weights, float(self.min_removed_parameters)


def parse_per_kind(text: str | None) -> dict[str, int]:
    """`"attention=2,moe=1"` → `{"attention": 2, "moe": 1}`."""
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        name, sep, count = part.partition("=")
        if not sep or not count.strip().isdigit():
            raise BlockCBOError(f"--per-kind takes KIND=COUNT pairs like attention=2,moe=1, got {text!r}")
        out[name.strip()] = int(count)
    return out


@njit(cache=True)
def _enumerate_constrained(Q, num_remove, kind_ids, required, weights, min_weight, energies, states, hashes, size):
    n = Q.shape[0]
    m = num_remove
    num_kinds = required.shape[0]
    remaining = np.zeros((n + 1, num_kinds), dtype=np.int64)  # blocks of each kind at positions >= t
    for t in range(n - 1, -1, -1):
        for k in range(num_kinds):
            remaining[t, k] = remaining[t + 1, k]
        remaining[t, kind_ids[t]] += 1
    sorted_w = np.sort(weights)[::-1]
    field = np.zeros((m + 1, n))
    prefix_energy = np.zeros(m + 1)
    prefix_weight = np.zeros(m + 1)
    counts = np.zeros((m + 1, num_kinds), dtype=np.int64)
    pos = np.zeros(m + 1, dtype=np.int64)
    chosen = np.zeros(m, dtype=np.int64)
    top_weights = np.zeros(m + 1)  # the largest weights any `r` more blocks could add: bounds the budget
    for r in range(1, m + 1):
        top_weights[r] = top_weights[r - 1] + sorted_w[r - 1]
    zero_hash = np.uint64(0)
    depth = 0
    while depth >= 0:
        j = pos[depth]
        if j > n - (m - depth):
            depth -= 1
            if depth >= 0:
                pos[depth] += 1
            continue
        k = kind_ids[j]
        ok = required[k] < 0 or counts[depth, k] < required[k]
        if ok:
            # every required kind must still be reachable after taking j
            slots = m - depth - 1
            need = 0
            for kk in range(num_kinds):
                if required[kk] >= 0:
                    have = counts[depth, kk] + (1 if kk == k else 0)
                    missing = required[kk] - have
                    if missing > remaining[j + 1, kk]:
                        ok = False
                        break
                    need += missing
            if ok and need > slots:
                ok = False
            if ok and prefix_weight[depth] + weights[j] + top_weights[slots] < min_weight:
                ok = False
        if not ok:
            pos[depth] += 1
            continue
        e = prefix_energy[depth] + Q[j, j] + 2.0 * field[depth, j]
        chosen[depth] = j
        if depth == m - 1:
            if prefix_weight[depth] + weights[j] >= min_weight:
                full = True
                for kk in range(num_kinds):
                    if required[kk] >= 0 and counts[depth, kk] + (1 if kk == k else 0) != required[kk]:
                        full = False
                if full and (size[0] < energies.shape[0] or e < energies[0]):
                    archive_insert(energies, states, hashes, size, e, chosen, zero_hash, False)
            pos[depth] += 1
            continue
        prefix_energy[depth + 1] = e
        prefix_weight[depth + 1] = prefix_weight[depth] + weights[j]
        for kk in range(num_kinds):
            counts[depth + 1, kk] = counts[depth, kk]
        counts[depth + 1, k] += 1
        for t in range(n):
            field[depth + 1, t] = field[depth, t] + Q[j, t]
        pos[depth + 1] = j + 1
        depth += 1


def enumerate_constrained(
    Q: np.ndarray, num_remove: int, top_k: int, kind_ids, required, weights, min_weight
) -> tuple[np.ndarray, np.ndarray]:
    energies, states, hashes, size = new_archive(top_k, num_remove)
    _enumerate_constrained(
        np.ascontiguousarray(Q, dtype=np.float64),
        num_remove,
        kind_ids,
        required,
        weights,
        min_weight,
        energies,
        states,
        hashes,
        size,
    )
    return archive_contents(energies, states, size)


def swap_classes(kind_ids: np.ndarray, required: np.ndarray) -> np.ndarray:
    """Blocks that may swap with each other without changing a per-kind count share a class (all free kinds: one)."""
    free = len(required)
    return np.array([k if required[k] >= 0 else free for k in kind_ids], dtype=np.int64)


def feasible_start(classes: np.ndarray, kind_ids, required, num_remove: int, rng: np.random.Generator) -> np.ndarray:
    """A random state meeting the per-kind counts."""
    x = np.zeros(len(classes), dtype=np.int64)
    taken = 0
    for k, r in enumerate(required):
        if r > 0:
            x[rng.choice(np.flatnonzero(kind_ids == k), size=r, replace=False)] = 1
            taken += r
    free = np.flatnonzero(classes == len(required))
    if num_remove > taken:
        x[rng.choice(free, size=num_remove - taken, replace=False)] = 1
    return x
