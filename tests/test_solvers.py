import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_blockcbo.errors import BlockCBOError
from hf_blockcbo.solvers import energy, instances, solve


def hessian_like(n, m=None, seed=0):
    return instances.hessian_like(n, m, seed)


def brute_force(Q, M, K, protected=()):
    rows = []
    for combo in itertools.combinations([i for i in range(len(Q)) if i not in protected], M):
        rows.append((energy(Q, combo), combo))
    rows.sort()
    return rows[:K]


@pytest.mark.parametrize("method", ["exact", "tabu", "bnb"])
@pytest.mark.parametrize("n,m", [(10, 1), (10, 3), (12, 6), (14, 11), (18, 7)])
def test_top_k_equals_brute_force(method, n, m):
    Q = hessian_like(n, seed=n + m)
    k = min(25, math.comb(n, m))
    result = solve(Q, m, top_k=k, method=method, seed=1)
    expected = brute_force(Q, m, k)
    assert [c.blocks for c in result.candidates] == [b for _, b in expected]
    np.testing.assert_allclose([c.energy for c in result.candidates], [e for e, _ in expected], rtol=1e-12)
    assert [c.rank for c in result.candidates] == list(range(k))
    assert result.certified == (method in ("exact", "bnb"))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(4, 11),
    data=st.data(),
    seed=st.integers(0, 10_000),
)
def test_property_solvers_match_brute_force_on_random_psd(n, data, seed):
    m = data.draw(st.integers(1, n - 1))
    k = data.draw(st.integers(1, 30))
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(rng.integers(1, 3 * n), n))
    Q = A.T @ A / A.shape[0]
    expected = brute_force(Q, m, k)
    for method in ("exact", "tabu", "bnb"):
        got = solve(Q, m, top_k=k, method=method, seed=seed).candidates
        np.testing.assert_allclose([c.energy for c in got], [e for e, _ in expected], rtol=1e-9, atol=1e-12)
        assert len({c.blocks for c in got}) == len(got) == min(k, math.comb(n, m))


def test_protected_blocks_are_never_removed():
    Q = hessian_like(12, seed=3)
    result = solve(Q, 4, top_k=15, protected=[0, 11, 5])
    expected = brute_force(Q, 4, 15, protected={0, 11, 5})
    assert [c.blocks for c in result.candidates] == [b for _, b in expected]
    assert all(not {0, 5, 11} & set(c.blocks) for c in result.candidates)


def test_top_k_beyond_the_number_of_states_returns_all():
    result = solve(hessian_like(6), 2, top_k=1000)
    assert len(result.candidates) == math.comb(6, 2)


def test_tabu_is_deterministic_for_a_seed():
    Q = hessian_like(30, seed=5)
    a = solve(Q, 8, top_k=50, method="tabu", seed=7)
    b = solve(Q, 8, top_k=50, method="tabu", seed=7)
    assert [c.blocks for c in a.candidates] == [c.blocks for c in b.candidates]


def test_tabu_finds_the_exact_spectrum_on_a_hessian_like_instance():
    Q = hessian_like(24, seed=11)
    exact = solve(Q, 6, top_k=100, method="exact")
    tabu = solve(Q, 6, top_k=100, method="tabu", seed=0)
    assert [c.blocks for c in tabu.candidates] == [c.blocks for c in exact.candidates]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_remove=0), "1..7"),
        (dict(num_remove=8), "1..7"),
        (dict(num_remove=2, top_k=0), "top-k"),
        (dict(num_remove=6, protected=[0, 1, 2]), "protected"),
        (dict(num_remove=2, protected=[9]), "out of range"),
        (dict(num_remove=2, method="quantum"), "unknown solver"),
    ],
)
def test_bad_input_is_refused(kwargs, match):
    with pytest.raises(BlockCBOError, match=match):
        solve(hessian_like(8), **kwargs)


