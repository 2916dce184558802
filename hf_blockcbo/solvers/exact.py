"""Exact K-best by enumeration: every C(N, M) state, in depth-first order with incremental energies.

The prefix energy and field ``f = Q·x_prefix`` are carried down the tree; the last two levels are closed in the
all-pairs form ``E = E_prefix + g_j + g_k + 2Q_jk`` with ``g_j = Q_jj + 2f_j``, so each state costs O(1).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..errors import BlockCBOError
from .base import Problem, num_states, register_solver
from .kbest import archive_contents, archive_insert, new_archive


@njit(cache=True)
def _enumerate(Q, num_remove, energies, states, hashes, size):
    n = Q.shape[0]
    m = num_remove
    field = np.zeros((m + 1, n))
    prefix_energy = np.zeros(m + 1)
    pos = np.zeros(m + 1, dtype=np.int64)
    chosen = np.zeros(m, dtype=np.int64)
    g = np.empty(n)
    depth = 0
    pos[0] = 0
    zero_hash = np.uint64(0)
    if m == 1:
        for j in range(n):
            chosen[0] = j
            archive_insert(energies, states, hashes, size, Q[j, j], chosen, zero_hash, False)
        return
    while depth >= 0:
        if depth == m - 2:
            # close the last two levels with the all-pairs form
            base = prefix_energy[depth]
            for j in range(pos[depth], n):
                g[j] = Q[j, j] + 2.0 * field[depth, j]
            for j in range(pos[depth], n - 1):
                ej = base + g[j]
                for k in range(j + 1, n):
                    e = ej + g[k] + 2.0 * Q[j, k]
                    if size[0] < energies.shape[0] or e < energies[0]:
                        chosen[m - 2] = j
                        chosen[m - 1] = k
                        archive_insert(energies, states, hashes, size, e, chosen, zero_hash, False)
            depth -= 1
            if depth >= 0:
                pos[depth] += 1
            continue
        j = pos[depth]
        if j > n - (m - depth):
            depth -= 1
            if depth >= 0:
                pos[depth] += 1
            continue
        chosen[depth] = j
        prefix_energy[depth + 1] = prefix_energy[depth] + Q[j, j] + 2.0 * field[depth, j]
        for t in range(n):
            field[depth + 1, t] = field[depth, t] + Q[j, t]
        pos[depth + 1] = j + 1
        depth += 1


def enumerate_topk(Q: np.ndarray, num_remove: int, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """States (``[k, M]`` index arrays) and energies of the ``top_k`` lowest states, unsorted."""
    energies, states, hashes, size = new_archive(top_k, num_remove)
    _enumerate(np.ascontiguousarray(Q, dtype=np.float64), num_remove, energies, states, hashes, size)
    return archive_contents(energies, states, size)


EXACT_RATE = 2e8  # states/s, a conservative figure for refusing an enumeration that would outlast the time limit


@register_solver("exact")
def solve_exact(problem: Problem):
    """Certified enumeration of every state (per-kind counts and budgets honoured exactly)."""
    from .constrained import enumerate_constrained

    Q, num_remove, top_k = problem.Q, problem.num_remove, problem.top_k
    count = num_states(Q.shape[0], num_remove)
    if problem.time_limit is not None and count / EXACT_RATE > problem.time_limit:
        raise BlockCBOError(
            f"exact enumeration of C({Q.shape[0]}, {num_remove}) = {count:.3g} states would outlast the "
            f"{problem.time_limit:g} s time limit; use `solver=tabu` or raise `time_limit`"
        )
    if problem.constraints is not None:
        return (*enumerate_constrained(Q, num_remove, top_k, *problem.constraints), True, {})
    states, energies = enumerate_topk(Q, num_remove, top_k)
    return states, energies, True, {}
