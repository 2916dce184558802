"""Solver benchmark on Hessian-like instances, measured side by side in one run (2-core CPU unless CUDA is present).

    python benchmarks/solvers.py            # add --big for plain exact enumeration of C(80, 8) (minutes)

Prints: exact top-100 times for C(40,12) and C(80,8) by plain enumeration and by the certified branch and bound;
certified top-100 for C(80,16); tabu time to recover the exact top-1000 (N ≤ 80, M ≤ N/2); the fraction of the exact
top-100 that D-Wave's TabuSampler (dwave-samplers, penalty-QUBO form, a benchmark-only dependency) recovers in the
same wall time; torch brute-force throughput (combinations/s).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from hf_blockcbo.solvers import solve
from hf_blockcbo.solvers.brute_torch import brute_force_topk
from hf_blockcbo.solvers.instances import hessian_like
from hf_blockcbo.solvers.tabu import tabu_topk


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


def tabu_time_to_truth(Q: np.ndarray, m: int, truth: set, budget: float = 30.0) -> tuple[float, float]:
    """Seconds of the shortest tabu run (restarts doubling) that recovers all of ``truth``, and the fraction it got."""
    n = Q.shape[0]
    restarts = n
    while True:
        seconds, (states, _, _) = timed(tabu_topk, Q, m, len(truth), seed=0, restarts=restarts, patience=10**9)
        got = len({tuple(sorted(int(b) for b in s)) for s in states} & truth) / len(truth)
        if got == 1.0 or seconds > budget:
            return seconds, got
        restarts *= 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big", action="store_true", help="also run plain exact enumeration of C(80, 8)")
    args = parser.parse_args()
    for method in ("exact", "tabu", "bnb"):  # compile the numba kernels first
        solve(hessian_like(12), 5, top_k=5, method=method)

    print("exact top-100: plain enumeration vs certified branch and bound (both exact):")
    cases = [(40, 12), (80, 8)]
    reference = {}
    for n, m in cases:
        Q = hessian_like(n, seed=n + m)
        seconds, bnb = timed(solve, Q, m, top_k=1000, method="bnb")
        reference[(n, m)] = (Q, bnb)
        top100 = timed(solve, Q, m, top_k=100, method="bnb")[0]
        line = f"  C({n},{m}) = {math.comb(n, m):.3g}: branch and bound {top100:.2f} s (top-1000 {seconds:.2f} s)"
        if (n, m) != (80, 8) or args.big:
            plain, exact = timed(solve, Q, m, top_k=100, method="exact")
            same = [c.blocks for c in exact.candidates] == [c.blocks for c in bnb.candidates[:100]]
            line += f" | plain enumeration {plain:.2f} s | ratio {plain / top100:.0f}x | same top-100: {same}"
        print(line, flush=True)
    for n, m in [(80, 16), (80, 24), (64, 32)]:
        Q = hessian_like(n, seed=n + m)
        seconds, result = timed(solve, Q, m, top_k=100, method="bnb", time_limit=60.0)
        state = "certified" if result.certified else f"NOT certified (60 s limit; bound {result.lower_bound:.4g})"
        print(f"  C({n},{m}) = {math.comb(n, m):.2g}: branch and bound top-100 {seconds:.2f} s, {state}", flush=True)

    print("tabu (one run, K-best archive) vs the exact top-1000, and D-Wave TabuSampler at the same time (top-100):")
    for (n, m), (Q, exact) in reference.items():
        truth1000 = {c.blocks for c in exact.candidates}
        truth100 = {c.blocks for c in exact.candidates[:100]}
        seconds, got = tabu_time_to_truth(Q, m, truth1000)
        default_seconds, tabu = timed(solve, Q, m, top_k=100, method="tabu", seed=0)
        tabu100 = len({c.blocks for c in tabu.candidates} & truth100)
        dwave, feasible = dwave_recovery(Q, m, truth100, default_seconds)
        print(
            f"  N={n} M={m}: tabu recovers {100 * got:.1f}% of the exact top-1000 in {seconds:.2f} s | default tabu "
            f"top-100 run {default_seconds:.2f} s: {tabu100}% | D-Wave TabuSampler in {default_seconds:.2f} s: "
            f"{100 * dwave:.0f}% of the top-100 ({feasible} distinct feasible states)",
            flush=True,
        )
    for n, m in [(32, 16), (40, 20), (64, 16), (80, 16), (80, 40)]:
        Q = hessian_like(n, seed=n * m)
        bnb_seconds, exact = timed(solve, Q, m, top_k=1000, method="bnb", time_limit=60.0)
        if not exact.certified:
            seconds, tabu = timed(solve, Q, m, top_k=1000, method="tabu", seed=0)
            below = exact.lower_bound
            print(
                f"  N={n} M={m}: no certified top-1000 within 60 s (C(N,M) = {math.comb(n, m):.2g}, proven bound "
                f"{below:.4g}); tabu top-1000 in {seconds:.2f} s, ground energy {tabu.candidates[0].energy:.4g} vs "
                f"branch and bound's best {exact.candidates[0].energy:.4g}",
                flush=True,
            )
            continue
        seconds, got = tabu_time_to_truth(Q, m, {c.blocks for c in exact.candidates})
        print(
            f"  N={n} M={m}: tabu recovers {100 * got:.1f}% of the exact top-1000 in {seconds:.2f} s "
            f"(certified by branch and bound in {bnb_seconds:.2f} s)",
            flush=True,
        )

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
