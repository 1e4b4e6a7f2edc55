"""The ``Strategy`` contract: how the server selects clients, instructs them and aggregates.

A strategy is one object that runs unchanged in the in-process engine and, wrapped by the Flower
bridge, inside a Flower ``ServerApp``. The engine owns the round loop; a strategy fills in hooks:

============================  =====================================================================
hook                          default
============================  =====================================================================
``setup(ctx)``                stores the :class:`StrategyContext`
``participation_limit()``     ``None``: no limit on how often a device contributes
``select(...)``               uniform sample of ``clients_per_round`` eligible devices
``configure_client(...)``     the scenario's client settings, no clipping
``aggregate(...)``            abstract: new flat parameters from the round's :class:`UpdateBatch`
``privacy_event(round=)``     ``None``: the round releases nothing that needs accounting
``state_dict()`` / ``load``   empty: strategies with server state (momentum, tree noise) override
============================  =====================================================================

Hooks take keyword-only arguments, so adding an argument later does not break a user strategy.
Randomness reaches a strategy only through the ``rng`` argument (a ``numpy.random.Generator``
derived from the run's seed and the round), so a round replayed after a crash selects the same
cohort.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from fedsim.registry import Registry
from fedsim.types import TrainConfig, UpdateBatch


@dataclass(frozen=True)
class ParticipationLimit:
    """At most ``max_participations`` contributions per device, ``min_separation`` rounds apart.

    ``min_separation`` counts the rounds strictly *between* two contributions: a device that
    contributed in round ``r`` may contribute again in round ``r + min_separation + 1`` at the
    earliest (the convention of the published Gboard DP-FTRL parameters).
    """

    max_participations: int | None = None
    min_separation: int = 0

    def __post_init__(self) -> None:
        if self.max_participations is not None and self.max_participations < 1:
            raise ValueError(f"max_participations must be >= 1, got {self.max_participations}")
        if self.min_separation < 0:
            raise ValueError(f"min_separation must be >= 0, got {self.min_separation}")


@dataclass(frozen=True)
class StrategyContext:
    """Facts about the run that a strategy may need, given once at :meth:`Strategy.setup`."""

    num_params: int
    num_rounds: int
    num_devices: int
    clients_per_round: int
    seed: int
    base_train_config: TrainConfig


class Strategy(ABC):
    """Base class of server strategies. Subclass it and implement :meth:`aggregate`.

    Class attributes
    ----------------
    name:
        Registry name (``"fedavg"``); informational for strategies loaded by import path.
    weighting:
        ``"examples"``: the engine sums ``n_i * delta_i`` (FedAvg); ``"uniform"``: it sums the
        deltas unweighted (DP strategies, whose sensitivity must not depend on data size).
    needs_individual_updates:
        Ask the engine for every accepted delta (robust aggregation); costs O(cohort x model)
        memory, so DP / streaming strategies leave it ``False``.
    """

    name: ClassVar[str] = ""
    weighting: ClassVar[Literal["examples", "uniform"]] = "examples"
    needs_individual_updates: ClassVar[bool] = False

    ctx: StrategyContext

    def setup(self, ctx: StrategyContext) -> None:
        """Called once before the first round (and again before a resume)."""
        self.ctx = ctx

    def participation_limit(self) -> ParticipationLimit | None:
        """Per-device contribution limit, enforced by devices and by the server."""
        return None

    def select(self, *, round: int, eligible: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Choose the cohort among the devices that checked in and are eligible.

        Returns sorted device ids. Default: ``clients_per_round`` uniformly without replacement,
        or everyone when fewer are eligible.
        """
        k = self.ctx.clients_per_round
        if len(eligible) <= k:
            return np.sort(eligible)
        return np.sort(rng.choice(eligible, size=k, replace=False))

    def configure_client(self, *, round: int, base: TrainConfig) -> TrainConfig:
        """Instructions for this round's clients; DP strategies set ``clip_norm`` here."""
        return base

    @abstractmethod
    def aggregate(self, *, round: int, params: torch.Tensor, batch: UpdateBatch) -> torch.Tensor:
        """Return the new flat parameter vector after this round."""

    def privacy_event(self, *, round: int) -> Any | None:
        """The privacy event (``fedsim.privacy.events``) the coming round will record, if any.

        Asked *before* the round runs, so the engine can stop a run that would exceed its budget.
        """
        return None

    def state_dict(self) -> dict[str, Any]:
        """Server-side state for checkpoints (tensors and plain Python values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")


STRATEGIES: Registry[type[Strategy]] = Registry("strategy", builtin_package="strategies")


def register_strategy(name: str, cls: type[Strategy]) -> type[Strategy]:
    """Register a strategy class under ``name`` so scenarios can say ``name = "<name>"``."""
    STRATEGIES.register(name, cls)
    return cls
