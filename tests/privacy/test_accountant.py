"""Events, ledger and accountant: JSON round trip, accounting rules, planning equality."""

from __future__ import annotations

import json
import math
import warnings

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp

from fedsim.privacy import (
    Accountant,
    GaussianEvent,
    PrivacyLedger,
    PrivacyReport,
    SampledGaussianEvent,
    TreeAggregationEvent,
    dp_fedavg_privacy,
    dp_ftrl_privacy,
    epsilon_from_rho,
    epsilon_rdp_from_rho,
    max_tree_sensitivity_sq,
    sampled_gaussian_epsilon,
    tree_sensitivity_sq_prefixes,
)
from fedsim.privacy.events import event_from_dict, event_to_dict


def _ledger(event, n, start=0):
    ledger = PrivacyLedger()
    for r in range(start, start + n):
        ledger.record(r, event)
    return ledger


# ---------------------------------------------------------------- events and ledger


def test_ledger_json_round_trip():
    ledger = PrivacyLedger()
    ledger.record(0, TreeAggregationEvent(7.0, 6, 313))
    ledger.record(1, TreeAggregationEvent(7.0, 6, 313, restart_every=100))
    ledger.record(5, GaussianEvent(1.5, max_participations=3, min_separation=2))
    ledger.record(6, GaussianEvent(2.0))
    ledger.record(9, SampledGaussianEvent(1.1, 0.05))
    ledger.record(10, SampledGaussianEvent(1.1, 0.05, max_participations=4, min_separation=1))
    data = json.loads(json.dumps(ledger.to_json()))
    again = PrivacyLedger.from_json(data)
    assert again == ledger
    assert again.events() == ledger.events()
    assert len(again) == 6
    assert again.to_json() == data
    assert data[0] == {
        "round": 0,
        "event": {"type": "tree_aggregation", "noise_multiplier": 7.0, "max_participations": 6,
                  "min_separation": 313, "restart_every": None},
    }
    consistent = _ledger(SampledGaussianEvent(1.1, 0.05, 4, 1), 30)
    for r in range(30, 40):
        consistent.record(r, TreeAggregationEvent(3.0, 2, 1))
    restored = PrivacyLedger.from_json(json.loads(json.dumps(consistent.to_json())))
    assert Accountant(1e-6).report(restored) == Accountant(1e-6).report(consistent)


def test_event_dict_round_trip_and_normalisation():
    for event in (TreeAggregationEvent(7, 6, 313), GaussianEvent(np.float32(2.0), np.int64(3)),
                  SampledGaussianEvent(1, 1)):
        assert event_from_dict(event_to_dict(event)) == event
    ev = GaussianEvent(np.float32(2.0), np.int64(3))
    assert type(ev.noise_multiplier) is float and type(ev.max_participations) is int


def test_ledger_rejects_bad_records():
    ledger = PrivacyLedger()
    ledger.record(3, GaussianEvent(1.0))
    with pytest.raises(ValueError, match="strictly increasing"):
        ledger.record(3, GaussianEvent(1.0))
    with pytest.raises(ValueError, match="strictly increasing"):
        ledger.record(2, GaussianEvent(1.0))
    with pytest.raises(TypeError):
        ledger.record(4, "not an event")
    with pytest.raises(ValueError, match="round"):
        ledger.record(4.5, GaussianEvent(1.0))
    assert len(ledger) == 1
    with pytest.raises(ValueError):
        PrivacyLedger.from_json({"round": 0})
    with pytest.raises(ValueError, match="unknown event type"):
        PrivacyLedger.from_json([{"round": 0, "event": {"type": "laplace"}}])
    with pytest.raises(ValueError, match="bad fields"):
        PrivacyLedger.from_json([{"round": 0, "event": {"type": "gaussian", "sigma": 1}}])
    with pytest.raises(ValueError, match="strictly increasing"):
        PrivacyLedger.from_json([
            {"round": 1, "event": {"type": "gaussian", "noise_multiplier": 1.0}},
            {"round": 1, "event": {"type": "gaussian", "noise_multiplier": 1.0}},
        ])


