"""Federated Averaging (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks
from Decentralized Data"), with the server optimizers of Reddi et al. 2021.

The server treats the example-weighted mean of the client deltas,
``u = sum_i n_i delta_i / sum_i n_i``, as its pseudo-gradient and takes one server-optimizer step
with it (:class:`fedsim.optim.ServerOptimizer`): ``theta <- theta + server_lr * u`` with the
default ``server-optimizer = "sgd"`` (plain FedAvg at ``server-lr = 1``; FedAvgM with
``momentum``), or FedAdam / FedYogi / FedAdagrad (``"adam"``, ``"yogi"``, ``"adagrad"``, with
``beta1``, ``beta2``, ``tau``). A round without accepted updates leaves the model and the
optimizer as they are. No privacy guarantee.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedsim.optim import ServerOptimizerParams
from fedsim.registry import resolve_params
from fedsim.strategy import Strategy, StrategyContext
from fedsim.types import UpdateBatch

__all__ = ["FedAvg", "FedAvgParams"]


@dataclass(frozen=True)
class FedAvgParams(ServerOptimizerParams):
    """``[strategy] name = "fedavg"`` parameters: the server optimizer's.

    Attributes
    ----------
    server_lr:
        ``server-lr``: step size applied to the averaged delta (1.0 is plain FedAvg).
    server_optimizer:
        ``server-optimizer``: ``"sgd"`` (default), ``"adam"``, ``"yogi"`` or ``"adagrad"``.
    momentum:
        ``"sgd"``: server heavy-ball momentum in ``[0, 1)`` (default 0).
    beta1, beta2, tau:
        The adaptive optimizers' parameters (:class:`fedsim.optim.ServerOptimizerParams`).
    """


class FedAvg(Strategy):
    """FedAvg with a server optimizer (SGD by default).

    Built from a :class:`FedAvgParams` or its fields as keywords (``FedAvg(server_lr=0.5)``,
    ``FedAvg(server_optimizer="adam", server_lr=0.01)``).
    """

    name = "fedavg"
    weighting = "examples"
    Params = FedAvgParams

    def __init__(self, params: FedAvgParams | None = None, /, **kwargs: Any) -> None:
        self.params = resolve_params(FedAvgParams, params, kwargs)
        self.optimizer = self.params.build_server_optimizer()
        self.server_lr = self.optimizer.lr

    def setup(self, ctx: StrategyContext) -> None:
        super().setup(ctx)
        self.optimizer.reset()

    def aggregate(self, *, round: int, params: torch.Tensor, batch: UpdateBatch) -> torch.Tensor:
        if batch.num_updates == 0 or batch.weight_sum <= 0:
            return params
        return self.optimizer.step(params, batch.delta_sum / batch.weight_sum)

    def state_dict(self) -> dict[str, Any]:
        """The server optimizer's state (momentum buffer, or adaptive moments)."""
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (an empty state: a checkpoint of plain FedAvg, which had none)."""
        if not state:
            self.optimizer.reset()
            return
        if set(state) != {"optimizer"}:
            raise ValueError(f"fedavg state needs the key 'optimizer', got {sorted(state)}")
        self.optimizer.load_state_dict(state["optimizer"])
