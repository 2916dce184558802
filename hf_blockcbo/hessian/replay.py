"""Running a decoder from a known block input: blocks replayed, skipped, or the forward stopped early.

The stream entering block k depends only on which blocks before k are removed, so a forward whose blocks
``0..k−1`` are known need not recompute them: :func:`shared_prefix` replaces them with a replay of block k's
input. A removed block returns its input (its gate is 0), so :func:`skipped_blocks` replaces it with the identity
instead of running it gated. :func:`stream_until` runs a model until a block's input is known and stops there;
:func:`forward_until_stopped` is that early stop for any hook that raises :class:`StopForward`. The
decoder loop must need nothing from its layers but their output; :func:`hf_blockcbo.hessian.measured.fast_paths`
checks that once per model against a full forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook once what it wanted is captured (the rest of the forward is not needed)."""


def forward_until_stopped(model: nn.Module, ids, mask, handles, contexts=()) -> None:
    """Run ``model`` on ``ids`` inside ``contexts`` (entered in order, not yet entered) until a hook raises
    `StopForward`; the hooks' ``handles`` are removed in any case."""
    try:
        with contextlib.ExitStack() as stack:
            for context in contexts:
                stack.enter_context(context)
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()


def _copy_attributes(stand_in: nn.Module, like: nn.Module) -> None:
    """Plain attributes the decoder loop may read off a layer (attention_type, layer_idx, ...)."""
    for name, value in vars(like).items():
        if not name.startswith("_") and isinstance(value, (str, int, float, bool, type(None))):
            setattr(stand_in, name, value)


class _Replay(nn.Module):
    """Stands in for a block before the first recomputed one: returns that block's known input."""

    def __init__(self, hidden: torch.Tensor, as_tuple: bool, like: nn.Module):
        super().__init__()
        _copy_attributes(self, like)
        self.hidden, self.as_tuple = hidden, as_tuple

    def forward(self, *args, **kwargs):
        return (self.hidden,) if self.as_tuple else self.hidden


class _Skip(nn.Module):
    """Stands in for a removed block: returns its input unchanged."""

    def __init__(self, as_tuple: bool, like: nn.Module):
        super().__init__()
        _copy_attributes(self, like)
        self.as_tuple = as_tuple

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) if self.as_tuple else hidden


@contextlib.contextmanager
def _stand_ins(layers: nn.ModuleList, replacements: dict[int, nn.Module]):
    saved = {i: layers[i] for i in replacements}
    try:
        for i, module in replacements.items():
            layers[i] = module
        yield
    finally:
        for i, layer in saved.items():
            layers[i] = layer


def shared_prefix(layers: nn.ModuleList, first: int, hidden: torch.Tensor, as_tuple: bool):
    """Blocks ``0..first-1`` replaced by a replay of block ``first``'s input (they are unchanged in every configuration
    of the group, so their output is known); restored on exit. ``first = 0`` replaces nothing."""
    return _stand_ins(layers, {i: _Replay(hidden, as_tuple, layers[i]) for i in range(first)})


def skipped_blocks(layers: nn.ModuleList, blocks: Iterable[int], as_tuple: bool):
    """``blocks`` replaced by the identity (a removed block's output is its input); restored on exit."""
    return _stand_ins(layers, {i: _Skip(as_tuple, layers[i]) for i in blocks})


def output_is_tuple(layers: nn.ModuleList, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether the decoder's blocks return a tuple (older transformers) or a tensor, from a forward stopped after
    block 0."""
    kinds: list[bool] = []

    def hook(module, args, output):
        kinds.append(isinstance(output, tuple))
        raise StopForward

    forward_until_stopped(model, ids[:1, :2], mask[:1, :2], [layers[0].register_forward_hook(hook)])
    return kinds[0]


@torch.no_grad()
def stream_until(
    model: nn.Module,
    layers: nn.ModuleList,
    ids: torch.Tensor,
    mask: torch.Tensor,
    stop: int,
    start: tuple[int, torch.Tensor] | None = None,
    skip: Iterable[int] = (),
    as_tuple: bool = False,
) -> torch.Tensor:
    """The input of block ``stop``: the forward begins at block 0, or at ``start = (block, its input)`` (block 0:
    ``(0, None)``), skips the blocks in ``skip`` and stops as soon as block ``stop``'s input is known."""
    captured: list[torch.Tensor] = []

    def pre(module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise StopForward

    first, hidden = start if start is not None else (0, None)
    handle = layers[stop].register_forward_pre_hook(pre, with_kwargs=True)
    contexts = (
        shared_prefix(layers, first, hidden, as_tuple),
        skipped_blocks(layers, [b for b in skip if first <= b < stop], as_tuple),
    )
    forward_until_stopped(model, ids, mask, [handle], contexts)
    return captured[0]
