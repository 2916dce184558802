"""Solver benchmark on Hessian-like instances, measured side by side in one run (2-core CPU unless CUDA is present).

    python benchmarks/solvers.py            # add --big for exact C(80, 8) (minutes on 2 cores)

Prints: exact top-100 time for C(40,12) (and C(80,8) with --big); tabu time to recover the exact top-1000 and the
fraction it recovers; the fraction of the exact top-100 that D-Wave's TabuSampler (dwave-samplers, penalty-QUBO form,
a benchmark-only dependency) recovers in the same wall time; torch brute-force throughput (combinations/s).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from hf_blockcbo.solvers import solve
from hf_blockcbo.solvers.brute_torch import brute_force_topk
from hf_blockcbo.solvers.instances import hessian_like


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def dwave_recovery(Q: np.ndarray, m: int, exact_states: set, seconds: float, seed: int = 0) -> tuple[float, int]:
    try:
        import dimod
        from dwave.samplers import TabuSampler
    except ImportError:
        return float("nan"), 0
    n = Q.shape[0]
    penalty = 2.0 * float(np.abs(Q).sum(axis=1).max())
    # xᵀQx + P(Σx − M)² as a QUBO (constant dropped)
    qubo = {(i, j): (Q[i, j] + Q[j, i] if i != j else Q[i, i]) for i in range(n) for j in range(i, n)}
    for i in range(n):
        qubo[(i, i)] += penalty * (1 - 2 * m)
        for j in range(i + 1, n):
            qubo[(i, j)] += 2 * penalty
    bqm = dimod.BinaryQuadraticModel.from_qubo(qubo)
    reads = 64
    result = TabuSampler().sample(bqm, num_reads=reads, timeout=max(1, int(1000 * seconds / reads)), seed=seed)
    found = {tuple(int(i) for i in np.flatnonzero(r)) for r in result.record.sample if int(r.sum()) == m}
    return len(found & exact_states) / len(exact_states), len(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big", action="store_true", help="also run exact C(80, 8)")
    args = parser.parse_args()
    solve(hessian_like(12), 3, top_k=5, method="exact")  # compile the numba kernels first
    solve(hessian_like(12), 3, top_k=5, method="tabu")

    print("exact enumeration (certified), top-100:")
    cases = [(32, 8), (40, 12)] + ([(80, 8)] if args.big else [])
    exact = {}
    for n, m in cases:
        Q = hessian_like(n, seed=n + m)
        seconds, result = timed(solve, Q, m, top_k=1000, method="exact")
        exact[(n, m)] = (Q, result)
        count = math.comb(n, m)
        print(f"  C({n},{m}) = {count:.3g} states: {seconds:.2f} s ({count / seconds:.3g} states/s)")
    for n, m in [(40, 12), (80, 16)]:
        Q = hessian_like(n, seed=n + m)
        seconds, result = timed(solve, Q, m, top_k=100, method="bnb", time_limit=60.0)
        state = "certified" if result.certified else "NOT certified (time limit 60 s)"
        print(
            f"  branch and bound C({n},{m}) top-100: {seconds:.2f} s, {state}, {result.info['subtrees_pruned']} pruned"
        )

    print("tabu (one run, K-best archive) vs the exact top-1000 / top-100, and D-Wave TabuSampler at the same time:")
    for (n, m), (Q, result) in exact.items():
        truth1000 = {c.blocks for c in result.candidates}
        truth100 = {c.blocks for c in result.candidates[:100]}
        seconds, tabu = timed(solve, Q, m, top_k=1000, method="tabu", seed=0)
        got = {c.blocks for c in tabu.candidates}
        dwave, feasible = dwave_recovery(Q, m, truth100, seconds)
        print(
            f"  N={n} M={m}: tabu {seconds:.2f} s, recovers {len(got & truth1000) / 10:.1f}% of the top-1000 and "
            f"{len(got & truth100)}% of the top-100 | D-Wave TabuSampler in {seconds:.2f} s: "
            f"{100 * dwave:.0f}% of the top-100 ({feasible} distinct feasible states)"
        )
    for n, m in [(64, 16), (80, 20), (80, 40)]:
        Q = hessian_like(n, seed=n * m)
        seconds, tabu = timed(solve, Q, m, top_k=1000, method="tabu", seed=0)
        print(f"  N={n} M={m}: tabu top-1000 in {seconds:.2f} s (no exact reference: C(N,M) = {math.comb(n, m):.2g})")

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    Q = hessian_like(32, seed=1)
    seconds, _ = timed(brute_force_topk, Q, 8, 100, device=device)
    print(
        f"torch brute force on {device}: C(32,8) = {math.comb(32, 8):.3g} in {seconds:.2f} s "
        f"({math.comb(32, 8) / seconds:.3g} combinations/s)"
    )


if __name__ == "__main__":
    main()
