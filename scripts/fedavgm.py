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

from fedsim.optim import ServerOptimizer
from fedsim.strategy import Strategy
from fedsim.types import UpdateBatch


class FedAvgM(Strategy):
    """FedAvg with server momentum; its momentum buffer is checkpointed via ``state_dict``."""

    name = "fedavgm"
    weighting = "examples"

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        # fedsim's server optimizer: heavy-ball momentum, validated as the scenario keys
        self.optimizer = ServerOptimizer(server_lr, momentum)

    def aggregate(self, *, round: int, params: torch.Tensor, batch: UpdateBatch) -> torch.Tensor:
        if batch.num_updates == 0 or batch.weight_sum <= 0:
            return params
        return self.optimizer.step(params, batch.delta_sum / batch.weight_sum)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)
