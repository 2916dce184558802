"""Solvers for min xᵀQx s.t. Σx = M, x ∈ {0,1}^N, returning the K lowest states; pick one with ``method``.

Add a solver with :func:`register_solver`; it receives the reduced problem (protected blocks already taken out) and
returns ``(states, energies, certified, info)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import BlockCBOError
from .base import Candidate, SolveResult, check_counts, check_matrix, energy, num_states, to_candidates
from .exact import enumerate_topk
from .tabu import tabu_topk


SolverFn = Callable[..., tuple[np.ndarray, np.ndarray, bool, dict]]
_SOLVERS: dict[str, SolverFn] = {}
EXACT_LIMIT = 300_000_000  # states; enumeration does about 1e8–1e9 states/s on one core


def register_solver(name: str) -> Callable[[SolverFn], SolverFn]:
    def wrap(fn: SolverFn) -> SolverFn:
        _SOLVERS[name] = fn
        return fn

    return wrap


def available_solvers() -> list[str]:
    return ["auto", *sorted(_SOLVERS)]


@register_solver("exact")
def _solve_exact(Q, num_remove, top_k, seed, time_limit):
    states, energies = enumerate_topk(Q, num_remove, top_k)
    return states, energies, True, {}


@register_solver("tabu")
def _solve_tabu(Q, num_remove, top_k, seed, time_limit):
    states, energies, info = tabu_topk(Q, num_remove, top_k, seed=seed, time_limit=time_limit)
    return states, energies, False, info


def _auto_method(num_blocks: int, num_remove: int) -> str:
    return "exact" if num_states(num_blocks, num_remove) <= EXACT_LIMIT else "tabu"


def solve(
    Q,
    num_remove: int,
    top_k: int = 10,
    method: str = "auto",
    protected: Sequence[int] = (),
    seed: int = 0,
    time_limit: float | None = None,
) -> SolveResult:
    """The ``top_k`` lowest-energy ways to remove ``num_remove`` blocks.

    Args:
        Q (`array-like` of shape `[N, N]`): energy matrix (the Hessian H, or H with a linear term on its diagonal).
        num_remove (`int`): M, blocks to remove.
        top_k (`int`, defaults to 10): states to return (all states if fewer exist).
        method (`str`, defaults to `"auto"`): `"exact"`, `"tabu"` or `"auto"` (exact where C(N, M) is small).
        protected (`Sequence[int]`): blocks that are never removed.
        seed (`int`): seed for the stochastic solvers.
        time_limit (`float`, *optional*): seconds; respected by the stochastic solvers.

    ```python
    result = solve(artifact.H, num_remove=6, top_k=20)
    result.candidates[0].blocks  # the ground state
    ```
    """
    Q = check_matrix(Q)
    n = Q.shape[0]
    protected = sorted({int(p) for p in protected})
    check_counts(n, num_remove, top_k, protected)
    index_map = np.array([i for i in range(n) if i not in set(protected)], dtype=np.int64)
    reduced = Q[np.ix_(index_map, index_map)]
    top_k = min(top_k, num_states(len(index_map), num_remove))
    chosen = _auto_method(len(index_map), num_remove) if method == "auto" else method
    if chosen not in _SOLVERS:
        raise BlockCBOError(f"unknown solver {method!r}; choose one of {', '.join(available_solvers())}")
    start = time.perf_counter()
    states, energies, certified, info = _SOLVERS[chosen](reduced, num_remove, top_k, seed, time_limit)
    seconds = time.perf_counter() - start
    # Recompute energies from Q directly: the reported number never depends on a solver's incremental arithmetic.
    candidates = to_candidates(states, energies, index_map)
    candidates = [Candidate(c.rank, c.blocks, energy(Q, c.blocks)) for c in candidates]
    return SolveResult(
        candidates=candidates,
        method=chosen,
        certified=certified,
        num_blocks=n,
        num_remove=num_remove,
        seconds=seconds,
        info={**info, "protected": protected},
    )


__all__ = ["Candidate", "SolveResult", "available_solvers", "energy", "register_solver", "solve"]
