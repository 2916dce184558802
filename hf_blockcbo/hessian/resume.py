"""Checkpoints of a running Hessian pass: rows done so far, written atomically, so a killed run resumes.

The partial file sits beside the artifact (``<output>.partial[.rank<r>]``) and records a fingerprint of everything
that determines the rows (model, blocks, data, shard, batch size, gate, dtype); a partial file with another
fingerprint is refused rather than mixed in.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

from ..errors import BlockCBOError
from ..io_utils import atomic_file


def fingerprint(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass
class PartialRows:
    """Rows of A (and losses) for the first ``done`` samples of a shard."""

    path: Path
    key: str

    def load(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.path.is_file():
            return None
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                meta = handle.metadata() or {}
        except Exception as err:  # noqa: BLE001 - a truncated or foreign file: one line, the file kept
            raise BlockCBOError(
                f"the resume file {str(self.path)!r} is damaged ({str(err).splitlines()[0]}); delete it to start "
                "afresh"
            ) from err
        if meta.get("fingerprint") != self.key:
            raise BlockCBOError(
                f"the resume file {str(self.path)!r} belongs to another configuration (model, data, batch size, gate "
                "or process count differ); delete it to start afresh, or rerun the command that made it"
            )
        tensors = load_file(str(self.path))
        return tensors["A"], tensors["losses"]

    def save(self, rows: torch.Tensor, losses: torch.Tensor) -> None:
        with atomic_file(self.path) as tmp:
            save_file(
                {"A": rows.contiguous(), "losses": losses.contiguous()}, str(tmp), metadata={"fingerprint": self.key}
            )

    def remove(self) -> None:
        if self.path.is_file():
            os.remove(self.path)


def partial_path(output: str | os.PathLike, rank: int = 0, world: int = 1) -> Path:
    suffix = ".partial" if world == 1 else f".partial.rank{rank}-of-{world}"
    return Path(str(output) + suffix)


def remove_partials(output: str | os.PathLike) -> None:
    """Delete every process's resume file of ``output`` (once the artifact is safely written)."""
    output = Path(output)
    for path in output.parent.glob(output.name + ".partial*"):
        path.unlink(missing_ok=True)
