"""Server optimizers: what the server does with a round's pseudo-gradient.

Every strategy that moves the global model by an aggregated (for DP strategies: noisy) client
delta uses this one implementation (FedAvg, DP-FedAvg, DP-FTRL, ``scripts/fedavgm.py``). The
update ``u_t`` is the round's average client delta (it points downhill, like a negative
gradient). The optimizers are those of Reddi et al., "Adaptive Federated Optimization", ICLR 2021
(arXiv:2003.00295), Algorithm 2, with heavy-ball SGD as the non-adaptive one:

``"sgd"`` (FedAvg, FedAvgM, DP-FTRLM)::

    m <- momentum * m + u_t           (m starts at the first update; momentum 0 keeps no buffer)
    theta <- theta + lr * m

``"adam"``, ``"yogi"``, ``"adagrad"`` (FedAdam, FedYogi, FedAdagrad), per coordinate, with
``m_{-1} = 0`` and ``v_{-1} = tau**2`` and no bias correction, as in the paper::

    m_t = beta1 * m_{t-1} + (1 - beta1) * u_t
    v_t = beta2 * v_{t-1} + (1 - beta2) * u_t**2                          (adam)
    v_t = v_{t-1} - (1 - beta2) * u_t**2 * sign(v_{t-1} - u_t**2)          (yogi)
    v_t = v_{t-1} + u_t**2                                                (adagrad; no beta2)
    theta <- theta + lr * m_t / (sqrt(v_t) + tau)

``tau`` (the paper's adaptivity) bounds the per-coordinate step at ``lr * |m| / tau``.

For a DP strategy ``u_t`` is the mechanism's release divided by a fixed denominator, so every
step, and the optimizer's state, is post-processing of noisy releases and does not change the
guarantee (docs/privacy.md, "Server optimizers").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from fedsim.validation import choice, number_in, positive_number

__all__ = ["ADAPTIVE", "OPTIMIZERS", "ServerOptimizer", "ServerOptimizerParams"]

#: Every server optimizer's name (``[strategy] server-optimizer``).
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "yogi", "adagrad")
#: The adaptive ones (they take ``beta1``, ``tau`` and, except Adagrad, ``beta2``).
ADAPTIVE: tuple[str, ...] = ("adam", "yogi", "adagrad")
#: Defaults of the adaptive optimizers' parameters (Reddi et al.'s beta1 and beta2; tau 1e-3,
#: the middle of the paper's grid).
ADAPTIVE_DEFAULTS: dict[str, float] = {"beta1": 0.9, "beta2": 0.99, "tau": 1e-3}


class ServerOptimizer:
    """The server's optimizer: heavy-ball SGD, or FedAdam / FedYogi / FedAdagrad.

    Parameters
    ----------
    lr:
        Server learning rate (> 0), the scenario's ``server-lr``.
    momentum:
        ``"sgd"`` only: heavy-ball coefficient in ``[0, 1)``; 0 is plain server SGD.
    optimizer:
        ``"sgd"`` (default), ``"adam"``, ``"yogi"`` or ``"adagrad"``.
    beta1, beta2, tau:
        Adaptive optimizers only: first- and second-moment decay in ``[0, 1)`` (``beta2`` not
        for Adagrad) and the adaptivity ``tau > 0``; ``None``: 0.9, 0.99 and 1e-3.

    Raises
    ------
    ValueError
        A value out of range, or a parameter the optimizer does not take (``momentum`` with an
        adaptive optimizer, whose first-moment coefficient is ``beta1``; ``beta1``, ``beta2``,
        ``tau`` with ``"sgd"``; ``beta2`` with ``"adagrad"``).
    """

    def __init__(
        self,
        lr: float = 1.0,
        momentum: float = 0.0,
        *,
        optimizer: str = "sgd",
        beta1: float | None = None,
        beta2: float | None = None,
        tau: float | None = None,
    ) -> None:
        self.lr = positive_number("server-lr", lr)
        self.optimizer = choice("server-optimizer", optimizer, OPTIMIZERS)
        self.momentum = number_in("momentum", momentum, 0.0, 1.0, high_open=True)
        given = {"beta1": beta1, "beta2": beta2, "tau": tau}
        if self.optimizer == "sgd":
            extra = [k for k, v in given.items() if v is not None]
            if extra:
                raise ValueError(
                    f"{extra[0]} applies to the adaptive server optimizers (server-optimizer = 'adam', 'yogi' or "
                    "'adagrad'), not to 'sgd'"
                )
            self.beta1 = self.beta2 = self.tau = 0.0
        else:
            if self.momentum != 0.0:
                raise ValueError(
                    f"momentum applies to server-optimizer = 'sgd'; server-optimizer = {self.optimizer!r} takes its "
                    "first-moment coefficient as beta1"
                )
            if self.optimizer == "adagrad" and beta2 is not None:
                raise ValueError("beta2 does not apply to server-optimizer = 'adagrad' (its v_t sums every u_t**2)")
            value = {k: ADAPTIVE_DEFAULTS[k] if v is None else v for k, v in given.items()}
            self.beta1 = number_in("beta1", value["beta1"], 0.0, 1.0, high_open=True)
            self.beta2 = number_in("beta2", value["beta2"], 0.0, 1.0, high_open=True)
            self.tau = positive_number("tau", value["tau"])
        self.buffer: torch.Tensor | None = None  # sgd: the momentum m
        self.m: torch.Tensor | None = None  # adaptive: first moment m_t
        self.v: torch.Tensor | None = None  # adaptive: second moment v_t

    @property
    def adaptive(self) -> bool:
        """Whether this is one of the adaptive optimizers (Adam, Yogi, Adagrad)."""
        return self.optimizer in ADAPTIVE

    def reset(self) -> None:
        """Forget the state: the momentum, or the moment estimates (back to ``m = 0, v = tau**2``).

        Called before the first round, and by DP-FTRL when a tree restarts (a new segment of
        DP-FTRL starts from rest).
        """
        self.buffer = self.m = self.v = None

    def step(self, params: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """The new parameters after one step with the round's update ``u_t`` (a new tensor)."""
        if not self.adaptive:
            if self.momentum > 0:
                self.buffer = update.clone() if self.buffer is None else self.buffer.mul(self.momentum).add_(update)
                direction = self.buffer
            else:
                direction = update
            return params + self.lr * direction
        if self.m is None or self.v is None:
            self.m = torch.zeros_like(update)
            self.v = torch.full_like(update, self.tau**2)
        square = update * update
        self.m.mul_(self.beta1).add_(update, alpha=1.0 - self.beta1)
        if self.optimizer == "adam":
            self.v.mul_(self.beta2).add_(square, alpha=1.0 - self.beta2)
        elif self.optimizer == "yogi":
            self.v.sub_(torch.sign(self.v - square).mul_(square), alpha=1.0 - self.beta2)
        else:  # adagrad
            self.v.add_(square)
        return params + self.lr * (self.m / (self.v.sqrt() + self.tau))

    def describe(self) -> dict[str, Any]:
        """The optimizer and its parameters (for messages and summaries)."""
        if not self.adaptive:
            return {"optimizer": "sgd", "lr": self.lr, "momentum": self.momentum}
        out: dict[str, Any] = {"optimizer": self.optimizer, "lr": self.lr, "beta1": self.beta1}
        if self.optimizer != "adagrad":
            out["beta2"] = self.beta2
        out["tau"] = self.tau
        return out

    def state_dict(self) -> dict[str, Any]:
        """SGD: ``{"buffer": tensor or None}``; adaptive: ``{"m": ..., "v": ...}`` (tensors or None)."""
        if not self.adaptive:
            return {"buffer": None if self.buffer is None else self.buffer.clone()}
        return {"m": None if self.m is None else self.m.clone(), "v": None if self.v is None else self.v.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (of the same optimizer)."""
        expected = {"m", "v"} if self.adaptive else {"buffer"}
        if (set(state) != expected) if self.adaptive else not set(state) <= expected:
            raise ValueError(
                f"server optimizer state has keys {sorted(state)}, server-optimizer = {self.optimizer!r} "
                f"keeps {sorted(expected)}"
            )

        def tensor(value: Any) -> torch.Tensor | None:
            return None if value is None else torch.as_tensor(value, dtype=torch.float32).clone()

        if self.adaptive:
            self.m, self.v = tensor(state["m"]), tensor(state["v"])
            if (self.m is None) != (self.v is None):
                raise ValueError("server optimizer state: m and v must both be saved or both be None")
        else:
            self.buffer = tensor(state.get("buffer"))


@dataclass(frozen=True)
class ServerOptimizerParams:
    """The server optimizer's scenario keys, shared by every strategy that has one.

    A strategy's ``Params`` dataclass extends this one (FedAvg's, and every DP strategy's through
    :class:`fedsim.strategy.MechanismParams`); the keys are the kebab-case field names.

    Attributes
    ----------
    server_lr:
        ``server-lr``: the server's step size (> 0).
    momentum:
        ``"sgd"`` only: heavy-ball coefficient in ``[0, 1)``; unset: :attr:`default_momentum`
        (0, or 0.9 for DP-FTRL: DP-FTRLM).
    server_optimizer:
        ``server-optimizer``: ``"sgd"`` (default), ``"adam"``, ``"yogi"``, ``"adagrad"`` (Reddi et
        al. 2021).
    beta1, beta2, tau:
        The adaptive optimizers' first- and second-moment decay, in ``[0, 1)``, and adaptivity
        ``> 0`` (defaults 0.9, 0.99, 1e-3; Adagrad takes no ``beta2``).
    """

    #: ``momentum`` when it is not given (with ``server-optimizer = "sgd"``).
    default_momentum: ClassVar[float] = 0.0

    server_lr: float = 1.0
    momentum: float | None = None
    server_optimizer: Literal["sgd", "adam", "yogi", "adagrad"] = "sgd"
    beta1: float | None = None
    beta2: float | None = None
    tau: float | None = None

    def __post_init__(self) -> None:
        self.build_server_optimizer()  # every check, with the optimizer's own messages

    def server_optimizer_options(self) -> dict[str, Any]:
        """The :class:`ServerOptimizer` keyword arguments these parameters give."""
        momentum = self.momentum
        if momentum is None:
            momentum = self.default_momentum if self.server_optimizer == "sgd" else 0.0
        return {
            "lr": self.server_lr,
            "momentum": momentum,
            "optimizer": self.server_optimizer,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "tau": self.tau,
        }

    def build_server_optimizer(self) -> ServerOptimizer:
        """A fresh :class:`ServerOptimizer` with these parameters."""
        return ServerOptimizer(**self.server_optimizer_options())
