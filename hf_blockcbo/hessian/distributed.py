"""Data-parallel Hessian passes with Accelerate: shard the samples, check the processes agree, gather the rows.

Launched with ``accelerate launch -m hf_blockcbo.commands.cli calibrate ...`` each process computes the rows of a
contiguous shard of samples; rows are gathered by sample index (no duplicates, uneven shards fine), so the artifact
equals the single-process one. Without a launcher everything runs in one process.
"""

from __future__ import annotations

import torch

from ..errors import BlockCBOError


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


def fsdp_requested() -> bool:
    """`accelerate launch --use_fsdp` sets ACCELERATE_USE_FSDP; the calibrate command also takes `--fsdp`."""
    import os

    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def shard_model_fsdp(model: torch.nn.Module, layers: torch.nn.ModuleList) -> torch.nn.Module:
    """Shard the weights over the processes with FSDP2 (``fully_shard`` per decoder layer, then the root).

    The gates are forward hooks with no parameters of their own, so they sit outside every sharded parameter; the
    weights stay frozen (FSDP only gathers them for each layer's forward and backward).
    """
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as err:  # pragma: no cover - torch < 2.6
        raise BlockCBOError("FSDP sharding needs torch ≥ 2.6 (torch.distributed.fsdp.fully_shard)") from err
    if not torch.distributed.is_initialized():
        raise BlockCBOError("FSDP needs a distributed launch: accelerate launch --use_fsdp --num_processes N ...")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def lockstep_counts(done: int, num_samples: int, batch_size: int) -> tuple[int, int, int]:
    """(rows to keep from the resume file, batches to run, padding batches) for this process.

    FSDP needs every process to run the same forwards, so resumed work is cut to a whole number of batches every
    process has, and shards with fewer batches left run padding batches (their rows are dropped).
    """
    from accelerate.utils import gather_object

    done = min(gather_object([(done // batch_size) * batch_size]))
    mine = -(-(num_samples - done) // batch_size)
    most = max(gather_object([mine]))
    return done, mine, most - mine
