"""Certified K-best branch and bound for min xᵀQx s.t. Σx = M with Q positive semidefinite.

Depth-first over the blocks sorted by their diagonal, seeded with the tabu search's K-th energy. At a node the
chosen prefix S fixes E_S and the field f = Q·x_S; any completion y (r more blocks after the prefix's last one) has

    E = E_S + 2fᵀy + yᵀQy = E_S + λr + (2f + ... )  with  yᵀQy = yᵀ(Q − λI)y + λΣy  for binary y,

where λ is the smallest eigenvalue of Q on the subspace Σx = 0 (every feasible direction lies there), so the shifted
quadratic stays convex on the feasible set (a QCR-style convexification computed once per problem). Relaxing
y ∈ {0,1} to y ∈ [0,1] with Σy = r gives a convex problem; a few Frank–Wolfe steps give a feasible point and the
Wolfe dual gap a *valid* lower bound whatever the number of steps. Subtrees whose bound reaches the current K-th
energy are pruned. Bounds are computed only where they pay (above the last levels, which are enumerated in O(1) per
state). The first-level branches run from Python so the time limit is honoured; the result is certified when the
search finished, otherwise the proven lower bound on every unexplored state is reported.
"""

from __future__ import annotations

import time

import numpy as np
from numba import njit

from .kbest import archive_contents, archive_insert, new_archive


@njit(cache=True)
def _relaxation_bound(Q, lam, field, start, r, steps):
    """Lower bound of min 2fᵀy + yᵀQy over y ∈ [0,1]^(n−start), Σy = r, via Frank–Wolfe with the Wolfe gap."""
    n = Q.shape[0]
    m = n - start
    c = np.empty(m)
    for a in range(m):
        c[a] = 2.0 * field[start + a] + lam  # linear part after the shift: λ·y_i for binary y_i
    # start: the r smallest of the separable part (diagonal of the shifted matrix + linear term)
    score = np.empty(m)
    for a in range(m):
        score[a] = Q[start + a, start + a] - lam + c[a]
    order = np.argsort(score)
    y = np.zeros(m)
    for t in range(r):
        y[order[t]] = 1.0
    qy = np.zeros(m)
    for a in range(m):
        if y[a] != 0.0:
            for b in range(m):
                qy[b] += (Q[start + a, start + b] - (lam if a == b else 0.0)) * y[a]
    best = -np.inf
    for _ in range(steps):
        value = 0.0
        grad = np.empty(m)
        for a in range(m):
            value += y[a] * (qy[a] + c[a])
            grad[a] = 2.0 * qy[a] + c[a]
        gorder = np.argsort(grad)
        s = np.zeros(m)
        gap = 0.0
        for t in range(r):
            s[gorder[t]] = 1.0
        for a in range(m):
            gap += grad[a] * (s[a] - y[a])
        bound = value + gap
        if bound > best:
            best = bound
        if gap > -1e-12:
            break
        # exact line search on the convex quadratic along d = s − y
        d = s - y
        qd = np.zeros(m)
        for a in range(m):
            if d[a] != 0.0:
                for b in range(m):
                    qd[b] += (Q[start + a, start + b] - (lam if a == b else 0.0)) * d[a]
        curvature = 0.0
        for a in range(m):
            curvature += d[a] * qd[a]
        step = 1.0 if curvature <= 1e-18 else min(1.0, -gap / (2.0 * curvature))
        for a in range(m):
            y[a] += step * d[a]
            qy[a] += step * qd[a]
    return best


