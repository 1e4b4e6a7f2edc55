"""Federated Averaging (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks
from Decentralized Data").

The server moves the global model by the example-weighted mean of the client deltas:
``theta <- theta + server_lr * sum_i n_i delta_i / sum_i n_i``. No privacy guarantee.
"""

from __future__ import annotations

import torch

from fedsim.strategy import Strategy
from fedsim.types import UpdateBatch
from fedsim.validation import positive_number


class FedAvg(Strategy):
    """FedAvg with an optional server learning rate.

    Parameters
    ----------
    server_lr:
        Step size applied to the averaged delta (1.0 is plain FedAvg).
    """

    name = "fedavg"
    weighting = "examples"

    def __init__(self, server_lr: float = 1.0) -> None:
        self.server_lr = positive_number("server-lr", server_lr)

    def aggregate(self, *, round: int, params: torch.Tensor, batch: UpdateBatch) -> torch.Tensor:
        if batch.num_updates == 0 or batch.weight_sum <= 0:
            return params
        return params + self.server_lr * batch.delta_sum / batch.weight_sum