@pytest.mark.parametrize(
    "factory",
    [
        lambda: GaussianEvent(0.0),
        lambda: GaussianEvent(-1.0),
        lambda: GaussianEvent(math.inf),
        lambda: GaussianEvent(1.0, max_participations=0),
        lambda: GaussianEvent(1.0, min_separation=-1),
        lambda: SampledGaussianEvent(1.0, 0.0),
        lambda: SampledGaussianEvent(1.0, 1.5),
        lambda: TreeAggregationEvent(1.0, 0, 0),
        lambda: TreeAggregationEvent(1.0, 1, -2),
        lambda: TreeAggregationEvent(1.0, 1, 0, restart_every=0),
        lambda: TreeAggregationEvent(1.0, 1.5, 0),
    ],
)
def test_event_validation(factory):
    with pytest.raises(ValueError):
        factory()


def test_empty_ledger_reports_no_dp():
    report = Accountant(1e-6).report(PrivacyLedger())
    assert report == PrivacyReport(None, None, None, None, None)


def test_accountant_rejects_bad_delta():
    for delta in (0, 1, -0.5, 2.0):
        with pytest.raises(ValueError, match="delta"):
            Accountant(delta)


# ---------------------------------------------------------------- golden values


def test_gboard_run_through_accountant():
    event = TreeAggregationEvent(7.0, 6, 313)
    report = Accountant(1e-10).report(_ledger(event, 2000))
    assert round(report.rho, 3) == 0.806
    assert report.rho == 79 / 98
    assert round(report.epsilon_rdp, 2) == 8.90
    assert round(report.epsilon, 2) == 8.53
    assert report.noise_multiplier == 7.0
    assert report.delta == 1e-10


# ---------------------------------------------------------------- accountant == planning


@pytest.mark.parametrize(
    "z,rounds,k,b,restart,delta",
    [(7.0, 2000, 6, 313, None, 1e-10), (7.0, 2000, 6, 313, 700, 1e-10), (2.0, 300, 12, 5, 64, 1e-6),
     (1.3, 97, 97, 0, None, 1e-5), (5.0, 50, 3, 20, 16, 1e-8)],
)
def test_tree_ledger_equals_planning(z, rounds, k, b, restart, delta):
    ledger = _ledger(TreeAggregationEvent(z, k, b, restart), rounds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        planned = dp_ftrl_privacy(z, rounds, k, b, delta, restart_every=restart)
    assert Accountant(delta).report(ledger) == planned
    assert planned.rho == max_tree_sensitivity_sq(rounds, k, b, restart) / (2 * z * z)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(noise_multiplier=1.0, rounds=1000, delta=1e-6, max_participations=5),
        dict(noise_multiplier=1.0, rounds=1000, delta=1e-6),
        dict(noise_multiplier=2.0, rounds=100, delta=1e-6, max_participations=10, min_separation=9),
        dict(noise_multiplier=1.0, rounds=1000, delta=1e-6, sampling_rate=0.01),
        dict(noise_multiplier=0.8, rounds=200, delta=1e-5, sampling_rate=0.2, max_participations=30,
             min_separation=2),
    ],
)
def test_fedavg_ledger_equals_planning(kwargs):
    q = kwargs.get("sampling_rate")
    k = kwargs.get("max_participations")
    b = kwargs.get("min_separation", 0)
    z = kwargs["noise_multiplier"]
    event = GaussianEvent(z, k, b) if q is None else SampledGaussianEvent(z, q, k, b)
    ledger = _ledger(event, kwargs["rounds"])
    assert Accountant(kwargs["delta"]).report(ledger) == dp_fedavg_privacy(**kwargs)


def test_per_round_reports_follow_prefixes():
    z, k, b, restart, delta = 3.0, 4, 9, 48, 1e-8
    event = TreeAggregationEvent(z, k, b, restart)
    prefixes = tree_sensitivity_sq_prefixes(150, k, b, restart)
    ledger = PrivacyLedger()
    acc = Accountant(delta)
    previous = 0.0
    for n in range(1, 151):
        predicted = acc.report_with(ledger, n - 1, event)
        assert len(ledger) == n - 1  # not mutated
        ledger.record(n - 1, event)
        report = acc.report(ledger)
        assert report == predicted
        assert report.rho == prefixes[n - 1] / (2 * z * z)
        assert report.rho >= previous
        previous = report.rho
        if n in (1, 10, 48, 49, 100, 150):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                assert report == dp_ftrl_privacy(z, n, k, b, delta, restart_every=restart)


