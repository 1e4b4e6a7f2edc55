"""One contract suite, run against every registered strategy (and the worked custom example)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.engine import run_scenario
from fedsim.registry import Registry
from fedsim.scenario import scenario_from_dict
from fedsim.strategy import STRATEGIES, Strategy
from fedsim.types import TrainConfig, UpdateBatch

from ..conftest import strategy_context, tiny_scenario

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "scripts" / "fedavgm.py") + ":FedAvgM"
#: ``FEDSIM_STRATEGY=path/file.py:Class`` (or ``pkg.mod:Class``, comma-separated for several)
#: runs the suite on those strategies only: what ``fedsim check-strategy SPEC`` does.
NAMES = [n for n in os.environ.get("FEDSIM_STRATEGY", "").split(",") if n] or [*STRATEGIES.names(), EXAMPLE]
P = 50


def _make(name: str) -> Strategy:
    cls = STRATEGIES.get(name)
    strategy = cls()
    strategy.setup(strategy_context(P, rounds=8, devices=40, per_round=10, seed=3))
    return strategy


def _batch(strategy: Strategy, n: int, seed: int) -> UpdateBatch:
    gen = torch.Generator().manual_seed(seed)
    deltas = torch.randn(n, P, generator=gen) * 0.1
    clip = strategy.configure_client(round=0, base=strategy.ctx.base_train_config).clip_norm
    if clip is not None:
        norms = deltas.norm(dim=1, keepdim=True)
        deltas = deltas * torch.clamp(clip / norms, max=1.0)
    weights = torch.arange(1, n + 1, dtype=torch.float32) if strategy.weighting == "examples" else torch.ones(n)
    return UpdateBatch(
        delta_sum=weights @ deltas,
        weight_sum=float(weights.sum()),
        num_updates=n,
        num_examples=int(torch.arange(1, n + 1).sum()),
        deltas=deltas if strategy.needs_individual_updates else None,
        weights=weights if strategy.needs_individual_updates else None,
    )


@pytest.mark.parametrize("name", NAMES)
def test_constructible_with_defaults_and_declares_contract(name: str) -> None:
    strategy = _make(name)
    assert isinstance(strategy, Strategy)
    assert strategy.weighting in ("examples", "uniform")
    assert isinstance(strategy.needs_individual_updates, bool)


@pytest.mark.parametrize("name", NAMES)
def test_select_returns_sorted_unique_subset_of_eligible(name: str) -> None:
    strategy = _make(name)
    eligible = np.array([1, 4, 5, 7, 9, 11, 12, 20, 21, 22, 30, 31, 39], dtype=np.int64)
    a = strategy.select(round=0, eligible=eligible, rng=np.random.default_rng(0))
    b = strategy.select(round=0, eligible=eligible, rng=np.random.default_rng(0))
    assert np.array_equal(a, b)
    assert np.all(np.isin(a, eligible))
    assert np.array_equal(a, np.unique(a))
    assert len(a) <= len(eligible)
    empty = strategy.select(round=0, eligible=np.empty(0, np.int64), rng=np.random.default_rng(0))
    assert len(empty) == 0


@pytest.mark.parametrize("name", NAMES)
def test_configure_client_keeps_round_and_positive_clip(name: str) -> None:
    strategy = _make(name)
    base = TrainConfig(round=3, lr=0.1, local_epochs=1, batch_size=8)
    cfg = strategy.configure_client(round=3, base=base)
    assert cfg.round == 3
    assert cfg.clip_norm is None or cfg.clip_norm > 0


@pytest.mark.parametrize("name", NAMES)
def test_aggregate_shape_finite_and_empty_round(name: str) -> None:
    strategy = _make(name)
    params = torch.zeros(P)
    new = strategy.aggregate(round=0, params=params, batch=_batch(strategy, 10, 0))
    assert new.shape == (P,) and new.dtype == torch.float32
    assert torch.isfinite(new).all()
    assert not torch.equal(new, params)
    empty = UpdateBatch(delta_sum=torch.zeros(P), weight_sum=0.0, num_updates=0, num_examples=0)
    after_empty = strategy.aggregate(round=1, params=new, batch=empty)
    assert after_empty.shape == (P,) and torch.isfinite(after_empty).all()


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trip_replays_identically(name: str) -> None:
    a = _make(name)
    params = torch.zeros(P)
    params = a.aggregate(round=0, params=params, batch=_batch(a, 10, 0))
    state = copy.deepcopy(a.state_dict())
    b = _make(name)
    b.load_state_dict(state)
    batch = _batch(a, 10, 1)
    out_a = a.aggregate(round=1, params=params, batch=batch)
    out_b = b.aggregate(round=1, params=params, batch=batch)
    assert torch.equal(out_a, out_b)


@pytest.mark.parametrize("name", NAMES)
def test_runs_end_to_end_in_engine(name: str) -> None:
    raw = tiny_scenario("contract", rounds=3, per_round=8, devices=40, strategy={"name": name})
    result = run_scenario(scenario_from_dict(raw))
    assert len(result.metrics) == 3
    assert all(m["clients"] > 0 for m in (result.diagnostics or result.metrics))
    assert torch.isfinite(result.params).all()
    if STRATEGIES.get(name)().privacy_event(round=0) is not None:
        assert result.metrics[-1]["rho"] is not None and result.metrics[-1]["rho"] > 0


def test_registry_unknown_name_lists_known() -> None:
    with pytest.raises(KeyError, match="known: .*fedavg"):
        STRATEGIES.get("no-such-strategy")
    reg: Registry[int] = Registry("thing")
    reg.register("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", 2)
