"""Deployment-equivalent noise (``[privacy] equivalent-cohort``): the simulation's noise on the sum is
``z C n / N``, each averaged update carries the deployment's ``z C / N``, and the two guarantees are
planned apart (``fedsim privacy ... --equivalent-cohort``)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

import fedsim
from fedsim.privacy.equivalent import Deployment, check_deployment, min_population
from fedsim.privacy_cli import main as privacy_main
from fedsim.types import UpdateBatch
from strategies.dp_fedavg import DPFedAvg
from strategies.dp_ftrl import DPFTRL
from tests.conftest import strategy_context

D = 200_000  # coordinates: the sample std is within ~0.2 % of the true one (4 sd: 0.6 %)


def _zero_batch(d: int, n: int) -> UpdateBatch:
    return UpdateBatch(delta_sum=torch.zeros(d), weight_sum=float(n), num_updates=n, num_examples=n)


def _noise_std(strategy, *, n: int, d: int = D) -> tuple[float, float]:
    """The std of the noise the strategy adds to a zero sum, and of its averaged step."""
    strategy.setup(strategy_context(d, rounds=4, devices=100_000, per_round=n))
    released = strategy.mechanism.release(0, torch.zeros(d))
    return float(released.std()), float(released.std() / strategy.denominator)


@pytest.mark.parametrize("make", [
    lambda: DPFedAvg(noise_multiplier=3.0, clip_norm=0.5),
    lambda: DPFTRL(noise_multiplier=3.0, clip_norm=0.5, max_participations=2, min_separation=1,
                   estimator="vanilla", momentum=0.0),
])
def test_the_sums_noise_std_is_z_c_n_over_big_n(make) -> None:
    z, c, n, big = 3.0, 0.5, 40, 6500
    strategy = make()
    strategy.set_equivalent(Deployment(big), clients_per_round=n, num_rounds=4)
    std, per_average = _noise_std(strategy, n=n)
    want = z * c * n / big
    # accepts z C n / N and rejects 2/3 and 3/2 of it, and the unscaled z C, by far
    assert std == pytest.approx(want, rel=0.01)
    for wrong in (want * 2 / 3, want * 1.5, z * c):
        assert abs(std - wrong) > 0.2 * wrong
    # each averaged update carries the deployment's noise z C / N
    assert per_average == pytest.approx(z * c / big, rel=0.01)
    assert strategy.mechanism.noise_multiplier == pytest.approx(z * n / big)
    assert strategy.deployment_noise_multiplier == z


def test_without_an_equivalent_cohort_the_noise_is_the_runs_own() -> None:
    strategy = DPFedAvg(noise_multiplier=3.0, clip_norm=0.5)
    std, _ = _noise_std(strategy, n=40)
    assert std == pytest.approx(1.5, rel=0.01)
    assert strategy.equivalent_event(round=0) is None


def test_an_averaged_step_through_aggregate_carries_the_deployments_noise() -> None:
    z, c, n, big = 2.0, 1.0, 25, 5000
    strategy = DPFedAvg(noise_multiplier=z, clip_norm=c, server_lr=1.0)
    strategy.set_equivalent(Deployment(big), clients_per_round=n, num_rounds=4)
    strategy.setup(strategy_context(D, rounds=4, devices=1000, per_round=n))
    params = torch.zeros(D)
    step = strategy.aggregate(round=0, params=params, batch=_zero_batch(D, n)) - params
    assert float(step.std()) == pytest.approx(z * c / big, rel=0.01)


def test_the_deployments_events_use_its_noise_and_the_runs_its_own() -> None:
    strategy = DPFTRL(target_rho=0.81, clip_norm=0.3, max_participations=6, min_separation=15, momentum=0.0)
    strategy.set_equivalent(Deployment(6500), clients_per_round=32, num_rounds=96)
    strategy.setup(strategy_context(10, rounds=96, devices=1000, per_round=32))
    z = strategy.deployment_noise_multiplier
    assert strategy.equivalent_event(round=5).noise_multiplier == z
    assert strategy.privacy_event(round=5).noise_multiplier == pytest.approx(z * 32 / 6500)


def test_poisson_deployment_is_sampled_at_its_own_rate() -> None:
    strategy = DPFedAvg(noise_multiplier=1.0, clip_norm=1.0, sampling="poisson")
    strategy.set_equivalent(Deployment(1000, 1_000_000), clients_per_round=10, num_rounds=5)
    strategy.setup(strategy_context(10, rounds=5, devices=500, per_round=10))
    assert strategy.equivalent_event(round=0).sampling_rate == pytest.approx(1000 / 1_000_000)
    assert strategy.privacy_event(round=0).sampling_rate == pytest.approx(10 / 500)
    # the denominator is the run's expected cohort; the noise scales with it
    assert strategy.mechanism.noise_multiplier == pytest.approx(1.0 * 10 / 1000)


def test_the_counts_noise_std_is_z_b_over_2_times_n_over_big_n() -> None:
    zb, n, big, draws = 4.0, 40, 6500, 20_000
    strategy = DPFTRL(noise_multiplier=3.0, clip_norm=0.5, max_participations=2, min_separation=1,
                      estimator="vanilla", momentum=0.0, target_quantile=0.5, count_noise_multiplier=zb)
    strategy.set_equivalent(Deployment(big), clients_per_round=n, num_rounds=draws)
    strategy.setup(strategy_context(4, rounds=draws, devices=100_000, per_round=n))
    noise = torch.tensor([strategy.adaptive.count_noise(t) for t in range(draws)], dtype=torch.float64)
    std = float(noise.std())
    want = zb / 2 * n / big
    # 20,000 draws: the sample std is within ~0.5 % of the true one (4 sd: 2 %); rejects the unscaled
    # z_b / 2 and 2/3 or 3/2 of the scaled one
    assert std == pytest.approx(want, rel=0.02)
    for wrong in (want * 2 / 3, want * 1.5, zb / 2):
        assert abs(std - wrong) > 0.2 * wrong
    # the estimated fraction carries the deployment's noise z_b / (2 N): the count over the run's n
    assert std / strategy.denominator == pytest.approx(zb / (2 * big), rel=0.02)
    assert strategy.deployment_count_noise_multiplier == zb
    assert strategy.adaptive.count_noise_multiplier == pytest.approx(zb * n / big)
    update, count = strategy.equivalent_events(round=0)
    assert count.noise_multiplier == zb and update.noise_multiplier == 3.0
    assert strategy.privacy_events(round=0)[1].noise_multiplier == pytest.approx(zb * n / big)


def test_with_adaptive_clipping_the_deployments_rho_is_the_plans_with_the_counts() -> None:
    common = {"target_rho": 0.81, "rounds": 96, "max_participations": 6, "min_separation": 15, "delta": 1e-6,
              "target_quantile": 0.5}
    plain = fedsim.plan("dp-ftrl", **common)
    both = fedsim.plan("dp-ftrl", **common, equivalent_cohort=6500, clients_per_round=16)
    eq = both["equivalent"]
    assert eq["noise_multiplier"] == plain["noise_multiplier"]
    assert eq["count_noise_multiplier"] == plain["count_noise_multiplier"]
    assert eq["count_rho"] == pytest.approx(plain["count_rho"]) and eq["count_rho"] == pytest.approx(0.05 * 0.81)
    assert both["equivalent_rho"] == pytest.approx(plain["rho"], rel=1e-9) == pytest.approx(0.81, rel=1e-6)
    # the simulation's own: both noise multipliers scaled by n / N, rho by (N / n)^2, counts included
    assert both["count_noise_multiplier"] == pytest.approx(eq["count_noise_multiplier"] * 16 / 6500)
    assert both["rho"] == pytest.approx(0.81 * (6500 / 16) ** 2, rel=1e-5)
    assert both["count_rho"] == pytest.approx(0.05 * 0.81 * (6500 / 16) ** 2, rel=1e-5)
    # the run accounts its counts: a strategy set up the same way records the plan's events
    strategy = DPFTRL(target_rho=0.81, clip_norm=0.3, max_participations=6, min_separation=15, momentum=0.0,
                      target_quantile=0.5)
    strategy.set_equivalent(Deployment(6500), clients_per_round=16, num_rounds=96)
    strategy.setup(strategy_context(10, rounds=96, devices=1000, per_round=16))
    from fedsim.privacy.accountant import Accountant
    from fedsim.privacy.events import PrivacyLedger

    deployment, run = PrivacyLedger(), PrivacyLedger()
    for t in range(96):
        for event in strategy.equivalent_events(round=t):
            deployment.record(t, event)
        for event in strategy.privacy_events(round=t):
            run.record(t, event)
    assert Accountant(delta=1e-6).report(deployment).rho == pytest.approx(both["equivalent_rho"], rel=1e-9)
    assert Accountant(delta=1e-6).report(run).rho == pytest.approx(both["rho"], rel=1e-9)


def test_min_population_is_the_cohort_times_the_binding_limit() -> None:
    assert min_population(6500, 2000, 6, 313) == 6500 * 334  # ceil(2000 / 6) = 334 > b + 1 = 314
    assert min_population(6500, 96, 6, 15) == 6500 * 16  # b + 1 = 16 = 96 / 6
    assert min_population(100, 10, None, 3) == 400
    assert min_population(100, 2, None, 3) == 200  # never more windows than rounds


@pytest.mark.parametrize(("deployment", "kwargs", "message"), [
    (Deployment(20), {}, "equivalent-cohort = 20 is smaller than the simulated cohort (clients-per-round = 32)"),
    (Deployment(6500, 100_000), {}, "equivalent-population = 100000 cannot supply equivalent-cohort = 6500"),
    (Deployment(6500), {"poisson": True}, "equivalent-population must be stated for DP-FedAvg with Poisson"),
])
def test_deployments_a_run_cannot_stand_for_are_refused(deployment, kwargs, message) -> None:
    args = {"clients_per_round": 32, "rounds": 96, "max_participations": 6, "min_separation": 15, "poisson": False}
    with pytest.raises(ValueError, match=re.escape(message)):
        check_deployment(deployment, **{**args, **kwargs})


def test_the_plan_gives_both_guarantees_and_the_deployments_matches_a_plain_plan() -> None:
    common = {"target_rho": 0.81, "rounds": 96, "max_participations": 6, "min_separation": 15, "delta": 1e-6}
    plain = fedsim.plan("dp-ftrl", **common)
    both = fedsim.plan("dp-ftrl", **common, equivalent_cohort=6500, clients_per_round=32)
    z = plain["noise_multiplier"]
    assert both["equivalent"]["noise_multiplier"] == z
    assert both["equivalent_rho"] == pytest.approx(0.81, rel=1e-6) and both["equivalent_rho"] == plain["rho"]
    assert both["equivalent_epsilon"] == plain["epsilon"]
    assert both["noise_multiplier"] == pytest.approx(z * 32 / 6500)
    # the simulation's own rho: the same plan at its multiplier, (6500 / 32)^2 times the deployment's
    assert both["rho"] == pytest.approx(0.81 * (6500 / 32) ** 2, rel=1e-5)
    assert both["equivalent"]["min_population"] == 6500 * 16


def test_the_planning_command_prints_the_two_guarantees_apart(capsys) -> None:
    rc = privacy_main(["privacy", "dp-ftrl", "--noise-multiplier", "7", "--rounds", "2000", "--max-participations",
                       "6", "--min-separation", "313", "--delta", "1e-10", "--equivalent-cohort", "6500",
                       "--clients-per-round", "50", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["equivalent_rho"] == pytest.approx(0.81, abs=0.005)  # Gboard es-ES: rho = 0.81 at z = 7
    assert out["noise_multiplier"] == pytest.approx(7 * 50 / 6500)
    assert out["equivalent"]["min_population"] == 6500 * 334
    rc = privacy_main(["privacy", "dp-ftrl", "--noise-multiplier", "7", "--rounds", "2000", "--max-participations",
                       "6", "--min-separation", "313", "--delta", "1e-10", "--equivalent-cohort", "6500",
                       "--clients-per-round", "50"])
    text = capsys.readouterr().out
    assert "[this simulation as it runs]" in text and "equivalent rho" in text
    assert "not about the simulation" in text


@pytest.mark.parametrize(("argv", "message"), [
    (["--equivalent-cohort", "6500"], "--equivalent-cohort needs --clients-per-round"),
    (["--clients-per-round", "32"], "--clients-per-round needs --equivalent-cohort"),
    (["--equivalent-cohort", "20", "--clients-per-round", "32"],
     "--equivalent-cohort = 20 is smaller than the simulated cohort"),
    (["--equivalent-cohort", "6500", "--clients-per-round", "32", "--equivalent-population", "1000"],
     "--equivalent-population = 1000 cannot supply equivalent-cohort = 6500"),
])
def test_the_planning_command_refuses_bad_equivalents_in_one_line(argv, message, capsys) -> None:
    rc = privacy_main(["privacy", "dp-ftrl", "--target-rho", "0.81", "--rounds", "96", "--max-participations", "6",
                       "--min-separation", "15", "--delta", "1e-6", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert message in err


def test_a_poisson_plan_needs_the_deployments_population(capsys) -> None:
    base = ["privacy", "dp-fedavg", "--noise-multiplier", "1", "--rounds", "100", "--sampling-rate", "0.02",
            "--delta", "1e-6", "--equivalent-cohort", "1000", "--clients-per-round", "10"]
    assert privacy_main(base) == 2
    assert "equivalent-population must be stated" in capsys.readouterr().err
    assert privacy_main([*base, "--equivalent-population", "100000", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["equivalent"]["sampling_rate"] == pytest.approx(0.01)
    assert math.isfinite(out["equivalent_epsilon"]) and out["equivalent_epsilon"] < out["epsilon"]


def test_setting_up_twice_does_not_scale_the_noise_twice() -> None:
    # a resumed run sets its strategy up again: the given multipliers are the deployment's both times
    strategy = DPFTRL(noise_multiplier=3.0, clip_norm=0.5, max_participations=2, min_separation=1, momentum=0.0,
                      target_quantile=0.5, count_noise_multiplier=4.0)
    strategy.set_equivalent(Deployment(6500), clients_per_round=40, num_rounds=4)
    for _ in range(2):
        strategy.setup(strategy_context(10, rounds=4, devices=1000, per_round=40))
        assert strategy.mechanism.noise_multiplier == pytest.approx(3.0 * 40 / 6500)
        assert strategy.adaptive.count_noise_multiplier == pytest.approx(4.0 * 40 / 6500)
        assert strategy.deployment_noise_multiplier == 3.0 and strategy.deployment_count_noise_multiplier == 4.0
