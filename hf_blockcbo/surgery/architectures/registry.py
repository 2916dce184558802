"""Where a causal LM keeps its decoder blocks, how each block's residual branches are gated, and what removal rewrites.

An :class:`ArchitectureSpec` describes one model family. Families are registered with :func:`register_architecture`;
:func:`get_architecture` picks the spec by ``config.model_type`` and falls back to a generic spec that finds the decoder
stack by shape and gates whole layers (``h_out = h_in + α·(layer(h_in) − h_in)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import BlockCBOError


BlockKindFn = Callable[[object, int, nn.Module], str]
ConfigRewriteFn = Callable[[object, list[int]], None]


def _attention_kind(config, index: int, block: nn.Module) -> str:
    return "attention"


@dataclass(frozen=True)
class ArchitectureSpec:
    """How to find, gate and remove the decoder blocks of one model family.

    Args:
        name (`str`): the family name shown in tables and provenance.
        model_types (`tuple[str, ...]`): the `config.model_type` values this spec serves.
        layers_path (`str`, *optional*): dotted path of the `nn.ModuleList` of decoder blocks; `None` finds it by shape.
        branches (`tuple[str, ...]`): submodules of a block whose output is the residual branch right before its
            residual add (paper Eq. 1–2). For post-norm families (Gemma 2/3) these are the post-norms, not the
            attention/MLP, since the norm would undo a scale applied before it. Empty: only the layer gate applies.
        per_layer_fields (`tuple[str, ...]`): config fields holding one entry per layer, sliced on removal.
        block_kind (`Callable`): `(config, index, block) -> str`, the kind of a block (attention, moe, mamba, ...).
        rewrite_config (`Callable`, *optional*): extra config rewrite `(config, kept_indices)` run on removal, after
            the per-layer fields are sliced (e.g. MoE placement rules keyed on the layer index).
        repair (`str`, *optional*, defaults to `"linear"`): how a training-free repair map folds into the last
            branch before a gap: `linear` (a d×d map into the branch's output projection / experts), `diagonal` (a
            scale into a post-norm's weight, for branches ending in a norm), `rotation` (an orthogonal map folded before the
            post-norm, which it commutes with, and a scale folded into the norm), `renormalised` (any d×d map folded
            before the post-norm and a scale into the norm, fitted with the norm in the loss) or `none` (refused).
        norm_weight_offset (`float`, *optional*, defaults to 0): the norm computes `x̂·(offset + weight)` (Gemma: 1).
        repair_before_training (`str`, *optional*): the form `repair_kind="auto"` takes when training follows the
            repair (`prune --heal`, the callback's `remove_at_step`), where it differs from `repair` (Gemma:
            `diagonal`, measured the better start for distillation); None: `repair`.
        post_norm_input (`str`, *optional*): for `repair="rotation"` or `"renormalised"`, the block submodule whose output the last
            post-norm normalises (Gemma: `mlp`); the rotation folds into its output projection, the scale into the
            norm.
    """

    name: str
    model_types: tuple[str, ...]
    layers_path: str | None = None
    branches: tuple[str, ...] = ()
    per_layer_fields: tuple[str, ...] = ("layer_types",)
    block_kind: BlockKindFn = _attention_kind
    rewrite_config: ConfigRewriteFn | None = None
    repair: str = "linear"
    repair_before_training: str | None = None
    norm_weight_offset: float = 0.0
    post_norm_input: str | None = None
    notes: str = ""

    @property
    def gate_kinds(self) -> tuple[str, ...]:
        return ("branch", "layer") if self.branches else ("layer",)


_REGISTRY: dict[str, ArchitectureSpec] = {}
GENERIC = ArchitectureSpec(
    name="generic", model_types=(), repair="none", notes="decoder stack found by shape; layer gate only"
)


def register_architecture(spec: ArchitectureSpec) -> ArchitectureSpec:
    """Register ``spec`` for each of its model types (a later registration replaces an earlier one)."""
    for model_type in spec.model_types:
        _REGISTRY[model_type] = spec
    return spec


def registered_architectures() -> list[ArchitectureSpec]:
    """Every registered spec once, in registration order."""
    seen: dict[str, ArchitectureSpec] = {}
    for spec in _REGISTRY.values():
        seen.setdefault(spec.name, spec)
    return list(seen.values())


def get_architecture(model: nn.Module) -> ArchitectureSpec:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    return _REGISTRY.get(model_type, GENERIC)


def num_layers_of(config) -> int:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise BlockCBOError(f"the config of type {type(config).__name__} has no num_hidden_layers; cannot find its blocks")


def _resolve(model: nn.Module, path: str) -> nn.Module | None:
    module = model
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def find_layers_path(model: nn.Module, spec: ArchitectureSpec | None = None) -> str:
    """Dotted path of the decoder-block `nn.ModuleList`: the spec's path, else the list whose length is the layer count."""
    spec = spec or get_architecture(model)
    if spec.layers_path is not None:
        for prefix in ("", "model.", "base_model."):
            if isinstance(_resolve(model, prefix + spec.layers_path), nn.ModuleList):
                return prefix + spec.layers_path
    config = getattr(model, "config", None)
    expected = num_layers_of(config) if config is not None else None
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (expected is None or len(module) == expected)
    ]
    # The decoder stack is the outermost such list whose members are all of one class.
    candidates = [(n, m) for n, m in candidates if len({type(b) for b in m}) == 1]
    if not candidates:
        raise BlockCBOError(
            f"found no decoder stack in {type(model).__name__}: no nn.ModuleList of {expected} blocks; "
            "register an ArchitectureSpec with layers_path for this model family"
        )
    candidates.sort(key=lambda item: item[0].count("."))
    return candidates[0][0]


