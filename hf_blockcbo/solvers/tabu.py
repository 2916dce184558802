"""Swap tabu search with a K-best archive for min xᵀQx s.t. Σx = M.

A move swaps one removed block i for one kept block j, so the constraint holds by construction. With the field
``f = Qx``, ``Δ = a_i + b_j − 2Q_ij`` where ``a_i = Q_ii − 2f_i`` and ``b_j = Q_jj + 2f_j``: O(1) per move, O(N) to
apply one. Every evaluated neighbour below the archive's K-th energy enters the archive, so one run yields the whole
top-K. Restarts begin from a perturbed archive member. Deterministic for a given seed.
"""

from __future__ import annotations

import time

import numpy as np
from numba import njit

from ..errors import BlockCBOError
from .base import Problem, register_solver
from .kbest import archive_contents, archive_insert, new_archive


@njit(cache=True)
def _state_of(x, num_remove):
    out = np.empty(num_remove, dtype=np.int64)
    k = 0
    for t in range(x.shape[0]):
        if x[t]:
            out[k] = t
            k += 1
    return out


@njit(cache=True)
def _swapped_state(removed_sorted, i, j):
    """Sorted state: ``removed_sorted`` without i, with j."""
    m = removed_sorted.shape[0]
    out = np.empty(m, dtype=np.int64)
    k = 0
    placed = False
    for t in range(m):
        v = removed_sorted[t]
        if v == i:
            continue
        if not placed and j < v:
            out[k] = j
            k += 1
            placed = True
        out[k] = v
        k += 1
    if not placed:
        out[k] = j
    return out


@njit(cache=True)
def _tabu_run(Q, x, classes, iterations, tenure, zobrist, energies, states, hashes, size, seed):
    """One tabu walk from ``x`` (modified in place); returns the best energy it saw."""
    np.random.seed(seed)
    n = Q.shape[0]
    m = 0
    for t in range(n):
        m += x[t]
    field = Q @ x.astype(np.float64)
    e_cur = 0.0
    h_cur = np.uint64(0)
    for t in range(n):
        if x[t]:
            e_cur += field[t]
            h_cur ^= zobrist[t]
    removed = _state_of(x, m)
    archive_insert(energies, states, hashes, size, e_cur, removed, h_cur, True)
    best = e_cur
    tabu_until = np.zeros(n, dtype=np.int64)
    kept = np.empty(n - m, dtype=np.int64)
    for it in range(1, iterations + 1):
        k = 0
        for t in range(n):
            if not x[t]:
                kept[k] = t
                k += 1
        threshold = energies[0] if size[0] == energies.shape[0] else np.inf
        best_delta = np.inf
        best_i = -1
        best_j = -1
        ties = 0
        for a in range(m):
            i = removed[a]
            ai = Q[i, i] - 2.0 * field[i]
            for b in range(n - m):
                j = kept[b]
                if classes[i] != classes[j]:
                    continue
                delta = ai + Q[j, j] + 2.0 * field[j] - 2.0 * Q[i, j]
                e_new = e_cur + delta
                if e_new < threshold:
                    if archive_insert(
                        energies,
                        states,
                        hashes,
                        size,
                        e_new,
                        _swapped_state(removed, i, j),
                        h_cur ^ zobrist[i] ^ zobrist[j],
                        True,
                    ):
                        threshold = energies[0] if size[0] == energies.shape[0] else np.inf
                allowed = (tabu_until[i] < it and tabu_until[j] < it) or e_new < best - 1e-12
                if not allowed:
                    continue
                if delta < best_delta - 1e-12:
                    best_delta = delta
                    best_i = i
                    best_j = j
                    ties = 1
                elif abs(delta - best_delta) <= 1e-12:
                    ties += 1
                    if np.random.randint(ties) == 0:
                        best_i = i
                        best_j = j
        if best_i < 0:
            break
        x[best_i] = 0
        x[best_j] = 1
        for t in range(n):
            field[t] += Q[best_j, t] - Q[best_i, t]
        e_cur += best_delta
        h_cur ^= zobrist[best_i] ^ zobrist[best_j]
        removed = _swapped_state(removed, best_i, best_j)
        tabu_until[best_i] = it + tenure + np.random.randint(3)
        tabu_until[best_j] = it + tenure + np.random.randint(3)
        if e_cur < best:
            best = e_cur
    return best


