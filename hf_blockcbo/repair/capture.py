"""Forward passes that stop once what the repair needs is captured: the streams after given blocks, or one module's
output and input with the stream after a block."""

from __future__ import annotations

import torch

from ..hessian.replay import StopForward, forward_until_stopped


def first_output(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def capture_streams(model, layers, indices: list[int], ids, mask) -> dict[int, torch.Tensor]:
    """Run ``model`` until the last of ``indices`` and return each block's output (the stream after it)."""
    captured: dict[int, torch.Tensor] = {}
    last = max(indices)

    def hook_for(index):
        def hook(module, args, output):
            captured[index] = first_output(output).detach()
            if index == last:
                raise StopForward

        return hook

    handles = [layers[i].register_forward_hook(hook_for(i)) for i in sorted(set(indices))]
    forward_until_stopped(model, ids, mask, handles)
    return captured


def capture_contribution(model, layers, module, index: int, ids, mask):
    """Run ``model`` until block ``index``: the output of ``module`` (the contribution), the stream after block
    ``index`` and ``module``'s input (for a post-norm: what it normalises)."""
    captured = {}

    def grab(mod, args, output):
        captured["u"] = first_output(output).detach().clone()  # cloned: some blocks add to it in place (Falcon)
        captured["y"] = args[0].detach() if args and isinstance(args[0], torch.Tensor) else None

    def stop(mod, args, output):
        captured["h"] = first_output(output).detach()
        raise StopForward

    handles = [module.register_forward_hook(grab), layers[index].register_forward_hook(stop)]
    forward_until_stopped(model, ids, mask, handles)
    return captured["u"], captured["h"], captured["y"]
