"""Deeper repair without training: the output projection of kept blocks after a gap, refitted by least squares.

The map of repair/least_squares.py corrects the stream right after a gap. The kept blocks after it still read a
stream they were not trained on, so their outputs drift from the unpruned model's. With ``depth`` (the config's
``repair_depth``) the first ``depth`` kept blocks after each gap (up to the next gap) get their output projection
``P`` (the last linear layer of the block's last branch, e.g. an MLP's ``down_proj``: ``y = x·Wᵀ + b``) refitted in
order, each on the model with everything before it already repaired. With ``g`` the unpruned model's stream after
the block, ``h`` the repaired model's and ``e = g − h`` what is left to correct,

    Δ = argmin Σ_tokens w‖e − x·Δᵀ‖² + λ‖Δ‖²  =  ((XᵀWX + λI)⁻¹ XᵀWE)ᵀ,     W ← W + Δ

(λ = ``ridge`` × the mean of diag(XᵀX); ``w`` the repair's token weights). ``x`` is the projection's input, so the
refit folds into its weight exactly and the checkpoint keeps its architecture. Families whose branch output passes a
norm after the projection (Gemma 2/3) or whose last branch is a mixture of experts have no such ``P``: they refuse
``depth > 0`` with one clear line. Measured in docs/results.md §3.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .forms import NormalEquations


def refit_blocks(runs: Sequence[tuple[int, int]], index: int, depth: int, num_blocks: int) -> list[int]:
    """The kept blocks whose projections are refitted after run ``index`` of ``runs``: the first ``depth`` after its
    gap, before the next run starts (those after the next gap are its own)."""
    stop = runs[index][1]
    end = runs[index + 1][0] if index + 1 < len(runs) else num_blocks
    return list(range(stop, min(stop + depth, end)))


def projection_inputs(projection: nn.Module) -> int:
    """How many inputs a dense projection has (`nn.Linear` keeps ``W`` as [out, in], `Conv1D` as [in, out])."""
    weight = projection.weight
    return weight.shape[1] if isinstance(projection, nn.Linear) else weight.shape[0]


@dataclass
class Refit:
    """The correction ``Δ`` ([out, in], float64) of one kept block's output projection, and its stream errors
    Σ w‖g − h‖² / Σ w‖g‖² before and after (over the calibration tokens)."""

    block: int
    delta: torch.Tensor
    error_before: float
    error_after: float

    def to_dict(self) -> dict:
        return {
            "block": self.block,
            "refitted": "output projection",
            "fit_error_before": self.error_before,
            "fit_error_after": self.error_after,
        }

    def attach(self, projection: nn.Module):
        """A hook adding ``x·Δᵀ`` to the projection's output (the weights untouched); returns its handle."""

        def hook(module, args, output):
            x = args[0]
            return output + F.linear(x, self.delta.to(device=x.device, dtype=x.dtype))

        return projection.register_forward_hook(hook)

    @torch.no_grad()
    def fold(self, projection: nn.Module) -> None:
        """``W ← W + Δ`` (Conv1D keeps ``W`` as [in, out]: ``W ← W + Δᵀ``)."""
        weight = projection.weight
        delta = self.delta.to(weight.device)
        delta = delta if isinstance(projection, nn.Linear) else delta.t()
        weight.copy_((weight.double() + delta).to(weight.dtype))


def solve_refit(normal: NormalEquations, block: int, ridge: float) -> Refit:
    """The ridge correction of block ``block``'s projection from its normal equations (inputs x, residual e = g − h),
    shrunk towards no correction, and its stream errors before and after."""
    lam = ridge * float(torch.diagonal(normal.uu).mean())
    eye = torch.eye(normal.uu.shape[0], dtype=torch.float64)
    delta_t = torch.linalg.solve(normal.uu + lam * eye, normal.ur)  # [in, out]
    after = normal.rr - 2 * float((delta_t * normal.ur).sum()) + float((delta_t * (normal.uu @ delta_t)).sum())
    total = max(normal.gg, 1e-30)
    return Refit(block, delta_t.t().contiguous(), normal.rr / total, max(after, 0.0) / total)