def get_layers(model: nn.Module, spec: ArchitectureSpec | None = None) -> nn.ModuleList:
    return _resolve(model, find_layers_path(model, spec))


def set_layers(model: nn.Module, layers: nn.ModuleList, spec: ArchitectureSpec | None = None) -> None:
    path = find_layers_path(model, spec)
    parent_path, _, attr = path.rpartition(".")
    parent = _resolve(model, parent_path) if parent_path else model
    setattr(parent, attr, layers)


@dataclass(frozen=True)
class BlockInfo:
    """One removable block: its index, module path and kind."""

    index: int
    name: str
    kind: str
    num_parameters: int


def describe_blocks(model: nn.Module, spec: ArchitectureSpec | None = None) -> list[BlockInfo]:
    spec = spec or get_architecture(model)
    path = find_layers_path(model, spec)
    layers = _resolve(model, path)
    config = model.config
    return [
        BlockInfo(
            index=i,
            name=f"{path}.{i}",
            kind=spec.block_kind(config, i, block),
            num_parameters=sum(p.numel() for p in block.parameters()),
        )
        for i, block in enumerate(layers)
    ]


def branch_modules(block: nn.Module, spec: ArchitectureSpec) -> list[nn.Module]:
    """The residual-branch modules of ``block`` named by the spec that this block has (a hybrid block has one)."""
    found = [getattr(block, name) for name in spec.branches if isinstance(getattr(block, name, None), nn.Module)]
    return found


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def support_table(tested: set[str] | list[str] = ()) -> str:
    """Markdown table of the registered families (for the README): family, model types, gate, block kinds, tested."""
    kinds = {
        "mlp_kind": "dense / moe",
        "nemotron_kind": "mamba / attention / moe / mlp",
        "_attention_kind": "attention",
    }
    rows = [
        "| family | model types | gate (branches) | block kinds | repair map | tested | notes |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for spec in registered_architectures():
        covered = sorted(set(spec.model_types) & set(tested))
        gate = f"branch ({', '.join(spec.branches)})" if spec.branches else "layer"
        kind = kinds.get(spec.block_kind.__name__, spec.block_kind.__name__)
        repair = spec.repair
        if spec.repair_before_training not in (None, spec.repair):
            repair += f" ({spec.repair_before_training} when training follows)"
        rows.append(
            f"| {spec.name} | {', '.join(spec.model_types)} | {gate} | {kind} | {repair} | "
            f"{', '.join(covered) if covered else 'no'} | {spec.notes} |"
        )
    rows.append(
        f"| {GENERIC.name} | any other | layer | attention | none | yes (llama as unknown type) | {GENERIC.notes} |"
    )
    return "\n".join(rows)
