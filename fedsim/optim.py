"""The server optimizer: SGD with optional heavy-ball momentum on the server's pseudo-gradient.

Strategies that move the global model by an aggregated (possibly noisy) client delta use this one
implementation: FedAvgM (Hsu et al. 2019, ``scripts/fedavgm.py``), DP-FedAvg's server momentum and
DP-FTRLM (Kairouz et al., ICML 2021), in the sense of the server optimizers of Reddi et al.,
"Adaptive Federated Optimization", ICLR 2021::

    m <- momentum * m + update        (m starts at the first update; momentum 0 keeps no buffer)
    theta <- theta + lr * m

For a DP strategy the update is the mechanism's release divided by a fixed denominator, so the
step is post-processing and does not change the guarantee.
"""

from __future__ import annotations

from typing import Any

import torch

from fedsim.validation import number_in, positive_number

__all__ = ["ServerOptimizer"]


class ServerOptimizer:
    """Server SGD with heavy-ball momentum.

    Parameters
    ----------
    lr:
        Server learning rate (> 0), the scenario's ``server-lr``.
    momentum:
        Heavy-ball coefficient in ``[0, 1)``; 0 is plain server SGD.
    """

    def __init__(self, lr: float = 1.0, momentum: float = 0.0) -> None:
        self.lr = positive_number("server-lr", lr)
        self.momentum = number_in("momentum", momentum, 0.0, 1.0, high_open=True)
        self.buffer: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget the momentum (a new segment of DP-FTRL starts from rest)."""
        self.buffer = None

    def step(self, params: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """``params + lr * m`` after folding ``update`` into the momentum ``m``."""
        if self.momentum > 0:
            self.buffer = update.clone() if self.buffer is None else self.buffer.mul(self.momentum).add_(update)
            direction = self.buffer
        else:
            direction = update
        return params + self.lr * direction

    def state_dict(self) -> dict[str, Any]:
        """``{"buffer": tensor or None}``."""
        return {"buffer": None if self.buffer is None else self.buffer.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        unknown = set(state) - {"buffer"}
        if unknown:
            raise ValueError(f"server optimizer state has unknown keys {sorted(unknown)}")
        buf = state.get("buffer")
        self.buffer = None if buf is None else torch.as_tensor(buf, dtype=torch.float32).clone()
