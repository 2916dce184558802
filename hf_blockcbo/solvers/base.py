"""The problem min xᵀQx s.t. Σx = M, x ∈ {0,1}^N, its checked inputs, and the K-best result every solver returns."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import BlockCBOError


@dataclass(frozen=True)
class Candidate:
    """One configuration: the blocks it removes (0-based, sorted), its energy xᵀQx and its rank in the spectrum."""

    rank: int
    blocks: tuple[int, ...]
    energy: float
    score: float | None = None  # a baseline's own score, or the validation perplexity, when there is one
    validation_kl: float | None = None  # mean per-token KL from the unpruned model on the validation split

    def to_dict(self) -> dict:
        row = {"rank": self.rank, "blocks": list(self.blocks), "energy": self.energy}
        if self.score is not None:
            row["score"] = self.score
        if self.validation_kl is not None:
            row["validation_kl"] = self.validation_kl
        return row


@dataclass
class SolveResult:
    """The K lowest-energy configurations found, sorted by energy (rank 0 = ground state).

    Args:
        candidates (`list[Candidate]`): distinct states, ascending energy.
        method (`str`): the solver that produced them.
        certified (`bool`): `True` when the list is provably the exact K lowest states.
        lower_bound (`float`, *optional*): a proven lower bound on any state not in the list, when known.
    """

    candidates: list[Candidate]
    method: str
    certified: bool
    num_blocks: int
    num_remove: int
    seconds: float = 0.0
    lower_bound: float | None = None
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "certified": self.certified,
            "num_blocks": self.num_blocks,
            "num_remove": self.num_remove,
            "seconds": self.seconds,
            "lower_bound": self.lower_bound,
            "candidates": [c.to_dict() for c in self.candidates],
        }


def energy(Q: np.ndarray, blocks: Sequence[int]) -> float:
    """xᵀQx for the state that removes ``blocks``."""
    idx = np.asarray(list(blocks), dtype=np.int64)
    return float(Q[np.ix_(idx, idx)].sum())


def check_matrix(Q) -> np.ndarray:
    """A square, finite, symmetric float64 matrix (asymmetry beyond round-off is symmetrised with a warning)."""
    Q = np.asarray(Q, dtype=np.float64)
    if Q.ndim != 2 or Q.shape[0] != Q.shape[1] or Q.shape[0] == 0:
        raise BlockCBOError(f"the energy matrix must be square and non-empty, got shape {list(Q.shape)}")
    if not np.isfinite(Q).all():
        raise BlockCBOError("the energy matrix holds NaN or inf; recompute the Hessian")
    scale = max(float(np.abs(Q).max()), 1e-300)
    asym = float(np.abs(Q - Q.T).max())
    if asym > 1e-9 * scale:
        warnings.warn(f"the energy matrix is not symmetric (max |Q−Qᵀ| = {asym:.3g}); symmetrising", stacklevel=3)
    return np.ascontiguousarray((Q + Q.T) / 2)


def check_counts(num_blocks: int, num_remove: int, top_k: int, protected: Sequence[int] = ()) -> None:
    if not isinstance(num_remove, (int, np.integer)) or num_remove <= 0 or num_remove >= num_blocks:
        raise BlockCBOError(f"the number of blocks to remove must be in 1..{num_blocks - 1}, got {num_remove}")
    if top_k <= 0:
        raise BlockCBOError(f"top-k must be positive, got {top_k}")
    bad = [p for p in protected if not 0 <= p < num_blocks]
    if bad:
        raise BlockCBOError(f"protected blocks {bad} are out of range 0..{num_blocks - 1}")
    free = num_blocks - len(set(protected))
    if num_remove > free:
        raise BlockCBOError(
            f"cannot remove {num_remove} blocks: only {free} of {num_blocks} are not protected; protect fewer"
        )


def num_states(num_blocks: int, num_remove: int) -> int:
    return math.comb(num_blocks, num_remove)


def to_candidates(states: np.ndarray, energies: np.ndarray, index_map: np.ndarray | None = None) -> list[Candidate]:
    """Sort states by (energy, blocks) and map reduced indices back to the model's block indices."""
    rows = []
    for state, e in zip(states, energies, strict=True):
        blocks = np.sort(state if index_map is None else index_map[state])
        rows.append((float(e), tuple(int(b) for b in blocks)))
    rows.sort()
    return [Candidate(rank=r, blocks=b, energy=e) for r, (e, b) in enumerate(rows)]


@dataclass(frozen=True)
class Problem:
    """The reduced problem a solver receives: min xᵀQx s.t. Σx = ``num_remove`` over the blocks left once the
    protected ones are taken out.

    Args:
        Q (`np.ndarray` of shape `[n, n]`): the energy matrix over the removable blocks.
        num_remove (`int`): M. top_k (`int`): states wanted (never more than exist).
        seed (`int`): for stochastic solvers. time_limit (`float`, *optional*): seconds.
        constraints (`tuple`, *optional*): per-kind counts / parameter budget, encoded as
            ``(kind_ids, required, weights, min_weight)`` over the reduced blocks (`Constraints.encode`).
    """

    Q: np.ndarray
    num_remove: int
    top_k: int
    seed: int = 0
    time_limit: float | None = None
    constraints: tuple | None = None


# A solver maps a Problem to (states [K, M] over the reduced indices, energies [K], certified, info).
SolverFn = Callable[[Problem], tuple[np.ndarray, np.ndarray, bool, dict]]
_SOLVERS: dict[str, SolverFn] = {}


def register_solver(name: str) -> Callable[[SolverFn], SolverFn]:
    """Register a solver under ``name`` (``BlockRemovalConfig.solver``); it sits beside its algorithm."""

    def wrap(fn: SolverFn) -> SolverFn:
        _SOLVERS[name] = fn
        return fn

    return wrap


def get_solver(name: str) -> SolverFn:
    if name not in _SOLVERS:
        raise BlockCBOError(f"unknown solver {name!r}; choose one of {', '.join(available_solvers())}")
    return _SOLVERS[name]


def available_solvers() -> list[str]:
    return ["auto", *sorted(_SOLVERS)]
