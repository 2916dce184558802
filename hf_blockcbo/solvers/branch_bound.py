"""Certified K-best branch and bound for min xᵀQx s.t. Σx = M, compiled with numba and run on every core.

Depth-first over the blocks sorted by *decreasing* diagonal: the costly blocks are decided first, so a prefix that
takes one is pruned near the root. A node is a prefix S (energy E_S, field f = Q·x_S) that still has to choose r
blocks from the positions ≥ p. With g_t = Q_tt + 2f_t, any completion Y (|Y| = r) has

    E = E_S + Σ_{t∈Y} g_t + Σ_{t∈Y} Σ_{u∈Y, u≠t} Q_tu  ≥  E_S + Σ_{t∈Y} (g_t + s_t),

where s_t is the sum of the r − 1 most negative entries Q_tu over u ≥ p, u ≠ t (a table computed once per (Q, M)).
So E_S plus the r smallest values of g_t + s_t bounds every state below the node, and the node is pruned when the
bound reaches the K-th energy found so far. Unlike a row bound on the diagonal, it accounts for the cancellations
that make low states (each block's most negative partners), and in the last two levels the pairs are closed
exactly in the all-pairs form E_S + g_j + g_k + 2Q_jk with a per-row minimum test in front, so few pairs are
touched at all.

Work is split into prefixes of three blocks, interleaved over threads (numba ``prange``); each thread keeps its own
K-best archive and all threads share the best admission threshold (any thread's K-th energy bounds the global K-th).
A timer raises a flag the compiled search polls at every node, so the time limit is honoured to the millisecond
whatever the size of a subtree; an unfinished search returns the best list found,
not certified, with the smallest bound over the prefixes left unexplored (no state outside the list lies below
``min(lower_bound, K-th energy)``).
"""

from __future__ import annotations

import math
import threading
import time

import numpy as np
from numba import get_num_threads, njit, prange

from ..errors import BlockCBOError
from .base import Problem, register_solver
from .kbest import archive_insert


PREFIX = 3  # blocks per work item


def partner_table(Q: np.ndarray, num_remove: int) -> np.ndarray:
    """``small[t, p, r]``: sum of the r smallest ``Q[t, u]`` over u ≥ p, u ≠ t (r ≤ M − 1; ∞ where too few)."""
    n = Q.shape[0]
    small = np.full((n, n + 1, num_remove), np.inf)
    small[:, :, 0] = 0.0
    for t in range(n):
        for p in range(n):
            row = np.sort(np.delete(Q[t, p:], t - p) if t >= p else Q[t, p:])
            r = min(num_remove - 1, row.shape[0])
            small[t, p, 1 : r + 1] = np.cumsum(row[:r])
    return small


@njit(cache=True)
def _threshold(energies, size, shared):
    own = energies[0] if size[0] == energies.shape[0] else np.inf
    return min(own, shared[0])


@njit(cache=True)
def _node_bound(g, small, p, n, r, buf):
    """Σ of the r smallest ``g_t + small[t, p, r − 1]`` over t ≥ p: a lower bound on any completion's energy."""
    for i in range(r):
        buf[i] = np.inf
    for t in range(p, n):
        h = g[t] + small[t, p, r - 1]
        if h < buf[r - 1]:
            i = r - 1
            while i > 0 and buf[i - 1] > h:
                buf[i] = buf[i - 1]
                i -= 1
            buf[i] = h
    total = 0.0
    for i in range(r):
        total += buf[i]
    return total


@njit(cache=True, fastmath=True)
def _row_min(g, Q2, j, n):
    best = np.inf
    for k in range(j + 1, n):
        best = min(best, g[k] + Q2[j, k])
    return best


@njit(cache=True)
def _close_pairs(Q2, g, base, lo, n, chosen, m, energies, states, hashes, size, shared, stats):
    """Every pair j < k from ``lo`` on completes the prefix: E = base + g_j + g_k + 2Q_jk."""
    zero_hash = np.uint64(0)
    for j in range(lo, n - 1):
        threshold = _threshold(energies, size, shared)
        ej = base + g[j]
        if ej + _row_min(g, Q2, j, n) >= threshold:
            continue
        stats[1] += 1
        for k in range(j + 1, n):
            e = ej + g[k] + Q2[j, k]
            if e < threshold:
                chosen[m - 2] = j
                chosen[m - 1] = k
                archive_insert(energies, states, hashes, size, e, chosen, zero_hash, False)
                if size[0] == energies.shape[0] and energies[0] < shared[0]:
                    shared[0] = energies[0]
                threshold = _threshold(energies, size, shared)


