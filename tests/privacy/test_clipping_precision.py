"""Clipping and the server's clip check stay exact for large models (float64 norm accumulation).

A float32 sum of squares over ~1e6 entries underestimates the norm by ~1e-4 relative (more than
the server's 1e-5 slack): a delta "clipped" with a float32 norm has a true norm above C, and the
server rejected some honest updates of a 500k-parameter LSTM.
"""

from __future__ import annotations

import numpy as np
import torch

from fedsim.engine.aggregation import UpdateAccumulator
from fedsim.privacy.clipping import NORM_TOLERANCE, clip_by_norm
from fedsim.types import CohortChunk


def heavy_tailed(n: int, rows: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, n, generator=g) * torch.rand(rows, n, generator=g) ** 4


def test_clipped_norm_is_at_most_c_in_exact_arithmetic() -> None:
    for n in (500_000, 1_000_000):
        for row in heavy_tailed(n, rows=3):
            clipped = clip_by_norm(row, 0.3)
            exact = float(np.linalg.norm(clipped.numpy().astype(np.float64)))
            assert exact <= 0.3 * (1 + 1e-6), (n, exact / 0.3 - 1)
        rows = clip_by_norm(heavy_tailed(n, rows=3, seed=1), 0.3)
        exact = np.linalg.norm(rows.numpy().astype(np.float64), axis=1)
        assert (exact <= 0.3 * (1 + 1e-6)).all() and (exact >= 0.3 * (1 - 1e-6)).all()


def test_server_accepts_clipped_and_rejects_just_over_for_a_large_model() -> None:
    n = 1_000_000
    clipped = clip_by_norm(heavy_tailed(n, rows=4, seed=2), 0.3)
    over = clipped[:1] * (1 + 3 * NORM_TOLERANCE)
    acc = UpdateAccumulator(num_params=n, round=0, clip_norm=0.3, weighting="uniform", ledger=None, num_devices=10)
    mask = acc.add(CohortChunk(np.arange(5), torch.cat([clipped, over]), torch.ones(5, dtype=torch.int64), torch.zeros(5)))
    assert mask.tolist() == [True, True, True, True, False]
    assert acc.result().rejected == {"norm_exceeds_clip": 1}
