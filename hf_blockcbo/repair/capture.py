"""Forward passes that stop once what the repair needs is captured: the streams after given blocks, or one module's
output and input with the stream after a block."""

from __future__ import annotations

import torch


class StopForward(Exception):
    """Raised by a hook once the stream after the gap is captured: the rest of the model is not run."""


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

    forward_until_stop(model, [(layers[i], hook_for(i)) for i in sorted(set(indices))], ids, mask)
    return captured


def forward_until_stop(model, hooks, ids, mask) -> None:
    """Run ``model`` with forward ``hooks`` [(module, hook)] attached until one raises `StopForward`; detach them."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()


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

    forward_until_stop(model, [(module, grab), (layers[index], stop)], ids, mask)
    return captured["u"], captured["h"], captured["y"]
