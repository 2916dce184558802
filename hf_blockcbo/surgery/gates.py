"""Scalar gates α on each decoder block, attached with hooks (no model class is re-implemented).

Two gate kinds:

- ``"branch"`` (paper Eq. 1–2): α scales each residual branch output of block i right before its residual add,
  ``h = h + α_i·attn(...)``, ``h = h + α_i·mlp(...)``; attention and MLP of a layer share α_i.
- ``"layer"`` (any decoder stack): ``h_out = h_in + α_i·(layer(h_in) − h_in)``, computed as
  ``out + (α_i − 1)·(out − h_in)`` so that α = 1 returns the layer output bit for bit.

Gate values are either one value per block (shape ``[N]``, e.g. a 0/1 removal mask) or one value per sample and
block (shape ``[batch, N]``): with ``requires_grad`` the latter yields every sample's gradient in one backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import BlockCBOError
from .architectures import ArchitectureSpec, branch_modules, get_architecture, get_layers


GATE_KINDS = ("auto", "branch", "layer")


def resolve_gate_kind(spec: ArchitectureSpec, gate: str) -> str:
    if gate not in GATE_KINDS:
        raise BlockCBOError(f"unknown gate kind {gate!r}; choose one of {', '.join(GATE_KINDS)}")
    if gate == "auto":
        return "branch" if spec.branches else "layer"
    if gate == "branch" and not spec.branches:
        raise BlockCBOError(
            f"the {spec.name!r} architecture has no known residual branches; use `gate=layer` for this model"
        )
    return gate


def _scale_output(output, scale: torch.Tensor):
    if isinstance(output, torch.Tensor):
        return output * scale.to(output.dtype)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (output[0] * scale.to(output[0].dtype),) + tuple(output[1:])
    raise BlockCBOError(f"cannot gate a module output of type {type(output).__name__}")


def _first_tensor(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def _replace_first(output, tensor: torch.Tensor):
    if isinstance(output, torch.Tensor):
        return tensor
    return (tensor,) + tuple(output[1:])


class BlockGates:
    """Gates on every decoder block of ``model``; hooks are attached on construction and removed by :meth:`remove`.

    Args:
        model (`nn.Module`): a transformers causal LM.
        gate (`str`, *optional*, defaults to `"auto"`): `"branch"`, `"layer"`, or `"auto"` (branch where the
            architecture registry knows the branches, layer otherwise).
        spec (`ArchitectureSpec`, *optional*): overrides the registry's spec for this model.

    ```python
    with BlockGates(model) as gates:
        gates.set(torch.tensor([1.0] * 10 + [0.0] + [1.0] * 19))  # block 10 switched off
        logits = model(input_ids).logits
    ```
    """

    def __init__(self, model: nn.Module, gate: str = "auto", spec: ArchitectureSpec | None = None):
        self.model = model
        self.spec = spec or get_architecture(model)
        self.gate = resolve_gate_kind(self.spec, gate)
        self.layers = get_layers(model, self.spec)
        self.num_blocks = len(self.layers)
        self.values: torch.Tensor | None = None
        self._inputs: dict[int, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._attach()

    # -- values -------------------------------------------------------------------------------------------------
    def set(self, values: torch.Tensor | Sequence[float] | None) -> None:
        """Set α: `None` (the original model), shape `[N]`, or shape `[batch, N]`."""
        if values is None:
            self.values = None
            return
        values = torch.as_tensor(values)
        if values.shape[-1] != self.num_blocks or values.dim() not in (1, 2):
            raise BlockCBOError(
                f"gate values must have shape [N] or [batch, N] with N={self.num_blocks}, got {list(values.shape)}"
            )
        self.values = values

    def set_removed(self, removed: Sequence[int]) -> None:
        """α = 0 on ``removed`` blocks and 1 elsewhere: the model as if those blocks were deleted."""
        mask = torch.ones(self.num_blocks)
        mask[list(removed)] = 0.0
        self.set(mask)

    def _alpha(self, index: int, like: torch.Tensor) -> torch.Tensor | None:
        if self.values is None:
            return None
        values = self.values.to(like.device)
        if values.dim() == 1:
            return values[index]
        rows = values.shape[0]
        if like.dim() == 2 and like.shape[0] != rows and like.shape[0] % rows == 0:
            # a branch that flattens its tokens to [batch·T, d] (OPT's MLP): row r is sample r // T
            return values[:, index].repeat_interleave(like.shape[0] // rows)[:, None]
        if rows != like.shape[0]:
            raise BlockCBOError(
                f"per-sample gates hold {values.shape[0]} rows but the batch has {like.shape[0]} samples"
            )
        return values[:, index].reshape((-1,) + (1,) * (like.dim() - 1))

    # -- hooks --------------------------------------------------------------------------------------------------
    def _attach(self) -> None:
        for index, block in enumerate(self.layers):
            if self.gate == "branch":
                modules = branch_modules(block, self.spec)
                if not modules:
                    raise BlockCBOError(
                        f"block {index} ({type(block).__name__}) has none of the branches {self.spec.branches}; "
                        "use --gate layer"
                    )
                for module in modules:
                    self._handles.append(module.register_forward_hook(self._branch_hook(index)))
            else:
                self._handles.append(block.register_forward_pre_hook(self._layer_pre_hook(index), with_kwargs=True))
                self._handles.append(block.register_forward_hook(self._layer_hook(index)))

    def _branch_hook(self, index: int):
        def hook(module, args, output):
            alpha = self._alpha(index, _first_tensor(output))
            return None if alpha is None else _scale_output(output, alpha)

        return hook

    def _layer_pre_hook(self, index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            if hidden is None:
                raise BlockCBOError(f"block {index} was called without hidden states; the layer gate cannot see h_in")
            self._inputs[index] = hidden

        return hook

    def _layer_hook(self, index: int):
        def hook(module, args, output):
            h_in = self._inputs.pop(index, None)
            out = _first_tensor(output)
            alpha = self._alpha(index, out)
            if alpha is None:
                return None
            alpha = alpha.to(out.dtype)
            return _replace_first(output, out + (alpha - 1) * (out - h_in))

        return hook

    # -- lifetime -----------------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Detach every hook; the model is exactly as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inputs.clear()
        self.values = None

    def __enter__(self) -> BlockGates:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
