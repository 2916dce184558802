"""The one way a `BlockRemovalConfig` is turned into a solver call over an artifact: every face solves the same problem."""

from __future__ import annotations

from ..config import BlockRemovalConfig
from ..errors import BlockCBOError
from ..hessian.artifact import HessianArtifact
from . import Constraints, SolveResult, solve
from .base import available_solvers, check_counts
from .neighbourhood import solve_near


def check_solvable(
    config: BlockRemovalConfig, block_kinds: list[str], block_parameters: list[int], num_parameters: int = 0
) -> None:
    """Raise what solving ``config`` would raise for reasons that do not depend on the energies (counts, protected
    blocks, per-kind counts, parameter budget, solver choice), so the refusal comes before the Hessian pass."""
    import numpy as np

    num_blocks = len(block_kinds)
    if config.num_remove is None:
        raise BlockCBOError("say how many blocks to remove (`num_remove`)")
    check_counts(num_blocks, config.num_remove, config.top_k, config.protected)
    if config.solver not in available_solvers():
        raise BlockCBOError(f"unknown solver {config.solver!r}; choose one of {', '.join(available_solvers())}")
    budget = int((num_parameters or sum(block_parameters)) * config.param_budget / 100.0) if config.param_budget else 0
    constraints = Constraints(
        per_kind=config.per_kind, kinds=block_kinds, min_removed_parameters=budget, block_parameters=block_parameters
    )
    if constraints.active:
        free = np.array([i for i in range(num_blocks) if i not in set(config.protected)], dtype=np.int64)
        constraints.encode(free, config.num_remove)
        if config.solver in ("bnb", "torch"):
            raise BlockCBOError(
                f"the {config.solver} solver takes no per-kind counts or budget; use `solver=exact` or `solver=tabu`"
            )


def artifact_constraints(artifact: HessianArtifact, config: BlockRemovalConfig) -> Constraints:
    """The per-kind counts and parameter budget of ``config`` over ``artifact``'s blocks."""
    budget = 0
    if config.param_budget:
        total = int(artifact.metadata.get("num_parameters") or 0) or sum(artifact.block_num_parameters)
        budget = int(total * config.param_budget / 100.0)
    return Constraints(
        per_kind=config.per_kind,
        kinds=artifact.block_kinds,
        min_removed_parameters=budget,
        block_parameters=artifact.block_num_parameters,
    )


def solve_artifact(artifact: HessianArtifact, config: BlockRemovalConfig, Q=None) -> SolveResult:
    """The ``config.top_k`` lowest states for removing ``config.num_remove`` blocks (of ``Q`` when given, e.g. a
    round's re-expansion, else the artifact's energy matrix; the constraints are the same)."""
    if config.num_remove is None:
        raise BlockCBOError("say how many blocks to remove (`num_remove`)")
    if config.num_remove >= artifact.num_blocks:
        raise BlockCBOError(
            f"cannot remove {config.num_remove} of {artifact.num_blocks} blocks; choose K in 1..{artifact.num_blocks - 1}"
        )
    Q = artifact.energy_matrix(config.beta).numpy() if Q is None else Q
    constraints = artifact_constraints(artifact, config)
    return solve(
        Q,
        config.num_remove,
        top_k=config.top_k,
        method=config.solver,
        protected=config.protected,
        seed=config.seed,
        time_limit=config.time_limit,
        constraints=constraints,
    )


def solve_artifact_near(artifact: HessianArtifact, config: BlockRemovalConfig, Q, centre, swaps: int) -> SolveResult:
    """The ``config.top_k`` lowest states of ``Q`` within ``swaps`` swaps of ``centre`` (a round's trust region), with
    ``config``'s protected blocks and constraints."""
    return solve_near(
        Q,
        centre,
        swaps=swaps,
        top_k=config.top_k,
        protected=config.protected,
        constraints=artifact_constraints(artifact, config),
    )