def test_report_with_validates_like_record():
    ledger = _ledger(GaussianEvent(1.0), 3)
    acc = Accountant(1e-6)
    with pytest.raises(ValueError, match="strictly increasing"):
        acc.report_with(ledger, 2, GaussianEvent(1.0))
    with pytest.raises(TypeError):
        acc.report_with(ledger, 5, object())
    assert acc.report_with(PrivacyLedger(), 0, GaussianEvent(1.0)).rho == 0.5


# ---------------------------------------------------------------- accounting rules


def test_gaussian_participation_count():
    acc = Accountant(1e-6)
    # b = 1: at most every other round of 11 -> 6 contributions
    assert acc.report(_ledger(GaussianEvent(2.0, None, 1), 11)).rho == 6 / (2 * 4.0)
    assert acc.report(_ledger(GaussianEvent(2.0, 4, 1), 11)).rho == 4 / (2 * 4.0)
    assert acc.report(_ledger(GaussianEvent(2.0), 11)).rho == 11 / (2 * 4.0)


def test_gaussian_mixed_noise_is_worst_pattern():
    zs = [1.0, 4.0, 2.0, 0.5, 3.0, 1.5, 0.8]
    ledger = PrivacyLedger()
    for r, z in enumerate(zs):
        ledger.record(r, GaussianEvent(z, max_participations=2, min_separation=1))
    w = [1 / (2 * z * z) for z in zs]
    # best two rounds with at least one round strictly between them
    best = max(w[i] + w[j] for i in range(7) for j in range(i + 2, 7))
    report = Accountant(1e-6).report(ledger)
    assert report.rho == pytest.approx(best)
    assert report.noise_multiplier is None
    # without constraints: all rounds
    ledger2 = PrivacyLedger()
    for r, z in enumerate(zs):
        ledger2.record(r, GaussianEvent(z))
    assert Accountant(1e-6).report(ledger2).rho == pytest.approx(sum(w))


def test_mixed_ledger_adds_rho():
    delta = 1e-7
    ledger = PrivacyLedger()
    for r in range(64):
        ledger.record(r, TreeAggregationEvent(4.0, 3, 10))
    for r in range(64, 74):
        ledger.record(r, GaussianEvent(5.0, 2, 0))
    report = Accountant(delta).report(ledger)
    rho = max_tree_sensitivity_sq(64, 3, 10) / 32.0 + 2 / 50.0
    assert report.rho == pytest.approx(rho)
    assert report.epsilon == pytest.approx(epsilon_from_rho(rho, delta))
    assert report.epsilon_rdp == pytest.approx(epsilon_rdp_from_rho(rho, delta))
    assert report.noise_multiplier is None


def test_inconsistent_schedules_are_rejected():
    ledger = PrivacyLedger()
    ledger.record(0, TreeAggregationEvent(4.0, 3, 10))
    ledger.record(1, TreeAggregationEvent(5.0, 3, 10))
    with pytest.raises(ValueError, match="TreeAggregationEvent"):
        Accountant(1e-6).report(ledger)
    ledger = PrivacyLedger()
    ledger.record(0, GaussianEvent(1.0, 3, 0))
    ledger.record(1, GaussianEvent(1.0, 4, 0))
    with pytest.raises(ValueError, match="GaussianEvent"):
        Accountant(1e-6).report(ledger)


def test_sampled_epsilon_is_amplified_rho_is_not():
    z, q, n, delta = 1.0, 0.01, 1000, 1e-6
    report = dp_fedavg_privacy(z, n, delta, sampling_rate=q)
    assert report.rho == n / (2 * z * z)
    assert report.epsilon == pytest.approx(sampled_gaussian_epsilon(z, q, n, delta))
    assert report.epsilon < epsilon_from_rho(report.rho, delta)
    # a participation cap can only help: the unamplified bound takes over when it is smaller
    capped = dp_fedavg_privacy(z, n, delta, sampling_rate=0.5, max_participations=1)
    assert capped.rho == 0.5
    assert capped.epsilon == pytest.approx(epsilon_from_rho(0.5, delta))
    assert capped.epsilon < dp_fedavg_privacy(z, n, delta, sampling_rate=0.5).epsilon
    # q = 1 is the plain Gaussian mechanism
    full = dp_fedavg_privacy(3.0, 10, delta, sampling_rate=1.0)
    plain = dp_fedavg_privacy(3.0, 10, delta)
    assert full.rho == plain.rho
    assert full.epsilon == pytest.approx(plain.epsilon, rel=1e-9)


