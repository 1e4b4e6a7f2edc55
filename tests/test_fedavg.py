"""FedAvg on tiny hand-worked arrays, weighted by example counts (Prepare / Execute / Assert)."""

from __future__ import annotations

import numpy as np
import torch

from fedsim.engine.aggregation import UpdateAccumulator
from fedsim.types import CohortChunk
from strategies.fedavg import FedAvg


def _chunk(ids, deltas, counts):
    return CohortChunk(
        device_ids=np.array(ids),
        deltas=torch.tensor(deltas, dtype=torch.float32),
        num_examples=torch.tensor(counts),
        losses=torch.zeros(len(ids)),
    )


def test_weighted_mean_hand_worked() -> None:
    # Prepare: two clients, deltas [1, 2] with 1 example and [4, -1] with 3 examples.
    acc = UpdateAccumulator(num_params=2, round=0, clip_norm=None, weighting="examples", ledger=None, num_devices=10)
    acc.add(_chunk([0, 1], [[1.0, 2.0], [4.0, -1.0]], [1, 3]))
    # Execute
    new = FedAvg().aggregate(round=0, params=torch.tensor([10.0, 10.0]), batch=acc.result())
    # Assert: (1*[1,2] + 3*[4,-1]) / 4 = [13/4, -1/4]
    assert torch.allclose(new, torch.tensor([10.0 + 13 / 4, 10.0 - 1 / 4]))


def test_server_lr_scales_step_and_chunking_does_not_matter() -> None:
    acc1 = UpdateAccumulator(num_params=2, round=0, clip_norm=None, weighting="examples", ledger=None, num_devices=10)
    acc1.add(_chunk([0, 1, 2], [[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], [2, 2, 4]))
    acc2 = UpdateAccumulator(num_params=2, round=0, clip_norm=None, weighting="examples", ledger=None, num_devices=10)
    acc2.add(_chunk([2], [[2.0, 2.0]], [4]))
    acc2.add(_chunk([0, 1], [[1.0, 0.0], [0.0, 1.0]], [2, 2]))
    p = torch.zeros(2)
    a = FedAvg(server_lr=0.5).aggregate(round=0, params=p, batch=acc1.result())
    b = FedAvg(server_lr=0.5).aggregate(round=0, params=p, batch=acc2.result())
    # mean = ([2,0] + [0,2] + [8,8]) / 8 = [1.25, 1.25]; half step
    assert torch.allclose(a, torch.tensor([0.625, 0.625]))
    assert torch.allclose(a, b)


def test_no_updates_leaves_params_unchanged() -> None:
    acc = UpdateAccumulator(num_params=3, round=0, clip_norm=None, weighting="examples", ledger=None, num_devices=10)
    p = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(FedAvg().aggregate(round=0, params=p, batch=acc.result()), p)
