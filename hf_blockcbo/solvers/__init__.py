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
from .branch_bound import branch_and_bound_topk
from .brute_torch import brute_force_topk
from .constrained import Constraints, enumerate_constrained, feasible_start, parse_per_kind, swap_classes
from .exact import enumerate_topk
from .tabu import tabu_topk


SolverFn = Callable[..., tuple[np.ndarray, np.ndarray, bool, dict]]
_SOLVERS: dict[str, SolverFn] = {}
AUTO_TIME_LIMIT = 60.0  # seconds `auto` gives branch and bound when no --time-limit is set


def register_solver(name: str) -> Callable[[SolverFn], SolverFn]:
    def wrap(fn: SolverFn) -> SolverFn:
        _SOLVERS[name] = fn
        return fn

    return wrap


def available_solvers() -> list[str]:
    return ["auto", *sorted(_SOLVERS)]


EXACT_RATE = 2e8  # states/s, a conservative figure for refusing an enumeration that would outlast --time-limit


@register_solver("exact")
def _solve_exact(Q, num_remove, top_k, seed, time_limit, cons):
    count = num_states(Q.shape[0], num_remove)
    if time_limit is not None and count / EXACT_RATE > time_limit:
        raise BlockCBOError(
            f"exact enumeration of C({Q.shape[0]}, {num_remove}) = {count:.3g} states would outlast the "
            f"{time_limit:g} s time limit; use `solver=tabu` or raise `time_limit`"
        )
    if cons is not None:
        return (*enumerate_constrained(Q, num_remove, top_k, *cons), True, {})
    states, energies = enumerate_topk(Q, num_remove, top_k)
    return states, energies, True, {}


@register_solver("tabu")
def _solve_tabu(Q, num_remove, top_k, seed, time_limit, cons):
    classes = initial = None
    if cons is not None:
        kind_ids, required, weights, min_weight = cons
        if min_weight > 0:
            raise BlockCBOError("the tabu solver does not take a parameter budget; use `solver=exact`")
        classes = swap_classes(kind_ids, required)
        initial = lambda rng: feasible_start(classes, kind_ids, required, num_remove, rng)  # noqa: E731
    states, energies, info = tabu_topk(
        Q, num_remove, top_k, seed=seed, time_limit=time_limit, classes=classes, initial=initial
    )
    return states, energies, False, info


@register_solver("bnb")
def _solve_branch_and_bound(Q, num_remove, top_k, seed, time_limit, cons):
    if cons is not None:
        raise BlockCBOError(
            "branch and bound takes no per-kind counts or budget yet; use `solver=exact` or `solver=tabu`"
        )
    start = time.perf_counter()
    seed_states, seed_energies, _ = tabu_topk(Q, num_remove, top_k, seed=seed, time_limit=time_limit)
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


@register_solver("torch")
def _solve_torch(Q, num_remove, top_k, seed, time_limit, cons):
    if cons is not None:
        raise BlockCBOError(
            "the torch brute force takes no per-kind counts or budget; use `solver=exact` or `solver=tabu`"
        )
    states, energies, complete = brute_force_topk(Q, num_remove, top_k, time_limit=time_limit)
    return states, energies, complete, {"complete": complete}


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
    if chosen not in _SOLVERS:
        raise BlockCBOError(f"unknown solver {method!r}; choose one of {', '.join(available_solvers())}")
    if method == "auto" and chosen == "bnb" and time_limit is None:
        time_limit = AUTO_TIME_LIMIT
    start = time.perf_counter()
    states, energies, certified, info = _SOLVERS[chosen](reduced, num_remove, top_k, seed, time_limit, cons)
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
    "SolveResult",
    "available_solvers",
    "energy",
    "parse_per_kind",
    "register_solver",
    "solve",
]
