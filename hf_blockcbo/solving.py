"""The one way a `BlockRemovalConfig` is turned into a solver call over an artifact: every face solves the same problem."""

from __future__ import annotations

from .config import BlockRemovalConfig
from .errors import BlockCBOError
from .hessian import HessianArtifact
from .solvers import Constraints, SolveResult, solve


def solve_artifact(artifact: HessianArtifact, config: BlockRemovalConfig) -> SolveResult:
    """The ``config.top_k`` lowest states for removing ``config.num_remove`` blocks."""
    if config.num_remove is None:
        raise BlockCBOError("say how many blocks to remove (`num_remove`)")
    if config.num_remove >= artifact.num_blocks:
        raise BlockCBOError(
            f"cannot remove {config.num_remove} of {artifact.num_blocks} blocks; choose K in 1..{artifact.num_blocks - 1}"
        )
    Q = artifact.energy_matrix(config.beta).numpy()
    budget = 0
    if config.param_budget:
        total = int(artifact.metadata.get("num_parameters") or 0) or sum(artifact.block_num_parameters)
        budget = int(total * config.param_budget / 100.0)
    constraints = Constraints(
        per_kind=config.per_kind,
        kinds=artifact.block_kinds,
        min_removed_parameters=budget,
        block_parameters=artifact.block_num_parameters,
    )
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