def tabu_topk(
    Q: np.ndarray,
    num_remove: int,
    top_k: int,
    seed: int = 0,
    restarts: int | None = None,
    iterations: int | None = None,
    time_limit: float | None = None,
    patience: int = 8,
    classes: np.ndarray | None = None,
    initial=None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """States and energies of the lowest ``top_k`` states found by restarted swap tabu search (unsorted).

    Args:
        restarts (`int`, *optional*): number of walks; default: until ``patience`` walks in a row leave the archive
            unchanged (at most 4N walks).
        iterations (`int`, *optional*): moves per walk, default ``max(50, 10·N)``.
        time_limit (`float`, *optional*): seconds; checked between walks.
        classes (`np.ndarray`, *optional*): only blocks of one class swap (keeps per-kind counts); default all one.
        initial (`Callable`, *optional*): `rng -> x`, a feasible random start; default any M blocks.
    """
    Q = np.ascontiguousarray(Q, dtype=np.float64)
    n = Q.shape[0]
    rng = np.random.default_rng(seed)
    classes = np.zeros(n, dtype=np.int64) if classes is None else np.ascontiguousarray(classes, dtype=np.int64)
    zobrist = rng.integers(1, np.iinfo(np.uint64).max, size=n, dtype=np.uint64)
    energies, states, hashes, size = new_archive(top_k, num_remove)
    iterations = iterations or max(50, 10 * n)
    tenure = max(1, min(num_remove, n - num_remove) // 4 + 1)
    max_walks = restarts if restarts is not None else 4 * n
    start = time.perf_counter()
    unchanged = 0
    walks = 0
    for walk in range(max_walks):
        x = np.zeros(n, dtype=np.int64)
        if walk == 0 or size[0] == 0:
            if initial is None:
                x[rng.choice(n, size=num_remove, replace=False)] = 1
            else:
                x = initial(rng)
        else:
            # perturb a random archive member by a few random swaps
            member = states[rng.integers(int(size[0]))]
            x[member] = 1
            for _ in range(int(rng.integers(1, max(2, num_remove // 2 + 1)))):
                out = rng.choice(np.flatnonzero(x))
                partners = np.flatnonzero((x == 0) & (classes == classes[out]))
                if len(partners):
                    x[out] = 0
                    x[rng.choice(partners)] = 1
        before = (energies.copy(), int(size[0]))
        _tabu_run(Q, x, classes, iterations, tenure, zobrist, energies, states, hashes, size, int(rng.integers(2**31)))
        walks += 1
        changed = int(size[0]) != before[1] or not np.array_equal(np.sort(energies), np.sort(before[0]))
        unchanged = 0 if changed else unchanged + 1
        if restarts is None and unchanged >= patience:
            break
        if time_limit is not None and time.perf_counter() - start > time_limit:
            break
    found_states, found_energies = archive_contents(energies, states, size)
    return found_states, found_energies, {"walks": walks, "iterations_per_walk": iterations, "tenure": tenure}


@register_solver("tabu")
def solve_tabu(problem: Problem):
    """Tabu search from random (or per-kind feasible) starts; not certified."""
    from .constrained import feasible_start, swap_classes

    classes = initial = None
    if problem.constraints is not None:
        kind_ids, required, weights, min_weight = problem.constraints
        if min_weight > 0:
            raise BlockCBOError("the tabu solver does not take a parameter budget; use `solver=exact`")
        classes = swap_classes(kind_ids, required)
        initial = lambda rng: feasible_start(classes, kind_ids, required, problem.num_remove, rng)  # noqa: E731
    states, energies, info = tabu_topk(
        problem.Q,
        problem.num_remove,
        problem.top_k,
        seed=problem.seed,
        time_limit=problem.time_limit,
        classes=classes,
        initial=initial,
    )
    return states, energies, False, info
