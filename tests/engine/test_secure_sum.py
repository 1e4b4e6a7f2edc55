"""``UpdateAccumulator.add_secure_sum``: a sum from secure aggregation is taken whole or not at all."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.engine.aggregation import UpdateAccumulator
from fedsim.population import ParticipationLedger
from fedsim.strategy import ParticipationLimit


def accumulator(ledger: ParticipationLedger | None = None, weighting: str = "uniform") -> UpdateAccumulator:
    return UpdateAccumulator(num_params=4, round=1, clip_norm=1.0, weighting=weighting, ledger=ledger, num_devices=5)


def test_a_secure_sum_counts_its_devices_with_weight_one() -> None:
    acc = accumulator()
    total = torch.tensor([0.5, -0.25, 1.0, 0.0])
    assert acc.add_secure_sum(np.array([3, 1]), total)
    batch = acc.result()
    assert torch.equal(batch.delta_sum, total) and batch.weight_sum == 2.0 and batch.num_updates == 2
    assert sorted(acc.accepted.tolist()) == [1, 3] and acc.mean_loss is None


@pytest.mark.parametrize(
    ("ids", "total", "reason"),
    [
        ([0, 1], torch.tensor([float("nan"), 0.0, 0.0, 0.0]), "non_finite"),
        ([0, 1], torch.zeros(3), "wrong_shape"),
        ([0, 7], torch.zeros(4), "unknown_device"),
        ([2, 2], torch.zeros(4), "duplicate_device"),
        ([0, 4], torch.zeros(4), "participation_limit"),  # device 4 gave in round 0, b = 1
    ],
)
def test_a_secure_sum_with_one_bad_member_is_refused_whole(ids: list[int], total: torch.Tensor, reason: str) -> None:
    ledger = ParticipationLedger(5, ParticipationLimit(2, 1))
    ledger.record(0, np.array([4]))
    acc = accumulator(ledger)
    assert not acc.add_secure_sum(np.array(ids), total)
    assert acc.rejected == {reason: 2} and acc.num_updates == 0 and float(acc.delta_sum.abs().sum()) == 0.0


def test_a_secure_sum_needs_uniform_weights() -> None:
    with pytest.raises(ValueError, match="weighting='uniform'"):
        accumulator(weighting="examples").add_secure_sum(np.array([0, 1]), torch.zeros(4))
