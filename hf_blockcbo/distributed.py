"""Data-parallel Hessian passes with Accelerate: shard the samples, check the processes agree, gather the rows.

Launched with ``accelerate launch -m hf_blockcbo.commands.cli calibrate ...`` each process computes the rows of a
contiguous shard of samples; rows are gathered by sample index (no duplicates, uneven shards fine), so the artifact
equals the single-process one. Without a launcher everything runs in one process.
"""

from __future__ import annotations

import torch

from .errors import BlockCBOError


def process_state():
    """(rank, world size, is main, state) from Accelerate's `PartialState` (a single process when not launched)."""
    import os

    from accelerate import PartialState

    # On a machine without CUDA, torchrun-launched processes (`accelerate launch --multi_gpu`, `torchrun`) must ask
    # Accelerate for the CPU (gloo) backend explicitly.
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    return state.process_index, state.num_processes, state.is_main_process, state


def shard_bounds(num_samples: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of this process's contiguous shard; shards differ in size by at most one sample."""
    base, extra = divmod(num_samples, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def check_agreement(key: str, what: str) -> None:
    """Refuse to go on when the processes disagree on model or data (compared by hash)."""
    from accelerate.utils import gather_object

    keys = gather_object([key])
    if len(set(keys)) > 1:
        raise BlockCBOError(
            f"the processes disagree on the {what} (hashes {sorted(set(keys))}); launch every process with the same "
            "model, data and settings"
        )


def gather_rows(start: int, rows: torch.Tensor, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every process's rows, ordered by sample index; each index exactly once."""
    from accelerate.utils import gather_object

    pieces = gather_object([(start, rows.numpy(), losses.numpy())])
    pieces.sort(key=lambda piece: piece[0])
    expected = 0
    for begin, block, _ in pieces:
        if begin != expected:
            raise BlockCBOError(f"gathered rows do not tile the samples (expected index {expected}, got {begin})")
        expected += block.shape[0]
    A = torch.cat([torch.from_numpy(block) for _, block, _ in pieces])
    loss = torch.cat([torch.from_numpy(value) for _, _, value in pieces])
    return A, loss
