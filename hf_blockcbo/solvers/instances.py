"""Hessian-like test instances: H = AᵀA/m with a strongly varying diagonal, correlated neighbouring blocks and
mixed-sign off-diagonals — the structure real gate gradients have (for tests and benchmarks)."""

from __future__ import annotations

import numpy as np


def hessian_like(num_blocks: int, num_samples: int | None = None, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = num_samples or 4 * num_blocks
    scale = np.exp(rng.normal(0, 1, num_blocks))  # block importance varies over orders of magnitude
    A = rng.normal(size=(m, num_blocks)) * scale
    A[:, 1:] += 0.6 * A[:, :-1]  # neighbouring blocks are correlated
    A -= 0.3 * A.mean(axis=1, keepdims=True)  # a shared component gives mixed-sign off-diagonals
    return A.T @ A / m