def test_bad_matrices_are_refused():
    with pytest.raises(BlockCBOError, match="square"):
        solve(np.ones((3, 4)), 1)
    Q = hessian_like(5)
    Q[1, 2] = np.nan
    with pytest.raises(BlockCBOError, match="NaN"):
        solve(Q, 2)
    asym = hessian_like(5)
    asym[0, 1] += 1.0
    with pytest.warns(UserWarning, match="symmetris"):
        solve(asym, 2)


def test_torch_brute_force_equals_enumeration():
    for n, m in [(9, 1), (9, 2), (12, 5), (16, 4)]:
        Q = hessian_like(n, seed=n * m)
        k = min(40, math.comb(n, m))
        got = solve(Q, m, top_k=k, method="torch")
        assert got.certified
        assert [c.blocks for c in got.candidates] == [b for _, b in brute_force(Q, m, k)]


def test_torch_brute_force_chunks_merge_and_survive_large_n():
    from hf_blockcbo.solvers.brute_torch import brute_force_topk

    Q = hessian_like(14, seed=2)
    small_chunks, _, complete = brute_force_topk(Q, 5, 30, chunk_states=14 * 14 * 3)
    assert complete
    expected = [b for _, b in brute_force(Q, 5, 30)]
    got = sorted((energy(Q, s), tuple(int(v) for v in s)) for s in small_chunks)
    assert [b for _, b in got] == expected
    big = hessian_like(70, seed=4)  # C(70, 35) overflows int64: the binomial table is clamped, ranks stay exact
    states, energies, _ = brute_force_topk(big, 3, 5)
    assert [tuple(s) for s in states] == [b for _, b in brute_force(big, 3, 5)]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), data=st.data())
def test_property_per_kind_counts_match_brute_force(seed, data):
    from hf_blockcbo.solvers import Constraints

    rng = np.random.default_rng(seed)
    n = int(rng.integers(6, 11))
    kinds = [str(k) for k in rng.choice(["attention", "moe", "mamba"], size=n)]
    m = data.draw(st.integers(2, n - 1))
    attention = kinds.count("attention")
    want = data.draw(st.integers(0, min(attention, m)))
    A = rng.normal(size=(2 * n, n))
    Q = A.T @ A
    cons = Constraints(per_kind={"attention": want}, kinds=kinds)
    expected = sorted(
        (energy(Q, s), s)
        for s in itertools.combinations(range(n), m)
        if sum(kinds[i] == "attention" for i in s) == want
    )[:10]
    if not expected:
        with pytest.raises(BlockCBOError):
            solve(Q, m, top_k=10, method="exact", constraints=cons)
        return
    for method in ("exact", "tabu"):
        got = solve(Q, m, top_k=10, method=method, constraints=cons, seed=seed).candidates
        np.testing.assert_allclose([c.energy for c in got], [e for e, _ in expected], rtol=1e-9)
        assert all(sum(kinds[i] == "attention" for i in c.blocks) == want for c in got)


def test_parameter_budget_is_honoured_or_refused():
    from hf_blockcbo.solvers import Constraints

    Q = hessian_like(12, seed=9)
    weights = list(range(1, 13))
    cons = Constraints(min_removed_parameters=30, block_parameters=weights)
    got = solve(Q, 4, top_k=6, method="exact", constraints=cons)
    expected = sorted(
        (energy(Q, s), s) for s in itertools.combinations(range(12), 4) if sum(weights[i] for i in s) >= 30
    )
    assert [c.blocks for c in got.candidates] == [b for _, b in expected[:6]]
    for method in ("tabu", "torch"):
        with pytest.raises(BlockCBOError, match="exact"):
            solve(Q, 4, top_k=6, method=method, constraints=cons)
    with pytest.raises(BlockCBOError, match="no configuration"):
        solve(
            Q,
            2,
            top_k=3,
            method="exact",
            constraints=Constraints(min_removed_parameters=100, block_parameters=weights),
        )


