"""Physical removal of blocks: the model gets shallower and saves as a plain transformers checkpoint.

After removal the `nn.ModuleList` holds only the kept blocks, every stored `layer_idx` (the KV-cache slot) is
renumbered, `num_hidden_layers` and the per-layer config fields (`layer_types`, ...) are rewritten, so the saved
folder loads with `AutoModelForCausalLM.from_pretrained` and no hf_blockcbo import.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from ..errors import BlockCBOError
from ..io_utils import atomic_dir
from .architectures import ArchitectureSpec, count_parameters, get_architecture, get_layers, set_layers


PROVENANCE_FILE = "block_removal.json"
_INDEX_ATTRIBUTES = ("layer_idx", "layer_id")


def _check_blocks(blocks: Sequence[int], num_blocks: int) -> list[int]:
    blocks = sorted({int(b) for b in blocks})
    if not blocks:
        raise BlockCBOError("no block to remove; give at least one")
    if blocks[0] < 0 or blocks[-1] >= num_blocks:
        raise BlockCBOError(f"blocks {blocks} are out of range 0..{num_blocks - 1}")
    if len(blocks) >= num_blocks:
        raise BlockCBOError(f"cannot remove all {num_blocks} blocks; keep at least one")
    return blocks


def _renumber(block: nn.Module, old: int, new: int) -> None:
    for module in block.modules():
        for attr in _INDEX_ATTRIBUTES:
            if getattr(module, attr, None) == old:
                setattr(module, attr, new)


def _rewrite_config(config, spec: ArchitectureSpec, num_old: int, keep: list[int]) -> None:
    """Rewrite a copy first and apply it only if every step succeeds: a refusal leaves the config untouched."""
    new = copy.deepcopy(config)
    _rewrite_config_copy(new, spec, num_old, keep)
    config.__dict__.update(new.__dict__)


def _rewrite_config_copy(config, spec: ArchitectureSpec, num_old: int, keep: list[int]) -> None:
    for name, value in list(vars(config).items()):
        if not isinstance(value, (list, tuple)) or len(value) != num_old or name.startswith("_"):
            continue
        if name not in spec.per_layer_fields:
            raise BlockCBOError(
                f"the config field {name!r} holds {num_old} entries and looks per-layer, but the {spec.name!r} "
                "architecture spec does not say how to rewrite it; register the field in the spec's per_layer_fields"
            )
    for name in spec.per_layer_fields:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)) and len(value) == num_old:
            setattr(config, name, type(value)(value[i] for i in keep))
    config.num_hidden_layers = len(keep)
    if spec.rewrite_config is not None:
        spec.rewrite_config(config, keep)


def check_removal(model: nn.Module, blocks: Sequence[int], spec: ArchitectureSpec | None = None) -> None:
    """Raise the error :func:`remove_blocks` would raise, without touching ``model``."""
    spec = spec or get_architecture(model)
    num_old = len(get_layers(model, spec))
    removed = _check_blocks(blocks, num_old)
    keep = [i for i in range(num_old) if i not in set(removed)]
    _rewrite_config_copy(copy.deepcopy(model.config), spec, num_old, keep)


def remove_blocks(model: nn.Module, blocks: Sequence[int], spec: ArchitectureSpec | None = None) -> nn.Module:
    """Delete ``blocks`` (0-based) from ``model`` in place and return it."""
    spec = spec or get_architecture(model)
    layers = get_layers(model, spec)
    num_old = len(layers)
    removed = _check_blocks(blocks, num_old)
    keep = [i for i in range(num_old) if i not in set(removed)]
    _rewrite_config(model.config, spec, num_old, keep)
    for new, old in enumerate(keep):
        _renumber(layers[old], old, new)
    set_layers(model, nn.ModuleList([layers[i] for i in keep]), spec)
    return model


def save_pruned(
    model: nn.Module,
    tokenizer,
    output_dir: str | os.PathLike,
    provenance: dict,
    overwrite: bool = False,
) -> Path:
    """Save model, tokenizer, generation config and ``block_removal.json`` into ``output_dir`` atomically."""
    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        payload = dict(provenance)
        payload.setdefault("num_parameters_after", count_parameters(model))
        (tmp / PROVENANCE_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return Path(output_dir)
