"""Exact DP-FTRL tree-aggregation sensitivity: brute force, prefixes, golden values."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest

from fedsim.privacy.sensitivity import (
    TreePrefixSensitivity,
    brute_force_tree_sensitivity_sq,
    effective_max_participations,
    exact_gaussian_weight_sum,
    max_gaussian_participations,
    max_tree_sensitivity_sq,
    tree_nodes,
    tree_sensitivity_sq_prefixes,
)


def _patterns(num_rounds, k, b):
    """Every participation pattern allowed by (k, b), by recursion (independent of the bitmask code)."""

    def rec(start, pts):
        yield pts
        if len(pts) == k:
            return
        for p in range(start, num_rounds):
            yield from rec(p + b + 1, pts + (p,))

    yield from rec(0, ())


def _slow_sensitivity(num_rounds, k, b, restart_every=None):
    nodes = tree_nodes(num_rounds, restart_every)
    best = 0
    for pts in _patterns(num_rounds, k, b):
        s = 0
        for lo, hi in nodes:
            c = sum(1 for p in pts if lo <= p < hi)
            s += c * c
        best = max(best, s)
    return best


def test_gboard_golden_value():
    # Gboard es-ES DP-FTRL: T=2000, k=6, b=313 -> S=79, rho = 79 / (2 * 7**2) = 0.806
    s = max_tree_sensitivity_sq(2000, 6, 313)
    assert s == 79
    assert round(s / (2 * 7**2), 3) == 0.806


def test_tree_nodes_rule():
    # T=5: a complete tree over [0, 4) plus the leaf [4, 5)
    assert sorted(tree_nodes(5)) == sorted(
        [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (0, 2), (2, 4), (0, 4)]
    )
    # restarts every 3: segments [0, 3) and [3, 5), each with its own forest
    assert sorted(tree_nodes(5, 3)) == sorted(
        [(0, 1), (1, 2), (2, 3), (0, 2), (3, 4), (4, 5), (3, 5)]
    )
    assert tree_nodes(0) == []
    # every node is a dyadic interval inside its segment
    for lo, hi in tree_nodes(37, 10):
        width = hi - lo
        assert width & (width - 1) == 0
        assert (lo % 10) % width == 0 and lo // 10 == (hi - 1) // 10


def test_brute_force_matches_recursive_enumeration():
    for num_rounds in range(1, 10):
        for b in range(0, 4):
            for k in (1, 2, 3, num_rounds):
                for restart in (None, 1, 3):
                    assert brute_force_tree_sensitivity_sq(num_rounds, k, b, restart) == (
                        _slow_sensitivity(num_rounds, k, b, restart)
                    )


@pytest.mark.parametrize("num_rounds", range(1, 17))
def test_fast_equals_brute_force_all_k_b(num_rounds):
    restarts = [None, *range(1, num_rounds + 1)]
    for b in range(0, num_rounds + 1):
        for k in range(1, num_rounds + 2):
            for restart in restarts:
                expected = brute_force_tree_sensitivity_sq(num_rounds, k, b, restart)
                got = max_tree_sensitivity_sq(num_rounds, k, b, restart)
                assert got == expected, (num_rounds, k, b, restart)


@pytest.mark.parametrize("restart", [None, 1, 2, 3, 5, 8, 16])
def test_prefixes_equal_brute_force(restart):
    for b in range(0, 17):
        for k in range(1, 17):
            prefixes = TreePrefixSensitivity(k, b, restart).prefixes(16)
            expected = [brute_force_tree_sensitivity_sq(n, k, b, restart) for n in range(1, 17)]
            assert prefixes == expected, (k, b, restart)


def test_larger_trees_against_enumeration():
    rng = random.Random(1234)
    for _ in range(25):
        num_rounds = rng.randint(17, 44)
        b = rng.randint(3, 12)
        k = rng.randint(1, 4)
        restart = rng.choice([None, None, rng.randint(1, num_rounds)])
        assert max_tree_sensitivity_sq(num_rounds, k, b, restart) == _slow_sensitivity(
            num_rounds, k, b, restart
        ), (num_rounds, k, b, restart)


@pytest.mark.parametrize(
    "k,b,restart",
    [(6, 313, None), (6, 313, 500), (3, 100, 256), (20, 10, None), (150, 0, None), (4, 0, 7)],
)
def test_prefixes_equal_fresh_computations(k, b, restart):
    num_rounds = 2000
    prefixes = tree_sensitivity_sq_prefixes(num_rounds, k, b, restart)
    assert len(prefixes) == num_rounds
    rng = random.Random(k * 7919 + b)
    checks = {1, 2, 3, b + 1, b + 2, 2 * b + 3, 512, 1023, 1024, 1025, 1999, 2000}
    checks |= {rng.randint(1, num_rounds) for _ in range(15)}
    for n in sorted(c for c in checks if 1 <= c <= num_rounds):
        assert prefixes[n - 1] == max_tree_sensitivity_sq(n, k, b, restart), n
    # non-decreasing in the number of rounds
    assert all(x <= y for x, y in zip(prefixes, prefixes[1:], strict=False))


def test_prefix_object_extends_on_demand():
    pre = TreePrefixSensitivity(6, 313)
    values = [pre(n) for n in range(0, 700)]
    assert values[0] == 0
    assert pre(2000) == 79
    assert values[1:] == tree_sensitivity_sq_prefixes(699, 6, 313)
    with pytest.raises(ValueError):
        pre(-1)


def test_full_participation_is_sum_of_squared_node_sizes():
    # b = 0 and k = T: every round contributes, so S = sum over nodes of size**2
    for num_rounds, restart in [(2000, None), (100, 7), (37, None), (64, 64)]:
        expected = sum((hi - lo) ** 2 for lo, hi in tree_nodes(num_rounds, restart))
        assert max_tree_sensitivity_sq(num_rounds, num_rounds, 0, restart) == expected


def test_single_participation_is_max_depth():
    # k = 1: the deepest leaf's path, i.e. floor(log2(segment)) + 1
    assert max_tree_sensitivity_sq(2000, 1, 0) == 11
    assert max_tree_sensitivity_sq(2000, 1, 5, 100) == 7
    assert max_tree_sensitivity_sq(1, 1, 0) == 1


def test_restart_every_round_is_plain_gaussian_count():
    # one leaf per tree: S is the number of contributions
    for n, k, b in [(2000, 6, 313), (50, 100, 0), (10, 3, 2)]:
        assert max_tree_sensitivity_sq(n, k, b, 1) == max_gaussian_participations(n, k, b)


def test_huge_min_separation_and_infeasible_k():
    assert max_tree_sensitivity_sq(100, 5, 10**6) == max_tree_sensitivity_sq(100, 1, 0)
    # k beyond ceil(T / (b + 1)) changes nothing
    assert max_tree_sensitivity_sq(2000, 100, 313) == max_tree_sensitivity_sq(2000, 7, 313)
    assert max_tree_sensitivity_sq(0, 3, 1) == 0


def test_effective_max_participations_warns():
    with pytest.warns(UserWarning, match=r"effective max_participations=7"):
        assert effective_max_participations(2000, 10, 313, warn=True) == 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert effective_max_participations(2000, 6, 313, warn=True) == 6
        assert effective_max_participations(2000, 10, 313) == 7


def test_max_gaussian_participations():
    assert max_gaussian_participations(10, None, 0) == 10
    assert max_gaussian_participations(10, None, 1) == 5
    assert max_gaussian_participations(11, None, 1) == 6
    assert max_gaussian_participations(10, 3, 0) == 3
    assert max_gaussian_participations(0, 3, 0) == 0


def test_exact_weighted_gaussian_pattern():
    rng = np.random.default_rng(0)
    for _ in range(40):
        n = int(rng.integers(1, 13))
        b = int(rng.integers(0, 4))
        k = int(rng.integers(1, 5))
        w = rng.random(n)
        best = max(sum(w[p] for p in pts) for pts in _patterns(n, k, b))
        assert exact_gaussian_weight_sum(w, k, b) == pytest.approx(best)


@pytest.mark.parametrize(
    "args",
    [(-1, 1, 0), (10, 0, 0), (10, 1, -1), (10, 1, 0, 0), (10.5, 1, 0), (10, 1, 0, -3)],
)
def test_bad_arguments(args):
    with pytest.raises((ValueError, TypeError)):
        max_tree_sensitivity_sq(*args)


def test_brute_force_limit():
    with pytest.raises(ValueError, match="num_rounds <= 20"):
        brute_force_tree_sensitivity_sq(21, 1, 0)