def test_infeasible_per_kind_counts_are_refused():
    from hf_blockcbo.solvers import Constraints, parse_per_kind

    kinds = ["attention", "moe"] * 4
    with pytest.raises(BlockCBOError, match="only 4"):
        solve(hessian_like(8), 5, constraints=Constraints(per_kind={"attention": 5}, kinds=kinds))
    with pytest.raises(BlockCBOError, match="no blocks of kind"):
        solve(hessian_like(8), 2, constraints=Constraints(per_kind={"mamba": 1}, kinds=kinds))
    with pytest.raises(BlockCBOError, match="cannot make"):
        solve(hessian_like(8), 2, constraints=Constraints(per_kind={"attention": 1, "moe": 2}, kinds=kinds))
    assert parse_per_kind("attention=2, moe=1") == {"attention": 2, "moe": 1}
    with pytest.raises(BlockCBOError, match="KIND=COUNT"):
        parse_per_kind("attention:2")


def test_exact_refuses_an_enumeration_beyond_the_time_limit():
    with pytest.raises(BlockCBOError, match="time limit"):
        solve(hessian_like(60, seed=1), 20, method="exact", time_limit=1.0)
    result = solve(hessian_like(60, seed=1), 20, method="tabu", time_limit=1.0, top_k=20)
    assert not result.certified and len(result.candidates) == 20


def test_node_bound_never_exceeds_any_completion():
    from hf_blockcbo.solvers.branch_bound import _node_bound, partner_table

    rng = np.random.default_rng(4)
    for trial in range(30):
        n = int(rng.integers(5, 10))
        A = rng.normal(size=(int(rng.integers(2, 12)), n)) * np.exp(rng.normal(size=n))
        Q = A.T @ A / A.shape[0]
        m = int(rng.integers(2, n))
        small = partner_table(Q, m)
        depth = int(rng.integers(0, m - 1))
        prefix = sorted(rng.choice(n - (m - depth), size=depth, replace=False).tolist()) if depth else []
        p = (prefix[-1] + 1) if prefix else 0
        r = m - depth
        if n - p < r:
            continue
        x = np.zeros(n)
        x[prefix] = 1
        g = np.diag(Q) + 2 * Q @ x
        bound = x @ Q @ x + _node_bound(g, small, p, n, r, np.empty(m))
        lowest = min(energy(Q, [*prefix, *rest]) for rest in itertools.combinations(range(p, n), r))
        assert bound <= lowest + 1e-9, (trial, bound, lowest)


def test_branch_and_bound_prunes_uses_every_thread_and_honours_the_time_limit():
    from hf_blockcbo.solvers.branch_bound import branch_and_bound_topk

    Q = hessian_like(26, seed=8)
    exact = solve(Q, 8, top_k=50, method="exact")
    for seeds in (None, np.array([c.energy for c in exact.candidates])):
        states, energies, certified, info = branch_and_bound_topk(Q, 8, 50, seed_energies=seeds, threads=2)
        assert certified and info["nodes_pruned"] > 0 and info["threads"] == 2
        assert sorted(map(tuple, states)) == sorted(c.blocks for c in exact.candidates)
        np.testing.assert_allclose(np.sort(energies), [c.energy for c in exact.candidates], rtol=1e-12)
    # stopped after the first chunk of prefixes: not certified, but every state below min(lower bound, K-th
    # energy) is in the list
    truth = solve(Q, 8, top_k=3000, method="exact").candidates
    for max_items in (2, 700, 1200):
        states, energies, certified, info = branch_and_bound_topk(Q, 8, 50, threads=2, max_items=max_items)
        assert not certified and info["work_items_done"] == max_items < info["work_items"]
        cut = min(info["lower_bound"], energies.max())
        assert truth[-1].energy > cut
        below = {c.blocks for c in truth if c.energy < cut - 1e-12}
        assert below <= set(map(tuple, states))
    assert below, "late in the search the proven bound admits states"
    result = solve(hessian_like(60, seed=1), 20, top_k=10, method="bnb", time_limit=0.0)
    assert not result.certified and result.lower_bound is not None


