"""hf_blockcbo: remove whole transformer blocks chosen by constrained binary optimization (arXiv 2602.00161).

Public names are imported lazily, so `hf-blockcbo --help` does not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__ as __version__


_EXPORTS = {
    "BlockCBOError": "errors",
    "BlockGates": "surgery.gates",
    "BlockRemovalCallback": "callback",
    "BlockRemovalConfig": "config",
    "BlockRemover": "api",
    "CalibrationSet": "data",
    "Candidate": "solvers",
    "HessianArtifact": "hessian.artifact",
    "SolveResult": "solvers",
    "build_calibration_set": "data",
    "calibrate": "pipeline",
    "compute_gate_gradients": "hessian.gradients",
    "fit_repair": "repair.least_squares",
    "remove_blocks": "surgery.removal",
    "save_pruned": "surgery.removal",
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
    "fit_repair",
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
    from .callback import BlockRemovalCallback
    from .config import BlockRemovalConfig
    from .data import CalibrationSet, build_calibration_set
    from .errors import BlockCBOError
    from .hessian.artifact import HessianArtifact
    from .hessian.gradients import compute_gate_gradients
    from .pipeline import calibrate
    from .repair.least_squares import fit_repair
    from .solvers import Candidate, SolveResult, solve
    from .surgery.gates import BlockGates
    from .surgery.removal import remove_blocks, save_pruned
