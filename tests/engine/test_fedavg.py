"""FedAvg on tiny hand-worked arrays, weighted by example counts (Prepare / Execute / Assert)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.engine.aggregation import UpdateAccumulator, weight_cap
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


def test_weight_share_cap_hand_worked() -> None:
    # Prepare: the two clients of the first test, at most half of the weight each
    acc = UpdateAccumulator(num_params=2, round=0, clip_norm=None, weighting="examples", ledger=None,
                            num_devices=10, max_weight_share=0.5)
    acc.add(_chunk([0, 1], [[1.0, 2.0], [4.0, -1.0]], [1, 3]))
    # Execute
    batch = acc.result()
    new = FedAvg().aggregate(round=0, params=torch.tensor([10.0, 10.0]), batch=batch)
    # Assert: weight 3 is capped at tau = 1 (1 <= 0.5 * (1 + 1)): the mean of the two deltas
    assert batch.weight_sum == 2.0 and batch.num_examples == 4
    assert torch.allclose(new, torch.tensor([10.0 + 2.5, 10.0 + 0.5]))
    # three clients [1, 1, 8], at most 0.5: tau = 0.5 * 2 / (1 - 0.5) = 2
    assert weight_cap(np.array([1, 1, 8]), 0.5) == 2.0
    # no cap needed, or none possible (one client with examples: it is the whole step)
    assert weight_cap(np.array([3, 3, 4]), 0.5) == float("inf")
    assert weight_cap(np.array([0, 0, 7]), 0.5) == 7.0
    with pytest.raises(ValueError, match="max_weight_share"):
        UpdateAccumulator(num_params=2, round=0, clip_norm=None, weighting="examples", ledger=None,
                          num_devices=10, max_weight_share=0.0)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 10**6), min_size=1, max_size=14),
    st.sampled_from([0.1, 0.2, 0.25, 0.3, 0.5, 0.75, 1.0]),
    st.lists(st.integers(1, 4), min_size=1, max_size=14),
)
def test_capped_weights_bound_every_share_and_stream_exactly(counts: list[int], share: float, sizes: list[int]) -> None:
    """Whatever the counts and however they are chunked: no accepted update takes more than
    ``share`` of the total weight (when at least 1 / share report examples), weights under the
    cap are untouched, and the streamed sum equals the capped weighted sum."""
    m, p = len(counts), 3
    rows = torch.randn(m, p, generator=torch.Generator().manual_seed(m))
    acc = UpdateAccumulator(num_params=p, round=0, clip_norm=None, weighting="examples", ledger=None,
                            num_devices=100, max_weight_share=share)
    i = 0
    for size in sizes * m:
        if i >= m:
            break
        acc.add(_chunk(list(range(i, min(m, i + size))), rows[i : i + size].tolist(), counts[i : i + size]))
        i += size
    if i < m:
        acc.add(_chunk(list(range(i, m)), rows[i:].tolist(), counts[i:]))
    w = np.asarray(counts, dtype=np.float64)
    tau = weight_cap(w, share)
    capped = np.minimum(w, tau)
    batch = acc.result()
    assert batch.weight_sum == pytest.approx(capped.sum(), rel=1e-12)
    expected = (torch.from_numpy(capped)[:, None] * rows.double()).sum(0)
    # float32 accumulation: relative error ~1e-7 of the weights' total
    assert torch.allclose(batch.delta_sum.double(), expected, rtol=0, atol=1e-5 * max(1.0, float(capped.sum())))
    if (w > 0).sum() * share >= 1 and capped.sum() > 0:
        assert capped.max() <= share * capped.sum() * (1 + 1e-12)
    assert np.array_equal(capped[w <= tau], w[w <= tau])
