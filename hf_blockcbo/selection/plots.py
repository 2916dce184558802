"""Figures people would rather see than read: the energy spectrum and the block-frequency map (paper Fig. 2)."""

from __future__ import annotations

import os

import numpy as np

from ..errors import BlockCBOError
from ..io_utils import atomic_file
from ..solvers import SolveResult


def plot_spectrum(result: SolveResult, path: str | os.PathLike, block_kinds: list[str] | None = None) -> None:
    """PNG with (left) energy vs rank of the K lowest states and (right) which blocks each state removes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise BlockCBOError("plots need matplotlib: pip install 'hf_blockcbo[plot]'") from err
    ranks = [c.rank for c in result.candidates]
    energies = [c.energy for c in result.candidates]
    grid = np.zeros((len(result.candidates), result.num_blocks))
    for row, c in enumerate(result.candidates):
        grid[row, list(c.blocks)] = 1.0
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 1.6]})
    left.plot(ranks, energies, "o-", ms=3)
    left.set_xlabel("rank in the spectrum")
    left.set_ylabel("energy xᵀHx")
    certified = "certified exact" if result.certified else "heuristic"
    left.set_title(f"{len(ranks)} lowest states, remove {result.num_remove} ({result.method}, {certified})")
    right.imshow(grid, aspect="auto", cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
    right.set_xlabel("block")
    right.set_ylabel("rank")
    right.set_title(f"blocks removed per state (frequency: {grid.mean(axis=0).max():.0%} max)")
    right.set_xticks(range(0, result.num_blocks, max(1, result.num_blocks // 15)))
    freq = right.twiny()
    freq.set_xlim(right.get_xlim())
    freq.set_xticks(range(result.num_blocks))
    freq.set_xticklabels([f"{v:.0%}" if v else "" for v in grid.mean(axis=0)], rotation=90, fontsize=6)
    if block_kinds and len(set(block_kinds)) > 1:
        right.set_xlabel("block (" + ", ".join(sorted(set(block_kinds))) + ")")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
