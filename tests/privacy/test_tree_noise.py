"""Tree-aggregation and Gaussian noise: statistics, structure, restarts and replay.

The statistical tests use the coordinates of one noise vector as independent samples (fixed
seeds). ``std_matches`` is a two-sided test of the variance of zero-mean Gaussian samples at
4 standard errors; every test shows it accepts the true standard deviation and rejects 2/3 and
1.5 times it, so a wrong noise scale cannot pass.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fedsim.privacy.tree_noise import (
    TreeNoise,
    decomposition,
    efficient_node_variance,
    gaussian_noise,
    node_noise,
    prefix_noise,
    prefix_variance,
)

N = 60_000  # samples (coordinates) per statistical test
SIGMA = 1.7
SEED = 20240611


def std_matches(samples: torch.Tensor, std: float, z: float = 4.0) -> bool:
    """Do zero-mean samples have standard deviation ``std``? (mean of squares within z s.e.)"""
    n = samples.numel()
    ratio = float(samples.double().pow(2).mean()) / std**2
    return abs(ratio - 1.0) <= z * math.sqrt(2.0 / n)


def mean_is_zero(samples: torch.Tensor, std: float, z: float = 4.0) -> bool:
    return abs(float(samples.double().mean())) <= z * std / math.sqrt(samples.numel())


def assert_std(samples: torch.Tensor, std: float) -> None:
    assert mean_is_zero(samples, std)
    assert std_matches(samples, std), f"empirical std {float(samples.double().std()):.4f} != {std:.4f}"
    assert not std_matches(samples, std * 2 / 3)
    assert not std_matches(samples, std * 1.5)


def covariance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() * b.double()).mean())


def covariance_is(a: torch.Tensor, b: torch.Tensor, expected: float, var_a: float, var_b: float) -> bool:
    """Is the sample covariance of zero-mean pairs within 4 standard errors of ``expected``?"""
    se = math.sqrt((var_a * var_b + expected**2) / a.numel())
    return abs(covariance(a, b) - expected) <= 4 * se


# ---------------------------------------------------------------------------------------------
# structure


def test_decomposition_is_the_binary_counter_of_the_prefix() -> None:
    assert decomposition(0) == [(0, 1)]
    assert decomposition(5) == [(0, 4), (4, 6)]
    assert decomposition(6) == [(0, 4), (4, 6), (6, 7)]
    assert decomposition(7) == [(0, 8)]
    assert decomposition(12) == [(0, 8), (8, 12), (12, 13)]
    # restarts: dyadic relative to the segment start, never crossing a segment boundary
    assert decomposition(4, restart_every=5) == [(0, 4), (4, 5)]
    assert decomposition(5, restart_every=5) == [(5, 6)]
    assert decomposition(11, restart_every=5) == [(10, 12)]
    for t in range(40):
        nodes = decomposition(t, restart_every=6)
        assert nodes[0][0] == (t // 6) * 6 and nodes[-1][1] == t + 1
        assert all(b - a in (1, 2, 4) and (a - nodes[0][0]) % (b - a) == 0 for a, b in nodes)
        assert len(nodes) == bin(t % 6 + 1).count("1")


@pytest.mark.parametrize("estimator", ["vanilla", "efficient"])
@pytest.mark.parametrize("restart_every", [None, 5])
def test_online_noise_equals_the_pure_function_of_seed_and_round(estimator: str, restart_every: int | None) -> None:
    tree = TreeNoise(257, SIGMA, SEED, estimator=estimator, restart_every=restart_every)
    for t in range(21):
        online = tree.step(t)
        assert torch.equal(online, prefix_noise(SEED, t, 257, SIGMA, estimator=estimator, restart_every=restart_every))
        assert tree.nodes() == decomposition(t, restart_every)
    assert len(tree.state_dict()["values"]) <= math.log2(21) + 1  # O(log T) state


def test_node_noise_is_a_pure_function_of_seed_and_node() -> None:
    a = node_noise(SEED, (4, 6), 1000, SIGMA)
    assert torch.equal(a, node_noise(SEED, (4, 6), 1000, SIGMA))
    assert not torch.equal(a, node_noise(SEED + 1, (4, 6), 1000, SIGMA))
    assert not torch.equal(a, node_noise(SEED, (4, 5), 1000, SIGMA))
    assert not torch.equal(a, node_noise(SEED, (5, 6), 1000, SIGMA))
    assert torch.equal(a, node_noise(SEED, (4, 6), 1000, 1.0) * SIGMA)
    r = gaussian_noise(SEED, 3, 1000, SIGMA)
    assert torch.equal(r, gaussian_noise(SEED, 3, 1000, SIGMA))
    assert not torch.equal(r, gaussian_noise(SEED, 4, 1000, SIGMA))
    # the per-round stream and the tree stream are separated
    assert not torch.equal(gaussian_noise(SEED, 3, 1000, SIGMA), node_noise(SEED, (3, 4), 1000, SIGMA))


def test_replay_from_saved_state_gives_identical_noise() -> None:
    for estimator in ("vanilla", "efficient"):
        tree = TreeNoise(500, SIGMA, SEED, estimator=estimator, restart_every=6)
        for t in range(9):
            tree.step(t)
        saved = copy.deepcopy(tree.state_dict())
        first = [tree.step(t) for t in range(9, 14)]
        replay = TreeNoise(500, SIGMA, SEED, estimator=estimator, restart_every=6)
        replay.load_state_dict(saved)
        again = [replay.step(t) for t in range(9, 14)]
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
        assert "seed" not in saved  # the secret seed never goes into a state dict


def test_rounds_out_of_order_and_mismatched_state_are_refused() -> None:
    tree = TreeNoise(10, SIGMA, SEED)
    tree.step(0)
    with pytest.raises(ValueError, match="expects round 1, got 3"):
        tree.step(3)
    with pytest.raises(ValueError, match="estimator"):
        TreeNoise(10, SIGMA, SEED, estimator="efficient").load_state_dict(tree.state_dict())
    with pytest.raises(ValueError, match="restart_every"):
        TreeNoise(10, SIGMA, SEED, restart_every=4).load_state_dict(tree.state_dict())
    with pytest.raises(ValueError, match="estimator must be"):
        TreeNoise(10, SIGMA, SEED, estimator="honaker")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# statistics


def test_gaussian_noise_has_the_requested_std() -> None:
    assert_std(gaussian_noise(SEED, 0, N, SIGMA), SIGMA)
    # rounds are independent
    assert covariance_is(gaussian_noise(SEED, 0, N, SIGMA), gaussian_noise(SEED, 1, N, SIGMA), 0.0, SIGMA**2, SIGMA**2)


@pytest.mark.parametrize("round", [0, 2, 6, 10, 14])
def test_vanilla_prefix_variance_is_the_number_of_nodes(round: int) -> None:
    nodes = len(decomposition(round))
    assert prefix_variance(round) == nodes
    assert_std(prefix_noise(SEED, round, N, SIGMA), SIGMA * math.sqrt(nodes))


def test_vanilla_prefix_with_two_nodes_is_told_apart_from_one_node() -> None:
    three = prefix_noise(SEED, 2, N, SIGMA)  # [0,2) + [2,3)
    four = prefix_noise(SEED, 3, N, SIGMA)  # [0,4)
    assert std_matches(three, SIGMA * math.sqrt(2)) and not std_matches(three, SIGMA)
    assert std_matches(four, SIGMA) and not std_matches(four, SIGMA * math.sqrt(2))


def test_prefix_covariance_counts_shared_nodes() -> None:
    tree = TreeNoise(N, SIGMA, SEED)
    p = [tree.step(t) for t in range(8)]
    s2 = SIGMA**2

    def shared(t: int, u: int, expected_nodes: int) -> bool:
        nt, nu = len(decomposition(t)), len(decomposition(u))
        return covariance_is(p[t], p[u], expected_nodes * s2, nt * s2, nu * s2)

    # rounds 1 and 2 share [0,2); rounds 2 and 3 share nothing ([0,2)+[2,3) vs [0,4))
    assert shared(1, 2, 1) and not shared(1, 2, 0)
    assert shared(2, 3, 0) and not shared(2, 3, 1)
    # rounds 4, 5, 6 all contain [0,4); 5 and 6 also share [4,6)
    assert shared(4, 6, 1)
    assert shared(5, 6, 2) and not shared(5, 6, 1)


@pytest.mark.parametrize("round", [1, 6, 7, 12])
def test_efficient_estimator_variance_matches_honaker_and_is_lower(round: int) -> None:
    want = prefix_variance(round, estimator="efficient")
    vanilla = prefix_variance(round)
    assert want == pytest.approx(sum(efficient_node_variance((b - a).bit_length() - 1) for a, b in decomposition(round)))
    assert want < vanilla
    samples = prefix_noise(SEED, round, N, SIGMA, estimator="efficient")
    assert_std(samples, SIGMA * math.sqrt(want))
    assert not std_matches(samples, SIGMA * math.sqrt(vanilla))  # measurably lower
    assert std_matches(prefix_noise(SEED, round, N, SIGMA), SIGMA * math.sqrt(vanilla))


def test_efficient_node_variance_closed_form() -> None:
    # inverse-variance combination: v_h = 1 / (1 / 1 + 1 / (2 v_{h-1})), v_0 = 1
    v = 1.0
    for h in range(1, 12):
        v = 1.0 / (1.0 + 1.0 / (2.0 * v))
        assert efficient_node_variance(h) == pytest.approx(v)
    assert efficient_node_variance(0) == 1.0


def test_restart_resets_the_tree() -> None:
    with_restart = TreeNoise(N, SIGMA, SEED, restart_every=4)
    without = TreeNoise(N, SIGMA, SEED)
    a = [with_restart.step(t) for t in range(6)]
    b = [without.step(t) for t in range(6)]
    assert torch.equal(a[3], b[3])  # identical within the first segment
    # round 4 starts a new tree: one leaf, independent of the first segment
    assert with_restart.is_restart(4) and not without.is_restart(4)
    assert torch.equal(a[4], node_noise(SEED, (4, 5), N, SIGMA))
    assert_std(a[4], SIGMA)
    assert_std(b[4], SIGMA * math.sqrt(2))  # [0,4) + [4,5)
    s2 = SIGMA**2
    assert covariance_is(a[3], a[4], 0.0, s2, s2)
    assert covariance_is(b[3], b[4], s2, s2, 2 * s2) and not covariance_is(b[3], b[4], 0.0, s2, 2 * s2)
    assert prefix_variance(5, restart_every=4) == 1  # [4,6)
