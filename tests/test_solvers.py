import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_blockcbo.errors import BlockCBOError
from hf_blockcbo.solvers import energy, solve


def hessian_like(n, m=None, seed=0):
    """PSD instance shaped like H = AᵀA/m: varying diagonal, correlated neighbours, mixed-sign off-diagonals."""
    rng = np.random.default_rng(seed)
    m = m or 4 * n
    scale = np.exp(rng.normal(0, 1, n))
    A = rng.normal(size=(m, n)) * scale
    A[:, 1:] += 0.6 * A[:, :-1]
    return A.T @ A / m


def brute_force(Q, M, K, protected=()):
    rows = []
    for combo in itertools.combinations([i for i in range(len(Q)) if i not in protected], M):
        rows.append((energy(Q, combo), combo))
    rows.sort()
    return rows[:K]


@pytest.mark.parametrize("method", ["exact", "tabu"])
@pytest.mark.parametrize("n,m", [(10, 1), (10, 3), (12, 6), (14, 11)])
def test_top_k_equals_brute_force(method, n, m):
    Q = hessian_like(n, seed=n + m)
    k = min(25, math.comb(n, m))
    result = solve(Q, m, top_k=k, method=method, seed=1)
    expected = brute_force(Q, m, k)
    assert [c.blocks for c in result.candidates] == [b for _, b in expected]
    np.testing.assert_allclose([c.energy for c in result.candidates], [e for e, _ in expected], rtol=1e-12)
    assert [c.rank for c in result.candidates] == list(range(k))
    assert result.certified == (method == "exact")


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
    for method in ("exact", "tabu"):
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
