"""Where a block's last residual contribution comes from, and folding a fitted repair map into the weights there.

A map on the output of a linear layer folds into it (``W ← TᵀW``, ``b ← b·T``); into each expert of a mixture; into
the token embeddings when the gap starts at block 0. Behind a post-norm (Gemma 2/3) a scale folds into the norm's
weight, and a matrix into the projection before the norm (repair/forms.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import BlockCBOError
from ..surgery.architectures import ArchitectureSpec, get_architecture, get_layers
from .forms import RepairMap


BEFORE_THE_NORM = ("rotation", "renormalised")  # a map folded before a post-norm, plus the norm's scale
OUTPUT_PROJECTIONS = ("down_proj", "dense_4h_to_h", "c_proj", "out_proj", "o_proj", "fc2")
SHARED_EXPERTS = ("shared_expert", "shared_experts")


def dense_projection(branch: nn.Module) -> nn.Module | None:
    """The dense linear layer whose output is ``branch``'s output (the branch itself, or its output-projection child
    named in `OUTPUT_PROJECTIONS`), or None where there is none (experts, a norm after the projection)."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(branch, (nn.Linear, Conv1D)):
        return branch
    for name in OUTPUT_PROJECTIONS:
        child = getattr(branch, name, None)
        if isinstance(child, (nn.Linear, Conv1D)):
            return child
    return None


def contribution_module(model: nn.Module, source: int, spec: ArchitectureSpec | None = None) -> nn.Module:
    """The module whose output is the last addition to the stream by block ``source`` (−1: the token embeddings)."""
    spec = spec or get_architecture(model)
    if source < 0:
        return model.get_input_embeddings()
    block = get_layers(model, spec)[source]
    for name in reversed(spec.branches):
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return module
    raise BlockCBOError(f"block {source} ({type(block).__name__}) has none of the branches {spec.branches}")


def norm_eps(module: nn.Module) -> float:
    for name in ("eps", "variance_epsilon"):
        if isinstance(getattr(module, name, None), float):
            return getattr(module, name)
    raise BlockCBOError(f"{type(module).__name__} keeps no eps; a rotation repair needs an RMS norm")


@torch.no_grad()
def fold_map(model: nn.Module, repair_map: RepairMap, spec: ArchitectureSpec) -> None:
    module = contribution_module(model, repair_map.source, spec)
    if repair_map.kind in ("diagonal", *BEFORE_THE_NORM):
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 1:
            raise BlockCBOError(f"cannot fold a {repair_map.kind} map into {type(module).__name__}: no scale vector")
        offset = spec.norm_weight_offset
        if repair_map.kind == "diagonal":
            scale = (weight.double() + offset) * repair_map.matrix.to(weight.device)
        else:  # A (rotation: R) into the norm's input projection, s into its weight
            fold_linear(_post_norm_input(model, repair_map.source, spec), repair_map.matrix)
            scale = repair_map.scale.to(weight.device)
        weight.copy_((scale - offset).to(weight.dtype))
        return
    fold_linear(module, repair_map.matrix)


def _post_norm_input(model: nn.Module, source: int, spec: ArchitectureSpec) -> nn.Module:
    block = get_layers(model, spec)[source]
    module = getattr(block, spec.post_norm_input or "", None)
    if not isinstance(module, nn.Module):
        raise BlockCBOError(
            f"the {spec.name!r} spec names no module feeding the post-norm (`post_norm_input`); a rotation repair "
            "cannot be folded"
        )
    return module


def fold_linear(module: nn.Module, matrix: torch.Tensor) -> None:
    from transformers.pytorch_utils import Conv1D

    T = matrix.to(torch.float64)
    if isinstance(module, nn.Linear):  # y = x Wᵀ + b  →  y T = x (TᵀW)ᵀ + b T
        module.weight.copy_((T.t().to(module.weight.device) @ module.weight.double()).to(module.weight.dtype))
        if module.bias is not None:
            module.bias.copy_((module.bias.double() @ T.to(module.bias.device)).to(module.bias.dtype))
        return
    if isinstance(module, Conv1D):  # y = x W + b with W [in, out]
        module.weight.copy_((module.weight.double() @ T.to(module.weight.device)).to(module.weight.dtype))
        module.bias.copy_((module.bias.double() @ T.to(module.bias.device)).to(module.bias.dtype))
        return
    if isinstance(module, nn.Embedding):
        module.weight.copy_((module.weight.double() @ T.to(module.weight.device)).to(module.weight.dtype))
        return
    projection = dense_projection(module)  # the branch's own output projection
    if projection is not None:
        fold_linear(projection, T)
        return
    experts = getattr(module, "experts", None)
    if experts is not None:
        latent = getattr(module, "fc2_latent_proj", None)
        if isinstance(latent, nn.Linear):
            fold_linear(latent, T)
        else:
            _fold_experts(experts, T)
        for name in SHARED_EXPERTS:
            shared = getattr(module, name, None)
            if isinstance(shared, nn.Module):
                fold_linear(shared, T)
        return
    raise BlockCBOError(
        f"cannot fold a repair map into {type(module).__name__}: no output projection found "
        f"(looked for {', '.join(OUTPUT_PROJECTIONS)} and experts); do without the repair (`repair=false`)"
    )


def _fold_experts(experts: nn.Module, T: torch.Tensor) -> None:
    if isinstance(experts, nn.ModuleList):
        for expert in experts:
            fold_linear(expert, T)
        return
    down = getattr(experts, "down_proj", None)
    if not isinstance(down, nn.Parameter) or down.dim() != 3:
        raise BlockCBOError(f"cannot fold a repair map into the experts of {type(experts).__name__}")
    T = T.to(down.device)
    if getattr(experts, "is_transposed", False):  # [E, inter, d]: y = x W
        down.copy_((down.double() @ T).to(down.dtype))
    else:  # [E, d, inter]: y = x Wᵀ
        down.copy_((T.t() @ down.double()).to(down.dtype))
    bias = getattr(experts, "down_proj_bias", None)
    if isinstance(bias, nn.Parameter):
        bias.copy_((bias.double() @ T).to(bias.dtype))