@njit(cache=True)
def _search(Q, lam, num_remove, first, energies, states, hashes, size, bound_depth, steps, stats, ceiling):
    """Depth-first search of every state whose smallest block is ``first``; prunes with the relaxation bound."""
    n = Q.shape[0]
    m = num_remove
    field = np.zeros((m + 1, n))
    prefix_energy = np.zeros(m + 1)
    pos = np.zeros(m + 1, dtype=np.int64)
    chosen = np.zeros(m, dtype=np.int64)
    zero_hash = np.uint64(0)
    chosen[0] = first
    prefix_energy[1] = Q[first, first]
    for t in range(n):
        field[1, t] = Q[first, t]
    if m == 1:
        archive_insert(energies, states, hashes, size, prefix_energy[1], chosen, zero_hash, False)
        return
    depth = 1
    pos[1] = first + 1
    while depth >= 1:
        threshold = energies[0] if size[0] == energies.shape[0] else np.inf
        threshold = min(threshold, ceiling)
        j = pos[depth]
        if j > n - (m - depth):
            depth -= 1
            if depth >= 1:
                pos[depth] += 1
            continue
        if depth == m - 1:
            base = prefix_energy[depth]
            for k in range(j, n):
                e = base + Q[k, k] + 2.0 * field[depth, k]
                if e < threshold:
                    chosen[depth] = k
                    archive_insert(energies, states, hashes, size, e, chosen, zero_hash, False)
                    threshold = min(energies[0] if size[0] == energies.shape[0] else np.inf, ceiling)
            stats[1] += n - j
            depth -= 1
            if depth >= 1:
                pos[depth] += 1
            continue
        if depth <= bound_depth and threshold < np.inf and pos[depth] == j and j == (chosen[depth - 1] + 1):
            # bound once per node: every completion of the prefix uses r = m − depth blocks from positions ≥ j
            stats[0] += 1
            lower = prefix_energy[depth] + _relaxation_bound(Q, lam, field[depth], j, m - depth, steps)
            if lower >= threshold:
                stats[2] += 1
                depth -= 1
                if depth >= 1:
                    pos[depth] += 1
                continue
        chosen[depth] = j
        prefix_energy[depth + 1] = prefix_energy[depth] + Q[j, j] + 2.0 * field[depth, j]
        for t in range(n):
            field[depth + 1, t] = field[depth, t] + Q[j, t]
        pos[depth + 1] = j + 1
        depth += 1


def subspace_lambda(Q: np.ndarray) -> float:
    """Smallest eigenvalue of Q on {x : Σx = 0} (minus a safety margin), ≥ λ_min(Q) by interlacing."""
    n = Q.shape[0]
    basis = np.linalg.qr(np.eye(n) - 1.0 / n)[0][:, : n - 1]
    value = float(np.linalg.eigvalsh(basis.T @ Q @ basis).min())
    return value - 1e-9 * max(1.0, abs(value))


def branch_and_bound_topk(
    Q: np.ndarray,
    num_remove: int,
    top_k: int,
    seed_states: np.ndarray | None = None,
    seed_energies: np.ndarray | None = None,
    time_limit: float | None = None,
    steps: int = 3,
) -> tuple[np.ndarray, np.ndarray, bool, dict]:
    """(states, energies, certified, info): the exact K lowest states when the search completes in time."""
    n = Q.shape[0]
    order = np.argsort(np.diag(Q), kind="stable")  # low-energy blocks first: good states early, tight threshold
    Qs = np.ascontiguousarray(Q[np.ix_(order, order)])
    lam = subspace_lambda(Qs)
    energies, states, hashes, size = new_archive(top_k, num_remove)
    # a heuristic's K-th energy caps the search from the start (K distinct states at or below it exist); the
    # states themselves are found again by the search, so the archive never holds duplicates
    ceiling = np.inf
    if seed_energies is not None and len(seed_energies) >= top_k:
        kth = float(np.sort(seed_energies)[top_k - 1])
        ceiling = kth + 1e-12 * max(1.0, abs(kth))
    stats = np.zeros(3, dtype=np.int64)  # bounds computed, leaves enumerated, subtrees pruned
    bound_depth = max(1, num_remove - 4)  # bounds cost O(N²) per step: only near the root, where they pay
    start = time.perf_counter()
    certified = True
    explored_first = -1
    for first in range(n - num_remove + 1):
        _search(Qs, lam, num_remove, first, energies, states, hashes, size, bound_depth, steps, stats, ceiling)
        explored_first = first
        if time_limit is not None and time.perf_counter() - start > time_limit and first < n - num_remove:
            certified = False
            break
    found_states, found_energies = archive_contents(energies, states, size)
    found_states = np.sort(order[found_states], axis=1)
    info = {
        "bounds_computed": int(stats[0]),
        "states_enumerated": int(stats[1]),
        "subtrees_pruned": int(stats[2]),
        "lambda_shift": lam,
        "explored_first_blocks": explored_first + 1,
    }
    return found_states, found_energies, certified, info