def test_branch_and_bound_certifies_large_hessian_like_instances_quickly():
    import time

    Q = hessian_like(80, seed=96)
    start = time.perf_counter()
    result = solve(Q, 16, top_k=100, method="bnb", time_limit=120)
    assert result.certified, "C(80, 16) = 2.9e16 states, certified by the node bound"
    assert time.perf_counter() - start < 60
    energies = [c.energy for c in result.candidates]
    assert energies == sorted(energies) and len(set(c.blocks for c in result.candidates)) == 100
    tabu = solve(Q, 16, top_k=100, method="tabu", seed=3)
    assert tabu.candidates[0].energy >= energies[0] - 1e-9, "nothing a heuristic finds lies below the certified list"
    assert tabu.candidates[-1].energy >= energies[-1] - 1e-9


def test_auto_enumerates_small_problems_and_certifies_larger_ones_by_branch_and_bound():
    small = solve(hessian_like(16, seed=2), 4, top_k=5)
    assert small.method == "exact" and small.certified
    large = solve(hessian_like(40, seed=52), 12, top_k=20)
    assert large.method == "bnb" and large.certified, "C(40, 12) = 5.6e9 states, certified"
    Q = hessian_like(40, seed=52)
    energies = [c.energy for c in large.candidates]
    assert energies[0] <= solve(Q, 12, top_k=1, method="tabu", seed=5).candidates[0].energy + 1e-12


def test_branch_and_bound_stops_inside_a_huge_subtree_at_the_time_limit():
    import time

    start = time.perf_counter()
    result = solve(hessian_like(80, seed=3200), 40, top_k=50, method="bnb", time_limit=1.0)
    assert time.perf_counter() - start < 4.0, "C(80, 40): the timer stops the compiled search mid-subtree"
    assert not result.certified and len(result.candidates) == 50 and result.lower_bound is not None


@pytest.mark.parametrize("swaps", [0, 1, 2, 3])
def test_the_neighbourhood_solver_is_the_brute_force_within_the_trust_region(swaps):
    from hf_blockcbo.solvers import Constraints
    from hf_blockcbo.solvers.neighbourhood import region_size, solve_near

    rng = np.random.default_rng(swaps)
    n, m, centre = 9, 4, [1, 3, 4, 7]
    a = rng.normal(size=(n, n))
    Q = a + a.T  # indefinite, as an extrapolated expansion can be
    kinds = ["attention", "mlp"] * 4 + ["attention"]
    cases = [((), None), ((3, 8), None), ((), Constraints(per_kind={"attention": 2}, kinds=kinds))]
    for protected, constraints in cases:
        states = [
            s
            for s in itertools.combinations(range(n), m)
            if len(set(s) - set(centre)) <= swaps
            and not set(s) & set(protected)
            and (constraints is None or constraints.admits(s))
        ]
        expected = sorted((energy(Q, s), s) for s in states)[:5]
        if not expected:  # 0 swaps of a centre that removes a protected block
            with pytest.raises(BlockCBOError, match="no state within"):
                solve_near(Q, centre, swaps=swaps, protected=protected, constraints=constraints)
            continue
        result = solve_near(Q, centre, swaps=swaps, top_k=5, protected=protected, constraints=constraints)
        assert [c.blocks for c in result.candidates] == [s for _, s in expected]
        assert [c.energy for c in result.candidates] == pytest.approx([e for e, _ in expected])
        assert result.certified and result.method == "neighbourhood"
    every = [s for s in itertools.combinations(range(n), m) if len(set(s) - set(centre)) <= swaps]
    assert region_size(n, m, swaps) == len(every)


def test_the_neighbourhood_solver_refuses_bad_input():
    from hf_blockcbo.solvers.neighbourhood import solve_near

    Q = np.eye(5)
    with pytest.raises(BlockCBOError, match="centre"):
        solve_near(Q, [], swaps=1)
    with pytest.raises(BlockCBOError, match="centre"):
        solve_near(Q, [2, 7], swaps=1)
    with pytest.raises(BlockCBOError, match="swaps"):
        solve_near(Q, [1, 2], swaps=-1)
    with pytest.raises(BlockCBOError, match="no state within 0 swaps"):
        solve_near(Q, [1, 2], swaps=0, protected=[2])
