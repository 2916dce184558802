"""hf_blockcbo: remove whole transformer blocks chosen by constrained binary optimization (arXiv 2602.00161).

Public names are imported lazily, so `hf-blockcbo --help` does not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__ as __version__


_EXPORTS = {
    "BlockCBOError": "errors",
    "BlockGates": "gates",
    "BlockRemovalCallback": "callback",
    "BlockRemovalConfig": "config",
    "BlockRemover": "api",
    "CalibrationSet": "data",
    "Candidate": "solvers",
    "HessianArtifact": "hessian",
    "SolveResult": "solvers",
    "build_calibration_set": "data",
    "calibrate": "pipeline",
    "compute_gate_gradients": "calibration",
    "remove_blocks": "removal",
    "save_pruned": "removal",
    "solve": "solvers",
}

__all__ = [
    "BlockCBOError",
    "BlockGates",
    "BlockRemovalCallback",
    "BlockRemovalConfig",
    "BlockRemover",
    "CalibrationSet",
    "Candidate",
    "HessianArtifact",
    "SolveResult",
    "build_calibration_set",
    "calibrate",
    "compute_gate_gradients",
    "remove_blocks",
    "save_pruned",
    "solve",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .api import BlockRemover
    from .calibration import compute_gate_gradients
    from .callback import BlockRemovalCallback
    from .config import BlockRemovalConfig
    from .data import CalibrationSet, build_calibration_set
    from .errors import BlockCBOError
    from .gates import BlockGates
    from .hessian import HessianArtifact
    from .pipeline import calibrate
    from .removal import remove_blocks, save_pruned
    from .solvers import Candidate, SolveResult, solve
