"""Server-side validation: malformed updates are rejected and counted, never averaged in."""

from __future__ import annotations

import numpy as np
import torch

from fedsim.engine.aggregation import UpdateAccumulator
from fedsim.population import ParticipationLedger
from fedsim.strategy import ParticipationLimit
from fedsim.types import CohortChunk


def _acc(**kw) -> UpdateAccumulator:
    base = dict(num_params=3, round=5, clip_norm=1.0, weighting="uniform", ledger=None, num_devices=10)
    base.update(kw)
    return UpdateAccumulator(**base)


def _chunk(ids, rows, counts=None, dtype=torch.float32):
    rows = torch.tensor(rows, dtype=dtype)
    return CohortChunk(
        device_ids=np.array(ids),
        deltas=rows,
        num_examples=torch.tensor(counts if counts is not None else [1] * len(ids)),
        losses=torch.zeros(len(ids)),
    )


def test_each_reason_rejected_and_counted() -> None:
    ledger = ParticipationLedger(10, ParticipationLimit(max_participations=1))
    ledger.record(0, np.array([7]))
    acc = _acc(ledger=ledger)
    good = [0.1, 0.2, 0.3]
    mask = acc.add(
        _chunk(
            [0, 1, 2, 3, 3, 42, 7, 4],
            [good, [float("nan"), 0, 0], [float("inf"), 0, 0], [0.6, 0.8, 0.0], good, good, good, [2.0, 0, 0]],
            counts=[5, 5, 5, 5, 5, 5, 5, 5],
        )
    )
    assert mask.tolist() == [True, False, False, True, False, False, False, False]
    batch = acc.result()
    assert batch.rejected == {
        "non_finite": 2,
        "duplicate_device": 1,
        "unknown_device": 1,
        "participation_limit": 1,
        "norm_exceeds_clip": 1,
    }
    assert batch.num_updates == 2
    assert torch.allclose(batch.delta_sum, torch.tensor([0.7, 1.0, 0.3]))
    assert np.array_equal(acc.accepted, [0, 3])


def test_wrong_shape_and_dtype_reject_whole_chunk() -> None:
    acc = _acc()
    assert not acc.add(_chunk([0, 1], [[0.1, 0.1], [0.1, 0.1]])).any()
    assert not acc.add(_chunk([2], [[0.1, 0.1, 0.1]], dtype=torch.float64)).any()
    batch = acc.result()
    assert batch.rejected == {"wrong_shape": 2, "wrong_dtype": 1}
    assert batch.num_updates == 0 and torch.equal(batch.delta_sum, torch.zeros(3))


def test_negative_example_count_rejected() -> None:
    acc = _acc(weighting="examples", clip_norm=None)
    acc.add(_chunk([0, 1], [[1.0, 0, 0], [0, 1.0, 0]], counts=[-3, 2]))
    batch = acc.result()
    assert batch.rejected == {"bad_example_count": 1}
    assert torch.allclose(batch.delta_sum, torch.tensor([0.0, 2.0, 0.0]))


def test_norm_tolerance_admits_float_rounding_only() -> None:
    acc = _acc()
    just = torch.tensor([[1.0 + 1e-7, 0.0, 0.0], [1.001, 0.0, 0.0]])
    mask = acc.add(CohortChunk(np.array([0, 1]), just, torch.tensor([1, 1]), torch.zeros(2)))
    assert mask.tolist() == [True, False]