@njit(cache=True)
def _search_prefix(Q, Q2, small, m, prefix, energies, states, hashes, size, shared, stats, stop):
    """All states that start with ``prefix`` (sorted positions, length L ≤ M − 2), pruned by the node bound.

    Returns False when ``stop[0]`` was raised (by the time-limit timer) before the subtree was finished.
    """
    n = Q.shape[0]
    L = prefix.shape[0]
    field = np.zeros((m + 1, n))
    energy = np.zeros(m + 1)
    pos = np.zeros(m + 1, dtype=np.int64)
    fresh = np.zeros(m + 1, dtype=np.bool_)
    chosen = np.zeros(m, dtype=np.int64)
    g = np.empty(n)
    buf = np.empty(m)
    for d in range(L):
        j = prefix[d]
        chosen[d] = j
        energy[d + 1] = energy[d] + Q[j, j] + 2.0 * field[d, j]
        for t in range(n):
            field[d + 1, t] = field[d, t] + Q[j, t]
    pos[L] = prefix[L - 1] + 1 if L > 0 else 0
    fresh[L] = True
    depth = L
    while depth >= L:
        if stop[0] != 0:
            return False
        if fresh[depth]:
            fresh[depth] = False
            lo = pos[depth]
            for t in range(lo, n):
                g[t] = Q[t, t] + 2.0 * field[depth, t]
            threshold = _threshold(energies, size, shared)
            if threshold < np.inf:
                stats[0] += 1
                if energy[depth] + _node_bound(g, small, lo, n, m - depth, buf) >= threshold:
                    stats[2] += 1
                    depth -= 1
                    if depth >= L:
                        pos[depth] += 1
                    continue
            if depth == m - 2:
                _close_pairs(Q2, g, energy[depth], lo, n, chosen, m, energies, states, hashes, size, shared, stats)
                depth -= 1
                if depth >= L:
                    pos[depth] += 1
                continue
        j = pos[depth]
        if j > n - (m - depth):
            depth -= 1
            if depth >= L:
                pos[depth] += 1
            continue
        chosen[depth] = j
        energy[depth + 1] = energy[depth] + Q[j, j] + 2.0 * field[depth, j]
        for t in range(n):
            field[depth + 1, t] = field[depth, t] + Q[j, t]
        pos[depth + 1] = j + 1
        fresh[depth + 1] = True
        depth += 1
    return True


@njit(cache=True, parallel=True, nogil=True)
def _run_items(
    Q, Q2, small, m, items, first, last, threads, energies, states, hashes, sizes, shared, stats, stop, done
):
    for t in prange(threads):
        for i in range(first + t, last, threads):
            if _search_prefix(
                Q, Q2, small, m, items[i], energies[t], states[t], hashes[t], sizes[t], shared, stats[t], stop
            ):
                done[i] = True


@njit(cache=True)
def _items_bound(Q, small, m, items, first, out):
    """The node bound at each unexplored prefix (a lower bound on every state below it)."""
    n = Q.shape[0]
    g = np.empty(n)
    f = np.empty(n)
    buf = np.empty(m)
    for i in range(first, items.shape[0]):
        prefix = items[i]
        e = 0.0
        for t in range(n):
            f[t] = 0.0
        for d in range(prefix.shape[0]):
            j = prefix[d]
            e += Q[j, j] + 2.0 * f[j]
            for t in range(n):
                f[t] += Q[j, t]
        lo = prefix[prefix.shape[0] - 1] + 1 if prefix.shape[0] > 0 else 0
        for t in range(lo, n):
            g[t] = Q[t, t] + 2.0 * f[t]
        out[i] = e + _node_bound(g, small, lo, n, m - prefix.shape[0], buf)


def _work_items(n: int, m: int) -> np.ndarray:
    """Prefixes of min(3, M − 2) positions that can still be completed, largest subtrees first."""
    length = max(0, min(PREFIX, m - 2))
    if length == 0:
        return np.zeros((1, 0), dtype=np.int64)
    from itertools import combinations

    items = [c for c in combinations(range(n), length) if n - c[-1] - 1 >= m - length]
    size = [math.comb(n - c[-1] - 1, m - length) for c in items]
    order = np.argsort(-np.asarray(size, dtype=np.float64), kind="stable")
    return np.ascontiguousarray(np.asarray(items, dtype=np.int64)[order])


