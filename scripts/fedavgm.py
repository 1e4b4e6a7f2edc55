"""Worked example of a custom strategy: FedAvg with server momentum (FedAvgM).

Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification": the server treats the averaged client delta as a pseudo-gradient step and keeps
a momentum buffer ``m <- beta * m + avg_delta``, ``theta <- theta + server_lr * m``.

Use it from a scenario without registering anything::

    [strategy]
    name = "../scripts/fedavgm.py:FedAvgM"   # path relative to the scenario file
    server-lr = 1.0
    momentum = 0.9

or register it in your own package with ``fedsim.strategy.register_strategy("fedavgm", FedAvgM)``.
"""

from __future__ import annotations

from typing import Any

import torch

from fedsim.strategy import Strategy
from fedsim.types import UpdateBatch


class FedAvgM(Strategy):
    """FedAvg with server momentum; its momentum buffer is checkpointed via ``state_dict``."""

    name = "fedavgm"
    weighting = "examples"

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        if not server_lr > 0:
            raise ValueError(f"server-lr must be > 0, got {server_lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.server_lr = float(server_lr)
        self.momentum = float(momentum)
        self.buffer: torch.Tensor | None = None

    def aggregate(self, *, round: int, params: torch.Tensor, batch: UpdateBatch) -> torch.Tensor:
        if batch.num_updates == 0 or batch.weight_sum <= 0:
            return params
        avg = batch.delta_sum / batch.weight_sum
        self.buffer = avg.clone() if self.buffer is None else self.momentum * self.buffer + avg
        return params + self.server_lr * self.buffer

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": None if self.buffer is None else self.buffer.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        buf = state.get("buffer")
        self.buffer = None if buf is None else buf.clone()