def test_opacus_matches_opacus_accountant():
    from opacus.accountants import RDPAccountant

    for z, q, steps, delta in [(1.0, 0.01, 1000, 1e-6), (0.7, 0.05, 300, 1e-5), (2.0, 0.1, 50, 1e-8)]:
        acc = RDPAccountant()
        acc.history = [(z, q, steps)]
        # our orders extend Opacus's defaults, so we can only be as good or better
        ours = sampled_gaussian_epsilon(z, q, steps, delta)
        theirs = acc.get_epsilon(delta)
        assert ours <= theirs + 1e-12
        assert ours == pytest.approx(theirs, rel=1e-3)


@pytest.mark.parametrize(
    "z,q,steps,delta",
    [(1.0, 0.01, 1000, 1e-6), (0.8, 0.02, 500, 1e-5), (1.5, 0.1, 200, 1e-7), (3.0, 0.5, 20, 1e-6)],
)
def test_sampled_epsilon_against_dp_accounting(z, q, steps, delta):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps
    )
    rdp_acc = rdp.RdpAccountant()
    rdp_acc.compose(event)
    pld_acc = pld.PLDAccountant(value_discretization_interval=1e-3)
    pld_acc.compose(event)
    ours = dp_fedavg_privacy(z, steps, delta, sampling_rate=q).epsilon
    assert ours == pytest.approx(rdp_acc.get_epsilon(delta), rel=2e-2)
    # PLD is (nearly) tight: the RDP bound is above it, but not wildly so
    reference = pld_acc.get_epsilon(delta)
    assert reference <= ours * (1 + 1e-3)
    assert ours <= 1.5 * reference


def test_per_round_accounting_uses_cached_tables():
    # a 2000-round DP-FTRL run with a report after every round (timing is in the benchmark)
    event = TreeAggregationEvent(7.0, 6, 313)
    ledger = PrivacyLedger()
    acc = Accountant(1e-10)
    rhos = []
    for r in range(2000):
        ledger.record(r, event)
        rhos.append(acc.report(ledger).rho)
    expected = np.array(tree_sensitivity_sq_prefixes(2000, 6, 313)) / 98.0
    assert np.array_equal(np.array(rhos), expected)


def test_planning_warns_on_infeasible_participations():
    with pytest.warns(UserWarning, match="effective max_participations=7"):
        report = dp_ftrl_privacy(7.0, 2000, 10, 313, 1e-10)
    assert report.rho == max_tree_sensitivity_sq(2000, 7, 313) / 98.0
    with pytest.warns(UserWarning, match="effective max_participations=5"):
        dp_fedavg_privacy(1.0, 10, 1e-6, max_participations=8, min_separation=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dp_ftrl_privacy(7.0, 2000, 6, 313, 1e-10)


@pytest.mark.parametrize(
    "call",
    [
        lambda: dp_ftrl_privacy(0.0, 10, 1, 0, 1e-6),
        lambda: dp_ftrl_privacy(1.0, 0, 1, 0, 1e-6),
        lambda: dp_ftrl_privacy(1.0, 10, 0, 0, 1e-6),
        lambda: dp_ftrl_privacy(1.0, 10, 1, -1, 1e-6),
        lambda: dp_ftrl_privacy(1.0, 10, 1, 0, 1.0),
        lambda: dp_ftrl_privacy(1.0, 10, 1, 0, 1e-6, restart_every=0),
        lambda: dp_fedavg_privacy(1.0, 10, 1e-6, sampling_rate=0.0),
        lambda: dp_fedavg_privacy(1.0, 10, 1e-6, sampling_rate=1.01),
        lambda: dp_fedavg_privacy(-1.0, 10, 1e-6),
        lambda: dp_fedavg_privacy(1.0, 10, 0.0),
    ],
)
def test_planning_bad_inputs(call):
    with pytest.raises(ValueError):
        call()
