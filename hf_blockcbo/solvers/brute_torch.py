"""Brute force in torch (CUDA when present, CPU otherwise): every C(N, M) state, in chunks, top-K merged.

States are enumerated as a prefix of the M−2 smallest blocks plus a pair (j, k) above it:
``E = E_prefix + g_j + g_k + 2Q_jk`` with ``g = diag(Q) + 2·Q[prefix].sum(0)``. Prefixes are unranked on the device
from their index (combinatorial number system, binomials clamped so int64 never overflows), a chunk of prefixes gives
a ``[chunk, N, N]`` energy block, and each chunk's top-K is merged into the running top-K.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from ..errors import BlockCBOError
from .base import Problem, register_solver


_CLAMP = 2**62


def _binomial_table(n: int, r: int, device) -> torch.Tensor:
    """table[t, c] = C(c, t) clamped to 2^62, for c ≤ n, t ≤ r (rows contiguous for searchsorted)."""
    rows = [[min(math.comb(c, t), _CLAMP) for c in range(n + 1)] for t in range(r + 1)]
    return torch.tensor(rows, dtype=torch.int64, device=device)


def _unrank(ranks: torch.Tensor, size: int, table: torch.Tensor) -> torch.Tensor:
    """Colex unranking: combinations (ascending) of `size` elements for each rank."""
    out = torch.empty(ranks.shape[0], size, dtype=torch.int64, device=ranks.device)
    r = ranks.clone()
    for t in range(size, 0, -1):
        column = table[t]  # non-decreasing in c
        c = torch.searchsorted(column, r, right=True) - 1  # largest c with C(c, t) <= r
        out[:, t - 1] = c
        r = r - column[c]
    return out


def brute_force_topk(
    Q: np.ndarray,
    num_remove: int,
    top_k: int,
    device: str | None = None,
    chunk_states: int = 2**24,
    time_limit: float | None = None,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """The ``top_k`` lowest states by exhaustive search; returns (states, energies, complete)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n = Q.shape[0]
    m = num_remove
    Qt = torch.as_tensor(Q, dtype=torch.float64, device=device)
    diag = torch.diagonal(Qt)
    if m == 1:
        order = torch.argsort(diag)[:top_k]
        return order.view(-1, 1).cpu().numpy(), diag[order].cpu().numpy(), True
    prefix_size = m - 2
    num_prefixes = math.comb(n, prefix_size)
    if num_prefixes >= _CLAMP:
        raise BlockCBOError(f"C({n}, {prefix_size}) prefixes are too many for brute force; use `solver=tabu`")
    table = _binomial_table(n, max(prefix_size, 1), device)
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=device), diagonal=1)
    pair_q = 2.0 * Qt
    chunk = max(1, chunk_states // (n * n))
    best_e = torch.empty(0, dtype=torch.float64, device=device)
    best_s = torch.empty(0, m, dtype=torch.int64, device=device)
    start = time.perf_counter()
    complete = True
    positions = torch.arange(n, device=device)
    for first in range(0, num_prefixes, chunk):
        ranks = torch.arange(first, min(first + chunk, num_prefixes), dtype=torch.int64, device=device)
        prefix = (
            _unrank(ranks, prefix_size, table) if prefix_size else torch.empty(1, 0, dtype=torch.int64, device=device)
        )
        rows = Qt[prefix]  # [B, p, N]
        field = rows.sum(dim=1)  # [B, N]
        e_prefix = (
            (rows.gather(2, prefix.unsqueeze(1).expand(-1, prefix_size, -1))).sum(dim=(1, 2))
            if prefix_size
            else torch.zeros(1, dtype=torch.float64, device=device)
        )
        g = diag + 2.0 * field  # [B, N]
        energy = e_prefix[:, None, None] + g[:, :, None] + g[:, None, :] + pair_q[None]
        floor = prefix[:, -1] if prefix_size else torch.full((prefix.shape[0],), -1, device=device)
        valid = upper[None] & (positions[None, :, None] > floor[:, None, None])
        energy = energy.masked_fill(~valid, float("inf")).view(energy.shape[0], -1)
        k = min(top_k, energy.numel())
        values, flat = torch.topk(energy.view(-1), k, largest=False)
        keep = torch.isfinite(values)
        values, flat = values[keep], flat[keep]
        b, jk = flat // (n * n), flat % (n * n)
        states = torch.cat([prefix[b], (jk // n).unsqueeze(1), (jk % n).unsqueeze(1)], dim=1)
        best_e = torch.cat([best_e, values])
        best_s = torch.cat([best_s, states])
        if best_e.numel() > top_k:
            order = torch.topk(best_e, top_k, largest=False).indices
            best_e, best_s = best_e[order], best_s[order]
        if time_limit is not None and time.perf_counter() - start > time_limit and first + chunk < num_prefixes:
            complete = False
            break
    return best_s.cpu().numpy(), best_e.cpu().numpy(), complete


@register_solver("torch")
def solve_torch(problem: Problem):
    """Brute force on the GPU (or CPU) in chunks; certified when it completes."""
    if problem.constraints is not None:
        raise BlockCBOError(
            "the torch brute force takes no per-kind counts or budget; use `solver=exact` or `solver=tabu`"
        )
    states, energies, complete = brute_force_topk(
        problem.Q, problem.num_remove, problem.top_k, time_limit=problem.time_limit
    )
    return states, energies, complete, {"complete": complete}
