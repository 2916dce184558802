"""Solvers for min xᵀQx s.t. Σx = M, x ∈ {0,1}^N, returning the K lowest states; pick one with ``method``.

Add a solver with :func:`register_solver` beside its algorithm; it receives a :class:`Problem` (the reduced problem,
protected blocks already taken out) and returns ``(states, energies, certified, info)``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from ..errors import BlockCBOError
from . import branch_bound, brute_torch, exact, tabu  # noqa: F401  (each registers its solver)
from .base import (
    Candidate,
    Problem,
    SolveResult,
    available_solvers,
    check_counts,
    check_matrix,
    energy,
    get_solver,
    num_states,
    register_solver,
    to_candidates,
)
from .constrained import Constraints, parse_per_kind


AUTO_TIME_LIMIT = 60.0  # seconds `auto` gives branch and bound when no --time-limit is set


def _auto_method(num_blocks: int, num_remove: int, constrained: bool) -> str:
    import torch

    count = num_states(num_blocks, num_remove)
    if count <= 1e6:
        return "exact"
    if constrained:  # per-kind counts / budgets: enumeration honours them all, tabu the per-kind counts
        return "exact" if count <= 3e8 else "tabu"
    if torch.cuda.is_available() and 1e8 < count <= 1e12:
        return "torch"
    # branch and bound starts from tabu's list and certifies it when it can; out of time it returns the better of
    # both, uncertified, with a proven lower bound
    return "bnb"


def solve(
    Q,
    num_remove: int,
    top_k: int = 10,
    method: str = "auto",
    protected: Sequence[int] = (),
    seed: int = 0,
    time_limit: float | None = None,
    constraints: Constraints | None = None,
) -> SolveResult:
    """The ``top_k`` lowest-energy ways to remove ``num_remove`` blocks.

    Args:
        Q (`array-like` of shape `[N, N]`): energy matrix (the Hessian H, or H with a linear term on its diagonal).
        num_remove (`int`): M, blocks to remove.
        top_k (`int`, defaults to 10): states to return (all states if fewer exist).
        method (`str`, defaults to `"auto"`): `"exact"`, `"bnb"`, `"tabu"`, `"torch"` or `"auto"` (exact enumeration
            where C(N, M) ≤ 1e6, else branch and bound within 60 s or ``time_limit``; GPU brute force on CUDA).
        protected (`Sequence[int]`): blocks that are never removed.
        seed (`int`): seed for the stochastic solvers.
        time_limit (`float`, *optional*): seconds: bnb, tabu and torch stop (uncertified), exact refuses up front.
        constraints (`Constraints`, *optional*): per-kind counts and/or a parameter budget.

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
    cons = constraints.encode(index_map, num_remove) if constraints is not None and constraints.active else None
    chosen = _auto_method(len(index_map), num_remove, cons is not None) if method == "auto" else method
    solver = get_solver(chosen)
    if method == "auto" and chosen == "bnb" and time_limit is None:
        time_limit = AUTO_TIME_LIMIT
    start = time.perf_counter()
    states, energies, certified, info = solver(Problem(reduced, num_remove, top_k, seed, time_limit, cons))
    if len(states) == 0:
        raise BlockCBOError("no configuration meets the constraints; relax `per_kind` / `param_budget` / `protected`")
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
        lower_bound=None if certified else info.get("lower_bound"),
    )


__all__ = [
    "Candidate",
    "Constraints",
    "Problem",
    "SolveResult",
    "available_solvers",
    "energy",
    "parse_per_kind",
    "register_solver",
    "solve",
]
