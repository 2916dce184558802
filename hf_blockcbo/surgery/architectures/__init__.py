"""Architecture registry: where blocks live, how they are gated, what their removal rewrites."""

from . import families  # noqa: F401  (registers the built-in families)
from .registry import (
    GENERIC,
    ArchitectureSpec,
    BlockInfo,
    branch_modules,
    count_parameters,
    describe_blocks,
    find_layers_path,
    get_architecture,
    get_layers,
    model_dtype,
    num_layers_of,
    register_architecture,
    registered_architectures,
    set_layers,
    support_table,
)


__all__ = [
    "GENERIC",
    "ArchitectureSpec",
    "BlockInfo",
    "branch_modules",
    "count_parameters",
    "describe_blocks",
    "find_layers_path",
    "get_architecture",
    "get_layers",
    "model_dtype",
    "num_layers_of",
    "register_architecture",
    "registered_architectures",
    "set_layers",
    "support_table",
]
