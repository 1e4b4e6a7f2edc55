"""Population: check-ins, device-side memory and the server ledger enforce (k, b)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.data import SyntheticData
from fedsim.population import (
    BernoulliAvailability,
    DiurnalAvailability,
    ParticipationLedger,
    Population,
)
from fedsim.strategy import ParticipationLimit


def test_min_separation_counts_rounds_strictly_between() -> None:
    ledger = ParticipationLedger(3, ParticipationLimit(max_participations=3, min_separation=2))
    ledger.record(10, np.array([0]))
    assert not ledger.allowed(11, np.array([0]))[0]
    assert not ledger.allowed(12, np.array([0]))[0]
    assert ledger.allowed(13, np.array([0]))[0]  # rounds 11 and 12 lie strictly between


def test_max_participations() -> None:
    ledger = ParticipationLedger(2, ParticipationLimit(max_participations=2, min_separation=0))
    ledger.record(0, np.array([0]))
    ledger.record(1, np.array([0]))
    assert ledger.allowed(5).tolist() == [False, True]
    with pytest.raises(ValueError, match="at most once per round"):
        ledger.record(6, np.array([1, 1]))


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 4),
    b=st.integers(0, 6),
    p=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
)
def test_no_device_ever_exceeds_limits_under_any_availability(k: int, b: int, p: float, seed: int) -> None:
    data = SyntheticData(num_devices=30, examples_per_device=2, num_features=3, num_classes=2, seed=seed)
    pop = Population(data, BernoulliAvailability(p), ParticipationLimit(k, b))
    rng = np.random.default_rng(seed)
    history: dict[int, list[int]] = {}
    for r in range(40):
        eligible = pop.check_in(r, rng)
        cohort = eligible[rng.random(len(eligible)) < 0.7]
        assert pop.server_ledger.allowed(r, cohort).all()
        pop.device_memory.record(r, cohort)
        pop.server_ledger.record(r, cohort)
        for d in cohort:
            history.setdefault(int(d), []).append(r)
    for rounds in history.values():
        assert len(rounds) <= k
        assert all(b2 - b1 >= b + 1 for b1, b2 in zip(rounds, rounds[1:], strict=False))


def test_server_rejects_a_device_that_ignores_its_own_memory() -> None:
    data = SyntheticData(num_devices=5, examples_per_device=2, num_features=3, num_classes=2, seed=0)
    pop = Population(data, BernoulliAvailability(1.0), ParticipationLimit(1, 0))
    pop.device_memory.record(0, np.array([2]))
    pop.server_ledger.record(0, np.array([2]))
    pop.device_memory.load_state_dict(ParticipationLedger(5, None).state_dict())  # device "forgets"
    assert 2 in pop.check_in(1, np.random.default_rng(0))
    assert not pop.server_ledger.allowed(1, np.array([2]))[0]


def test_diurnal_probabilities_vary_over_a_day() -> None:
    avail = DiurnalAvailability(0.5, 0.8, 24, num_devices=1000, seed=0)
    means = [avail.probabilities(r).mean() for r in range(24)]
    one = [avail.probabilities(r)[0] for r in range(24)]
    assert max(one) - min(one) > 0.7
    assert abs(np.mean(means) - 0.5) < 0.05
