"""Keep freed memory in the process during CPU training (glibc only): large blocks come from the heap, not mmap.

A distillation step frees and reallocates tensors of the same sizes every step; the largest are the logits
(batch × length × vocabulary: 2 × 128 × 262,144 floats for Gemma-3 is 268 MB). glibc serves any block above its mmap
threshold (at most 32 MB by default) with a fresh ``mmap`` and returns it with ``munmap`` on free, so every step
faults every page of those blocks back in and the kernel zeroes them: on 2 cores a Gemma-3-270M step spent 87 % of
its CPU time in the kernel. Raising the mmap and trim thresholds keeps such blocks in the heap, where the next step
reuses them. The setting is process-wide and not undone (freed memory stays with the process until it exits);
:func:`hf_blockcbo.healing.trainer.heal` applies it on CPU unless ``keep_freed_memory`` is off (CLI:
``--no-keep-freed-memory``).
"""

from __future__ import annotations

import ctypes
import platform


# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_NEVER = -1  # mallopt takes an int; −1 becomes SIZE_MAX: never mmap a block, never trim the heap (mallopt(3))
_SETTINGS = ((_M_MMAP_THRESHOLD, _NEVER), (_M_TRIM_THRESHOLD, _NEVER), (_M_TOP_PAD, 2**30))
_state = {"applied": False}


def _mallopt():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve every block from the heap (mmap only when the heap cannot grow), never to trim it,
    and to grow it 1 GB at a time. True if that is in effect; False, doing nothing, on another C library or system.
    Idempotent."""
    if _state["applied"]:
        return True
    mallopt = _mallopt()
    if mallopt is None:
        return False
    accepted = [mallopt(ctypes.c_int(option), ctypes.c_int(value)) == 1 for option, value in _SETTINGS]  # all three
    _state["applied"] = all(accepted)
    return _state["applied"]
