"""Federated Averaging (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks
from Decentralized Data").

The server moves the global model by the example-weighted mean of the client deltas:
``theta <- theta + server_lr * sum_i n_i delta_i / sum_i n_i``. No privacy guarantee.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedsim.registry import resolve_params
from fedsim.strategy import Strategy
from fedsim.types import UpdateBatch
from fedsim.validation import positive_number

__all__ = ["FedAvg", "FedAvgParams"]


@dataclass(frozen=True)
class FedAvgParams:
    """``[strategy] name = "fedavg"`` parameters.

    Attributes
    ----------
    server_lr:
        ``server-lr``: step size applied to the averaged delta (1.0 is plain FedAvg).
    """

    server_lr: float = 1.0

    def __post_init__(self) -> None:
        positive_number("server-lr", self.server_lr)


class FedAvg(Strategy):
    """FedAvg with an optional server learning rate.

    Built from a :class:`FedAvgParams` or its fields as keywords (``FedAvg(server_lr=0.5)``).
    """

    name = "fedavg"
    weighting = "examples"
    Params = FedAvgParams

    def __init__(self, params: FedAvgParams | None = None, /, **kwargs: Any) -> None:
        self.params = resolve_params(FedAvgParams, params, kwargs)
        self.server_lr = float(self.params.server_lr)

    def aggregate(self, *, round: int, params: torch.Tensor, batch: UpdateBatch) -> torch.Tensor:
        if batch.num_updates == 0 or batch.weight_sum <= 0:
            return params
        return params + self.server_lr * batch.delta_sum / batch.weight_sum
