"""The Hessian artifact: per-sample gate gradients A, H = AᵀA/m, and where they came from — one safetensors file.

Tensors: ``A`` (m×N float32), ``H`` (N×N float64), ``g`` (mean gradient, N float64), ``losses`` (per-sample loss at
α = 1, m float32). Metadata (strings; JSON where structured): ``block_names``, ``block_kinds``, ``block_num_parameters``,
``num_samples``, ``seq_len``, ``model``, ``revision``, ``dataset``, ``gate``, ``package_version``, ``num_parameters``.
Loading needs no pickle.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .errors import BlockCBOError
from .io_utils import atomic_file


_JSON_KEYS = ("block_names", "block_kinds", "block_num_parameters")


@dataclass
class HessianArtifact:
    """Per-sample gate gradients and the Hessian approximation built from them.

    Args:
        A (`torch.Tensor` of shape `[m, N]`): per-sample gradients of the cross-entropy w.r.t. the gates.
        block_names (`list[str]`): module path of each block.
        block_kinds (`list[str]`): kind of each block (attention, moe, mamba, ...).
        metadata (`dict`): provenance (model, revision, dataset, seq_len, gate, ...).
        losses (`torch.Tensor`, *optional*): per-sample loss of the unpruned model.
    """

    A: torch.Tensor
    block_names: list[str]
    block_kinds: list[str]
    block_num_parameters: list[int] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    losses: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.A.shape[0] == 0:
            raise BlockCBOError(f"A must be a non-empty [m, N] matrix, got shape {list(self.A.shape)}")
        if not bool(torch.isfinite(self.A).all()):
            raise BlockCBOError("A holds NaN or inf; recompute the Hessian (try float32 and check the data)")
        if len(self.block_names) != self.num_blocks or len(self.block_kinds) != self.num_blocks:
            raise BlockCBOError("block_names and block_kinds must have one entry per column of A")
        self.A = self.A.to(torch.float32)

    @property
    def num_samples(self) -> int:
        return self.A.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.A.shape[1]

    @property
    def H(self) -> torch.Tensor:
        """H = AᵀA/m in float64 (the Gauss–Newton / Fisher approximation, first-order term dropped)."""
        a = self.A.to(torch.float64)
        return a.T @ a / a.shape[0]

    @property
    def g(self) -> torch.Tensor:
        """Mean gradient (first-order term of the Taylor expansion), float64."""
        return self.A.to(torch.float64).mean(dim=0)

    def energy_matrix(self, beta: float = 0.0) -> torch.Tensor:
        """Q with E(x) = xᵀQx = xᵀHx − 2β·gᵀx for binary x (x_i = 1: block i removed).

        With β = 1, E/2 is the second-order Taylor estimate of the loss change; β = 0 is the paper's default.
        """
        q = self.H.clone()
        if beta:
            q -= torch.diag(2.0 * beta * self.g)
        return q

    def check_model(self, model_id: str | None, block_names: list[str]) -> None:
        """Refuse an artifact made from another model (different block list)."""
        if block_names != self.block_names:
            raise BlockCBOError(
                f"the Hessian artifact was computed on {self.metadata.get('model')!r} with {self.num_blocks} blocks, "
                f"which do not match this model ({model_id!r}, {len(block_names)} blocks); recompute it"
            )

    # -- persistence --------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write one safetensors file atomically (temporary file renamed into place)."""
        tensors = {"A": self.A.contiguous(), "H": self.H.contiguous(), "g": self.g.contiguous()}
        if self.losses is not None:
            tensors["losses"] = self.losses.to(torch.float32).contiguous()
        meta = {k: str(v) for k, v in self.metadata.items()}
        meta.update(
            block_names=json.dumps(self.block_names),
            block_kinds=json.dumps(self.block_kinds),
            block_num_parameters=json.dumps(list(self.block_num_parameters)),
            num_samples=str(self.num_samples),
            format="hf_blockcbo.hessian/1",
        )
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> HessianArtifact:
        path = str(path)
        if not os.path.isfile(path):
            raise BlockCBOError(f"no Hessian artifact at {path!r}; run `hf-blockcbo calibrate` first")
        try:
            with safe_open(path, framework="pt") as handle:
                meta = dict(handle.metadata() or {})
            tensors = load_file(path)
        except (SafetensorError, OSError) as err:
            raise BlockCBOError(f"{path!r} is not a readable safetensors file: {err}") from err
        if meta.get("format") != "hf_blockcbo.hessian/1" or "A" not in tensors:
            raise BlockCBOError(f"{path!r} is not an hf_blockcbo Hessian artifact")
        structured = {k: json.loads(meta.pop(k)) for k in _JSON_KEYS if k in meta}
        meta.pop("format", None)
        return cls(
            A=tensors["A"],
            block_names=structured["block_names"],
            block_kinds=structured["block_kinds"],
            block_num_parameters=structured.get("block_num_parameters", []),
            metadata=meta,
            losses=tensors.get("losses"),
        )
