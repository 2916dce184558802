"""The Hessian artifact: the per-sample terms of the energy matrix, H, and where they came from — one safetensors file.

Two kinds of per-sample terms, by curvature estimator (metadata ``curvature``):

- ``empirical`` and ``fisher``: per-sample gate gradients ``A`` (m×N float32), H = AᵀA/m;
- ``measured``: per-sample energy matrices ``Q_samples`` (m×N×N float64, see :mod:`hf_blockcbo.hessian.measured`), H their mean.

Tensors: ``A`` or ``Q_samples``, ``H`` (N×N float64), ``g`` (mean gradient, N float64; zero for ``measured``),
``losses`` (per-sample loss at α = 1, m float32), and estimator extras (e.g. ``Q_samples_ce``). Metadata (strings; JSON
where structured): ``block_names``, ``block_kinds``, ``block_num_parameters``, ``num_samples``, ``seq_len``,
``model``, ``revision``, ``dataset``, ``gate``, ``curvature``, ``package_version``, ``num_parameters``.
Loading needs no pickle.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ..errors import BlockCBOError
from ..io_utils import atomic_file


_JSON_KEYS = ("block_names", "block_kinds", "block_num_parameters")


@dataclass
class HessianArtifact:
    """Per-sample gate gradients and the Hessian approximation built from them.

    Args:
        A (`torch.Tensor` of shape `[m, N]`, *optional*): per-sample gradients w.r.t. the gates (empirical, fisher).
        block_names (`list[str]`): module path of each block.
        block_kinds (`list[str]`): kind of each block (attention, moe, mamba, ...).
        metadata (`dict`): provenance (model, revision, dataset, seq_len, gate, ...).
        losses (`torch.Tensor`, *optional*): per-sample loss of the unpruned model.
        Q_samples (`torch.Tensor` of shape `[m, N, N]`, *optional*): per-sample energy matrices (measured).
        extra (`dict[str, torch.Tensor]`, *optional*): further tensors an estimator keeps (saved as they are).
    """

    A: torch.Tensor | None
    block_names: list[str]
    block_kinds: list[str]
    block_num_parameters: list[int] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    losses: torch.Tensor | None = None
    Q_samples: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.A is None) == (self.Q_samples is None):
            raise BlockCBOError("a Hessian artifact holds either per-sample gradients A or per-sample matrices Q")
        terms = self.A if self.A is not None else self.Q_samples
        name = "A" if self.A is not None else "Q_samples"
        if terms.dim() != (2 if self.A is not None else 3) or terms.shape[0] == 0:
            raise BlockCBOError(f"{name} must be a non-empty per-sample tensor, got shape {list(terms.shape)}")
        if not bool(torch.isfinite(terms).all()):
            raise BlockCBOError(f"{name} holds NaN or inf; recompute the Hessian (try float32 and check the data)")
        if len(self.block_names) != self.num_blocks or len(self.block_kinds) != self.num_blocks:
            raise BlockCBOError("block_names and block_kinds must have one entry per column of A")
        if self.A is not None:
            self.A = self.A.to(torch.float32)
        else:
            self.Q_samples = self.Q_samples.to(torch.float64)

    @classmethod
    def from_rows(
        cls,
        model,
        *,
        gate: str,
        curvature: str = "empirical",
        A: torch.Tensor | None = None,
        Q_samples: torch.Tensor | None = None,
        losses: torch.Tensor | None = None,
        extra: dict[str, torch.Tensor] | None = None,
        metadata: dict | None = None,
    ) -> HessianArtifact:
        """The one constructor every face uses: blocks, kinds, parameter counts and the common metadata (model,
        architecture, gate, curvature, dtype, parameter count, package version) read off ``model``; ``metadata``
        adds the face's own keys (dataset, seq_len, ...; None values are left out)."""
        from .._version import __version__
        from ..surgery.architectures import count_parameters, describe_blocks, get_architecture

        spec = get_architecture(model)
        blocks = describe_blocks(model, spec)
        meta = {
            "model": str(getattr(model.config, "_name_or_path", "") or ""),
            "architecture": spec.name,
            "gate": gate,
            "curvature": curvature,
            "dtype": str(next(model.parameters()).dtype),
            "num_parameters": str(count_parameters(model)),
            "package_version": __version__,
        }
        meta.update({k: str(v) for k, v in (metadata or {}).items() if v is not None})
        return cls(
            A=A,
            block_names=[b.name for b in blocks],
            block_kinds=[b.kind for b in blocks],
            block_num_parameters=[b.num_parameters for b in blocks],
            metadata=meta,
            losses=losses,
            Q_samples=Q_samples,
            extra=dict(extra or {}),
        )

    @property
    def curvature(self) -> str:
        return self.metadata.get("curvature", "empirical")

    @property
    def num_samples(self) -> int:
        return (self.A if self.A is not None else self.Q_samples).shape[0]

    @property
    def num_blocks(self) -> int:
        return (self.A if self.A is not None else self.Q_samples).shape[-1]

    def resampled_H(self, rows: torch.Tensor | list[int]) -> torch.Tensor:
        """H over the given sample rows (repeats allowed): the bootstrap of the energy matrix."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        if self.A is not None:
            a = self.A[rows].to(torch.float64)
            return a.T @ a / a.shape[0]
        return self.Q_samples[rows].mean(dim=0)

    def resampled(self, rows: torch.Tensor | list[int]) -> HessianArtifact:
        """The artifact whose energy matrix is H over ``rows`` (one bootstrap draw; the same blocks and metadata)."""
        return HessianArtifact(
            A=None,
            Q_samples=self.resampled_H(rows)[None],
            block_names=self.block_names,
            block_kinds=self.block_kinds,
            block_num_parameters=self.block_num_parameters,
            metadata=dict(self.metadata),
        )

    @property
    def H(self) -> torch.Tensor:
        """The energy matrix in float64: AᵀA/m (empirical: the paper's Eq. 6; fisher), or the mean of ``Q_samples``."""
        if self.A is not None:
            a = self.A.to(torch.float64)
            return a.T @ a / a.shape[0]
        return self.Q_samples.mean(dim=0)

    @property
    def g(self) -> torch.Tensor:
        """Mean gradient (first-order term of the Taylor expansion), float64; zero where there is none (measured)."""
        if self.A is None:
            return torch.zeros(self.num_blocks, dtype=torch.float64)
        return self.A.to(torch.float64).mean(dim=0)

    def energy_matrix(self, beta: float = 0.0) -> torch.Tensor:
        """Q with E(x) = xᵀQx = xᵀHx − 2β·gᵀx for binary x (x_i = 1: block i removed).

        With β = 1, E/2 is the second-order Taylor estimate of the loss change; β = 0 is the paper's default.
        """
        self._check_beta(beta)
        q = self.H.clone()
        if beta:
            q -= torch.diag(2.0 * beta * self.g)
        return q

    def _check_beta(self, beta: float) -> None:
        if beta and self.curvature != "empirical":
            raise BlockCBOError(
                f"beta weighs the data's mean gradient, which only the empirical curvature has (this artifact's is "
                f"{self.curvature!r}); set beta to 0"
            )

    def row_energies(self, states: Sequence[Sequence[int]], beta: float = 0.0) -> torch.Tensor:
        """``[m, S]``, float64: each calibration row's energy of each state, whose mean over the rows is the state's
        energy xᵀQx (``energy_matrix(beta)``): (aᵀx)² − 2β·aᵀx for a gradient row a, xᵀQ_s x for a measured one.
        Their spread says how well the rows resolve one state from another."""
        self._check_beta(beta)
        x = torch.zeros(len(states), self.num_blocks, dtype=torch.float64)
        for k, state in enumerate(states):
            x[k, list(state)] = 1.0
        if self.A is None:
            return torch.einsum("sn,wnk,sk->ws", x, self.Q_samples, x)
        projected = self.A.to(torch.float64) @ x.T
        return projected.square() - 2.0 * beta * projected

    def check_model(self, model_id: str | None, block_names: list[str], fingerprint: str | None = None) -> None:
        """Refuse an artifact made from another model: a different block list, or (when both are known) different
        weights (`models.model_fingerprint`)."""
        if block_names != self.block_names:
            raise BlockCBOError(
                f"the Hessian artifact was computed on {self.metadata.get('model')!r} with {self.num_blocks} blocks, "
                f"which do not match this model ({model_id!r}, {len(block_names)} blocks); recompute it"
            )
        recorded = self.metadata.get("model_fingerprint")
        if fingerprint and recorded and fingerprint != recorded:
            raise BlockCBOError(
                f"the Hessian artifact was computed on {self.metadata.get('model')!r}, whose weights differ from this "
                f"model's ({model_id!r}: fingerprint {fingerprint} vs {recorded}); recompute it for this model"
            )

    # -- persistence --------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write one safetensors file atomically (temporary file renamed into place)."""
        tensors = {"H": self.H.contiguous(), "g": self.g.contiguous()}
        if self.A is not None:
            tensors["A"] = self.A.contiguous()
        else:
            tensors["Q_samples"] = self.Q_samples.contiguous()
        tensors.update({k: v.contiguous() for k, v in self.extra.items()})
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
        if meta.get("format") != "hf_blockcbo.hessian/1" or ("A" not in tensors and "Q_samples" not in tensors):
            raise BlockCBOError(f"{path!r} is not an hf_blockcbo Hessian artifact")
        structured = {k: json.loads(meta.pop(k)) for k in _JSON_KEYS if k in meta}
        meta.pop("format", None)
        known = {"A", "Q_samples", "H", "g", "losses"}
        return cls(
            A=tensors.get("A"),
            block_names=structured["block_names"],
            block_kinds=structured["block_kinds"],
            block_num_parameters=structured.get("block_num_parameters", []),
            metadata=meta,
            losses=tensors.get("losses"),
            Q_samples=tensors.get("Q_samples"),
            extra={k: v for k, v in tensors.items() if k not in known},
        )
