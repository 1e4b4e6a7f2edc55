"""Mechanism objects, the noise source interface and DP-FTRL's choice of mechanism."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from fedsim.optim import ServerOptimizer
from fedsim.privacy.events import GaussianEvent, SampledGaussianEvent, TreeAggregationEvent
from fedsim.privacy.mechanisms import (
    MECHANISMS,
    GaussianSumMechanism,
    Mechanism,
    TreeAggregationMechanism,
)
from fedsim.privacy.noise import TAG_ROUND, TAG_TREE, NoiseKey, NoiseSource
from fedsim.privacy.tree_noise import prefix_noise
from fedsim.scenario import load_scenario, parse_override
from strategies.dp_ftrl import DPFTRL

from ..conftest import SCENARIOS

P = 64


def test_noise_source_is_a_pure_function_of_key_and_words() -> None:
    source = NoiseSource(NoiseKey.from_seed(1234))
    a = source.normal((TAG_ROUND, 3), P)
    assert a.dtype == torch.float32 and a.shape == (P,)
    assert torch.equal(a, NoiseSource.from_seed(1234).normal((TAG_ROUND, 3), P))
    assert not torch.equal(a, source.normal((TAG_ROUND, 4), P))
    assert not torch.equal(a, source.normal((TAG_TREE, 3, 4), P))
    assert not torch.equal(a, NoiseSource.from_seed(1235).normal((TAG_ROUND, 3), P))
    # the expansion: the cryptographic sampler over (key, words)
    from fedsim.privacy.csprng import standard_normal

    assert torch.equal(a, standard_normal(NoiseKey.from_seed(1234), (TAG_ROUND, 3), P))


def test_noise_key_never_prints_and_saves_owner_only(tmp_path: Path) -> None:
    key = NoiseKey.generate()
    assert "secret" in repr(key) and str(key) == repr(key)
    assert key._material.hex()[:12] not in repr(key)
    path = tmp_path / "noise.key"
    key.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert NoiseKey.load(path) == key
    assert NoiseKey.generate() != key


def test_registry_holds_the_built_in_mechanisms() -> None:
    assert {"gaussian", "tree"} <= set(MECHANISMS.names())
    assert MECHANISMS.get("gaussian") is GaussianSumMechanism
    assert MECHANISMS.get("tree") is TreeAggregationMechanism
    assert all(issubclass(MECHANISMS.get(n), Mechanism) for n in MECHANISMS.names())


def test_gaussian_release_and_events() -> None:
    mech = GaussianSumMechanism(noise_multiplier=2.0, clip_norm=0.5, max_participations=3)
    source = NoiseSource.from_seed(9)
    mech.setup(num_params=P, num_rounds=10, source=source)
    x = torch.linspace(-1, 1, P)
    torch.testing.assert_close(mech.release(4, x), x + source.normal((TAG_ROUND, 4), P))
    assert mech.privacy_event(0) == GaussianEvent(2.0, 3, 0)
    sampled = GaussianSumMechanism(noise_multiplier=2.0, clip_norm=0.5, sampling_rate=0.1)
    assert sampled.privacy_event(0) == SampledGaussianEvent(2.0, 0.1)


@pytest.mark.parametrize("estimator", ["vanilla", "efficient"])
def test_tree_increments_sum_to_the_noisy_prefix(estimator: str) -> None:
    mech = TreeAggregationMechanism(noise_multiplier=1.5, clip_norm=2.0, max_participations=2, estimator=estimator, restart_every=5)
    source = NoiseSource.from_seed(11)
    mech.setup(num_params=P, num_rounds=12, source=source)
    gen = torch.Generator().manual_seed(0)
    total, exact = torch.zeros(P), torch.zeros(P)
    for r in range(12):
        if r % 5 == 0:
            total.zero_()
            exact.zero_()
        x = torch.randn(P, generator=gen)
        exact += x
        total += mech.release(r, x)
        want = exact + prefix_noise(source, r, P, 3.0, estimator=estimator, restart_every=5)
        torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-4)
    assert mech.privacy_event(0) == TreeAggregationEvent(1.5, 2, 0, 5)
    assert mech.restarts_at(10) and not mech.restarts_at(11)


def test_tree_state_round_trip_replays_bit_for_bit() -> None:
    def make() -> TreeAggregationMechanism:
        m = TreeAggregationMechanism(noise_multiplier=1.0, clip_norm=1.0)
        m.setup(num_params=P, num_rounds=8, source=NoiseSource.from_seed(3))
        return m

    a = make()
    x = torch.ones(P)
    for r in range(3):
        a.release(r, x)
    saved = a.state_dict()
    first = [a.release(r, x) for r in range(3, 6)]
    b = make()
    b.load_state_dict(saved)
    assert all(torch.equal(b.release(r, x), want) for r, want in zip(range(3, 6), first, strict=True))
    with pytest.raises(ValueError, match="expects round 6, got 2"):
        b.release(2, x)


def test_mechanism_needs_a_noise_source() -> None:
    mech = GaussianSumMechanism(noise_multiplier=1.0, clip_norm=1.0)
    with pytest.raises(RuntimeError, match="setup"):
        mech.release(0, torch.zeros(P))
    with pytest.raises(TypeError, match="NoiseSource"):
        mech.setup(num_params=P, num_rounds=1, source=1234)  # type: ignore[arg-type]


def test_server_optimizer_is_heavy_ball_momentum() -> None:
    opt = ServerOptimizer(lr=2.0, momentum=0.5)
    u0, u1 = torch.full((3,), 1.0), torch.full((3,), 3.0)
    p1 = opt.step(torch.zeros(3), u0)
    p2 = opt.step(p1, u1)
    torch.testing.assert_close(p2, 2.0 * u0 + 2.0 * (0.5 * u0 + u1))
    plain = ServerOptimizer(lr=1.0)
    assert torch.equal(plain.step(torch.zeros(3), u1), u1) and plain.state_dict() == {"buffer": None}
    with pytest.raises(ValueError, match="^momentum must be a number in \\[0, 1\\)"):
        ServerOptimizer(momentum=1.0)


def test_dp_ftrl_takes_a_mechanism_by_name() -> None:
    assert isinstance(DPFTRL().mechanism, TreeAggregationMechanism)
    assert isinstance(DPFTRL(mechanism="tree").mechanism, TreeAggregationMechanism)
    with pytest.raises(ValueError, match="^mechanism must be one of .*'gaussian'.*'tree'"):
        DPFTRL(mechanism="laplace")
    with pytest.raises(ValueError, match="^estimator does not apply to mechanism = 'gaussian'"):
        DPFTRL(mechanism="gaussian", estimator="vanilla")
    sc = load_scenario(SCENARIOS / "dp_ftrl.toml", [parse_override('strategy.mechanism="tree"')])
    assert sc.strategy.params["mechanism"] == "tree"
    from fedsim.errors import ScenarioError

    with pytest.raises(ScenarioError, match="mechanism must be one of .*'gaussian'.*'tree'"):
        load_scenario(SCENARIOS / "dp_ftrl.toml", [parse_override('strategy.mechanism="nope"')])