def branch_and_bound_topk(
    Q: np.ndarray,
    num_remove: int,
    top_k: int,
    seed_states: np.ndarray | None = None,
    seed_energies: np.ndarray | None = None,
    time_limit: float | None = None,
    threads: int | None = None,
    max_items: int | None = None,
) -> tuple[np.ndarray, np.ndarray, bool, dict]:
    """(states, energies, certified, info): the exact K lowest states when the search completes in time.

    ``max_items`` stops after that many work items (prefixes), like the time limit does.

    ``seed_energies`` (e.g. from tabu search) cap the admission threshold from the start: with K of them, every
    state of the true top-K lies at or below their K-th energy.
    """
    n = Q.shape[0]
    m = num_remove
    if m == 1:  # every state is one block: its diagonal
        order = np.argsort(np.diag(Q), kind="stable")[:top_k]
        return order[:, None].astype(np.int64), np.diag(Q)[order].copy(), True, {"threads": 1}
    threads = max(1, threads or get_num_threads())
    order = np.argsort(-np.diag(Q), kind="stable")  # costly blocks first: prefixes that take them die early
    Qs = np.ascontiguousarray(Q[np.ix_(order, order)], dtype=np.float64)
    Q2 = 2.0 * Qs
    small = partner_table(Qs, m)
    items = _work_items(n, m)
    energies = np.full((threads, top_k), np.inf)
    states = np.zeros((threads, top_k, m), dtype=np.int64)
    hashes = np.zeros((threads, top_k), dtype=np.uint64)
    sizes = np.zeros((threads, 1), dtype=np.int64)
    stats = np.zeros((threads, 3), dtype=np.int64)  # nodes bounded, pair rows scanned, nodes pruned
    shared = np.array([np.inf])
    if seed_energies is not None and len(seed_energies) >= top_k:
        kth = float(np.sort(seed_energies)[top_k - 1])
        shared[0] = kth + 1e-12 * max(1.0, abs(kth))  # K distinct states at or below it exist
    start = time.perf_counter()
    finished = np.zeros(len(items), dtype=np.bool_)
    stop_flag = np.zeros(1, dtype=np.int64)
    timer = None
    if time_limit is not None:  # raises the flag the compiled search polls at every node: no overrun
        timer = threading.Timer(max(0.0, time_limit), lambda: stop_flag.__setitem__(0, 1))
        timer.daemon = True
        timer.start()
    done = 0
    chunk = threads
    stop = len(items) if max_items is None else min(len(items), max_items)
    try:
        while done < stop and stop_flag[0] == 0:
            last = min(stop, done + chunk)
            _run_items(
                Qs,
                Q2,
                small,
                m,
                items,
                done,
                last,
                threads,
                energies,
                states,
                hashes,
                sizes,
                shared,
                stats,
                stop_flag,
                finished,
            )
            done = last
            chunk = min(4096, chunk * 2) if time.perf_counter() - start < 0.5 else chunk  # grow while calls are short
    finally:
        if timer is not None:
            timer.cancel()
    found_states = np.concatenate([states[t, : sizes[t, 0]] for t in range(threads)])
    found_energies = np.concatenate([energies[t, : sizes[t, 0]] for t in range(threads)])
    best = np.argsort(found_energies, kind="stable")[:top_k]
    found_states, found_energies = found_states[best], found_energies[best]
    certified = bool(finished.all())
    lower_bound = None
    if not certified:
        bounds = np.full(len(items), np.inf)
        _items_bound(Qs, small, m, items, 0, bounds)
        lower_bound = float(bounds[~finished].min())
    info = {
        "threads": threads,
        "nodes_bounded": int(stats[:, 0].sum()),
        "pair_rows_scanned": int(stats[:, 1].sum()),
        "nodes_pruned": int(stats[:, 2].sum()),
        "work_items": len(items),
        "work_items_done": int(finished.sum()),
        "lower_bound": lower_bound,
    }
    return np.sort(order[found_states], axis=1), found_energies, certified, info


@register_solver("bnb")
def solve_branch_and_bound(problem: Problem):
    """Branch and bound seeded by tabu's list: certified when it finishes, else the better of both with a bound."""
    from .tabu import tabu_topk

    if problem.constraints is not None:
        raise BlockCBOError(
            "branch and bound takes no per-kind counts or budget yet; use `solver=exact` or `solver=tabu`"
        )
    Q, num_remove, top_k, time_limit = problem.Q, problem.num_remove, problem.top_k, problem.time_limit
    start = time.perf_counter()
    seed_states, seed_energies, _ = tabu_topk(Q, num_remove, top_k, seed=problem.seed, time_limit=time_limit)
    left = None if time_limit is None else max(0.0, time_limit - (time.perf_counter() - start))
    states, energies, certified, info = branch_and_bound_topk(
        Q, num_remove, top_k, seed_states, seed_energies, time_limit=left
    )
    if not certified:  # keep the better of what tabu and the unfinished search found
        merged = {tuple(int(b) for b in row): float(e) for row, e in zip(seed_states, seed_energies, strict=True)}
        merged.update({tuple(int(b) for b in row): float(e) for row, e in zip(states, energies, strict=True)})
        best = sorted(merged.items(), key=lambda item: item[1])[:top_k]
        states = np.array([list(k) for k, _ in best], dtype=np.int64).reshape(len(best), num_remove)
        energies = np.array([e for _, e in best])
    return states, energies, certified, info
