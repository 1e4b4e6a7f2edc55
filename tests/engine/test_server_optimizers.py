"""Adaptive server optimizers (Reddi et al. 2021): hand-worked reference steps, the strategies
that use them (FedAvg, DP-FedAvg, DP-FTRL as post-processing of the mechanism's release), the
state they checkpoint, and one-line errors for parameters out of range or that do not apply."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from fedsim.errors import ScenarioError
from fedsim.models import get_flat
from fedsim.optim import ServerOptimizer
from fedsim.scenario import scenario_from_dict
from fedsim.types import UpdateBatch
from strategies.dp_fedavg import DPFedAvg
from strategies.dp_ftrl import DPFTRL
from strategies.fedavg import FedAvg

from ..conftest import run_cli, strategy_context, tiny_scenario

# ----------------------------------------------------------------------------------------------
# the reference: Algorithm 2 of Reddi et al., written out per coordinate in float64


def reference(kind: str, x: list[float], updates: list[list[float]], *, lr: float, b1: float, b2: float, tau: float) -> list[float]:
    """``x`` after one FedAdam / FedYogi / FedAdagrad step per update (m_-1 = 0, v_-1 = tau**2)."""
    x = list(x)
    m = [0.0] * len(x)
    v = [tau * tau] * len(x)
    for u in updates:
        for i, ui in enumerate(u):
            m[i] = b1 * m[i] + (1 - b1) * ui
            if kind == "adam":
                v[i] = b2 * v[i] + (1 - b2) * ui * ui
            elif kind == "yogi":
                diff = v[i] - ui * ui
                sign = (diff > 0) - (diff < 0)
                v[i] = v[i] - (1 - b2) * ui * ui * sign
            else:
                v[i] = v[i] + ui * ui
            x[i] = x[i] + lr * m[i] / (math.sqrt(v[i]) + tau)
    return x


def tiny_model() -> nn.Module:
    return nn.Linear(3, 2)  # 8 parameters


def fixed_batch(values: torch.Tensor, weight: float = 4.0) -> UpdateBatch:
    return UpdateBatch(delta_sum=values * weight, weight_sum=weight, num_updates=2, num_examples=int(weight))


# updates whose squares cross v in both directions, so Yogi's sign term takes both values
UPDATES = [
    [0.5, -0.2, 0.0, 1.5, -0.01, 0.3, 0.02, -0.7],
    [0.01, -0.3, 0.2, -1.0, 0.4, 0.0, -0.05, 0.6],
    [-0.6, 0.05, -0.2, 0.1, 0.3, 0.25, 0.9, -0.02],
]


@pytest.mark.parametrize("kind", ["adam", "yogi", "adagrad"])
def test_fedavg_adaptive_step_matches_the_hand_written_reference(kind: str) -> None:
    model = tiny_model()
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.linspace(-0.5, 0.5, p.numel()).view_as(p) * (i + 1))
    x0 = get_flat(model)
    lr, b1, b2, tau = 0.05, 0.8, 0.95, 0.01
    kwargs = {"server_optimizer": kind, "server_lr": lr, "beta1": b1, "tau": tau}
    if kind != "adagrad":
        kwargs["beta2"] = b2
    strategy = FedAvg(**kwargs)
    strategy.setup(strategy_context(num_params=x0.numel()))
    params = x0
    for u in UPDATES:
        params = strategy.aggregate(round=0, params=params, batch=fixed_batch(torch.tensor(u)))
    expected = reference(kind, x0.tolist(), UPDATES, lr=lr, b1=b1, b2=b2, tau=tau)
    assert torch.allclose(params.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    if kind == "yogi":  # the sign really took both values: Yogi differs from Adam here
        adam = reference("adam", x0.tolist(), UPDATES, lr=lr, b1=b1, b2=b2, tau=tau)
        assert max(abs(a - b) for a, b in zip(adam, expected, strict=True)) > 1e-3


def test_defaults_are_the_papers_and_sgd_is_unchanged() -> None:
    adam = ServerOptimizer(optimizer="adam")
    assert (adam.beta1, adam.beta2, adam.tau) == (0.9, 0.99, 1e-3)
    # the first Adam step from rest: m = 0.1 u, v = 0.99 tau^2 + 0.01 u^2
    u = torch.tensor([2.0, -0.5])
    step = adam.step(torch.zeros(2), u)
    v = 0.99 * 1e-6 + 0.01 * u.double() ** 2
    assert torch.allclose(step.double(), 0.1 * u.double() / (v.sqrt() + 1e-3), rtol=1e-6)
    # SGD and heavy-ball momentum keep their update rule
    sgd = ServerOptimizer(lr=2.0, momentum=0.5)
    a = sgd.step(torch.zeros(2), torch.ones(2))
    b = sgd.step(a, torch.ones(2))
    assert a.tolist() == [2.0, 2.0] and b.tolist() == [5.0, 5.0]
    # a round without accepted updates leaves FedAvg's model and optimizer alone
    fed = FedAvg(server_optimizer="adam")
    fed.setup(strategy_context(num_params=2))
    empty = UpdateBatch(delta_sum=torch.zeros(2), weight_sum=0.0, num_updates=0, num_examples=0)
    assert torch.equal(fed.aggregate(round=0, params=torch.ones(2), batch=empty), torch.ones(2))
    assert fed.optimizer.m is None


@pytest.mark.parametrize("kind", ["adam", "yogi", "adagrad"])
@pytest.mark.parametrize("cls", [DPFedAvg, DPFTRL])
def test_dp_strategy_steps_with_the_mechanisms_release_only(cls: type, kind: str) -> None:
    """The adaptive step takes the mechanism's noisy release over the fixed denominator, nothing
    else: the same step computed from a twin mechanism's releases (same public test key) by hand."""
    p = 12
    extra = {"max_participations": 4} if cls is DPFTRL else {}
    strategy = cls(noise_multiplier=0.7, clip_norm=1.0, server_optimizer=kind, server_lr=0.1, **extra)
    twin = cls(noise_multiplier=0.7, clip_norm=1.0, **extra)
    context = strategy_context(num_params=p, per_round=5)
    strategy.setup(context)
    twin.setup(context)
    gen = torch.Generator().manual_seed(3)
    params = torch.zeros(p)
    updates = []
    for r in range(4):
        deltas = torch.randn(5, p, generator=gen) * 0.1
        b = UpdateBatch(delta_sum=deltas.sum(0), weight_sum=5.0, num_updates=5, num_examples=5)
        params = strategy.aggregate(round=r, params=params, batch=b)
        updates.append((twin.mechanism.release(r, b.delta_sum) / twin.denominator).tolist())
    expected = reference(kind, [0.0] * p, updates, lr=0.1, b1=0.9, b2=0.99, tau=1e-3)
    assert torch.allclose(params.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert strategy.momentum == 0.0 and strategy.optimizer.optimizer == kind


@pytest.mark.parametrize("kind", ["sgd", "adam", "yogi", "adagrad"])
def test_state_round_trips_and_the_next_step_is_identical(kind: str) -> None:
    kwargs = {"momentum": 0.5} if kind == "sgd" else {"server_optimizer": kind}
    a = DPFTRL(noise_multiplier=1.0, max_participations=3, **kwargs)
    b = DPFTRL(noise_multiplier=1.0, max_participations=3, **kwargs)
    context = strategy_context(num_params=6, per_round=4)
    a.setup(context)
    b.setup(context)
    gen = torch.Generator().manual_seed(9)
    params = torch.zeros(6)
    for r in range(3):
        params = a.aggregate(round=r, params=params, batch=fixed_batch(torch.randn(6, generator=gen)))
    state = copy.deepcopy(a.state_dict())
    assert set(state["optimizer"]) == ({"buffer"} if kind == "sgd" else {"m", "v"})
    b.load_state_dict(state)
    # b's mechanism is at round 3 too: the next release and step are the same, bit for bit
    batch = fixed_batch(torch.randn(6, generator=gen))
    assert torch.equal(a.aggregate(round=3, params=params, batch=batch), b.aggregate(round=3, params=params, batch=batch))
    with pytest.raises(ValueError, match="server-optimizer = 'adam' keeps"):
        ServerOptimizer(optimizer="adam").load_state_dict({"buffer": None})


def test_restart_starts_the_adaptive_state_afresh() -> None:
    s = DPFTRL(noise_multiplier=1.0, max_participations=2, restart_every=2, server_optimizer="adam", estimator="vanilla")
    s.setup(strategy_context(num_params=4, per_round=2))
    params = torch.zeros(4)
    for r in range(2):
        params = s.aggregate(round=r, params=params, batch=fixed_batch(torch.ones(4)))
    assert s.optimizer.m is not None and s.optimizer.m.abs().sum() > 0
    s.aggregate(round=2, params=params, batch=fixed_batch(torch.ones(4)))  # round 2 restarts the tree
    release = s.optimizer.m / (1 - s.optimizer.beta1)  # one step from rest: m = (1 - beta1) u
    assert torch.allclose(s.optimizer.v, 0.99 * 1e-6 + 0.01 * release**2, rtol=1e-5)


@pytest.mark.parametrize(
    ("strategy", "needle"),
    [
        ({"name": "fedavg", "server-optimizer": "adamw"}, "server-optimizer: must be one of 'sgd', 'adam', 'yogi', 'adagrad', got 'adamw'"),
        ({"name": "fedavg", "server-optimizer": "adam", "beta1": 1.0}, "beta1 must be a number in [0, 1), got 1.0"),
        ({"name": "dp-fedavg", "server-optimizer": "yogi", "beta2": -0.1}, "beta2 must be a number in [0, 1), got -0.1"),
        ({"name": "dp-ftrl", "server-optimizer": "adam", "tau": 0.0}, "tau must be > 0, got 0.0"),
        ({"name": "dp-ftrl", "server-optimizer": "adam", "momentum": 0.9}, "momentum applies to server-optimizer = 'sgd'"),
        ({"name": "fedavg", "beta1": 0.9}, "beta1 applies to the adaptive server optimizers"),
        ({"name": "dp-fedavg", "server-optimizer": "adagrad", "beta2": 0.9}, "beta2 does not apply to server-optimizer = 'adagrad'"),
        ({"name": "fedavg", "server-optimizer": "adam", "server-lr": 0}, "server-lr must be > 0, got 0"),
    ],
)
def test_bad_optimizer_parameters_are_one_line_scenario_errors(strategy: dict, needle: str) -> None:
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict(tiny_scenario(strategy=strategy))
    assert needle in str(info.value) and str(info.value).startswith("strategy")
    assert "\n" not in str(info.value)


def test_dp_ftrl_keeps_its_momentum_default_only_for_sgd() -> None:
    assert DPFTRL(noise_multiplier=1.0).momentum == 0.9
    assert DPFTRL(noise_multiplier=1.0, server_optimizer="yogi").momentum == 0.0
    assert DPFedAvg(noise_multiplier=1.0).momentum == 0.0


def test_cli_bad_optimizer_exits_2_with_one_line(tmp_path) -> None:
    proc = run_cli("run", "scenarios/quickstart.toml", "--set", "strategy.server-optimizer=\"adam\"",
                   "--set", "strategy.momentum=0.5", "--out", str(tmp_path / "run"), "--quiet")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: --set: strategy: momentum applies to")
    assert not (tmp_path / "run").exists()


def test_fedadam_trains_the_quickstart(tmp_path) -> None:
    from fedsim.engine import run_scenario
    from fedsim.scenario import load_scenario, parse_override

    from ..conftest import SCENARIOS

    sc = load_scenario(SCENARIOS / "quickstart.toml", [
        parse_override("rounds=8"), parse_override('strategy.server-optimizer="adam"'), parse_override("strategy.server-lr=0.03"),
    ])
    result = run_scenario(sc, run_dir=tmp_path / "run")
    assert result.metrics[-1]["accuracy"] > 0.7
