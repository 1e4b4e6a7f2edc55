"""The ``ClientTrainer`` contract: local training on a device, returning a clipped delta.

A trainer is built once per run from a template model and trains many clients. The simulator
calls :meth:`ClientTrainer.train_cohort`, which may train a whole chunk of clients in one batched
computation; the Flower ClientApp calls :meth:`ClientTrainer.train_client` for its one device.
Either way the delta a client reports is clipped *on the client* when the round's
:class:`~fedsim.types.TrainConfig` sets ``clip_norm``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsim.registry import Registry
from fedsim.tasks import Task
from fedsim.types import ClientTask, CohortChunk, TrainConfig


@dataclass(frozen=True)
class ClientResult:
    """One client's report: clipped delta, number of local examples, mean local training loss and,
    when the round clips, whether the delta's norm before clipping was at most the clip norm
    (adaptive clipping's bit; ``None``: the server reads it off the clipped delta)."""

    delta: torch.Tensor
    num_examples: int
    loss: float
    below_clip: bool | None = None


class ClientTrainer(ABC):
    """Base class of client trainers.

    Parameters
    ----------
    model:
        Template module; trainers copy parameters into it (or a private copy), never keep state
        between clients.
    """

    #: The learning task (loss and metrics of the dataset's :class:`~fedsim.data.DataSpec`), set
    #: by the engine after construction; ``None``: classification with mean cross-entropy.
    objective: Task | None = None

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @abstractmethod
    def train_client(self, params: torch.Tensor, task: ClientTask, config: TrainConfig) -> ClientResult:
        """Train one client starting from the flat ``params``; return its clipped delta."""

    def train_cohort(
        self,
        params: torch.Tensor,
        tasks: Iterable[ClientTask],
        config: TrainConfig,
        *,
        chunk_size: int = 256,
    ) -> Iterator[CohortChunk]:
        """Train many clients, yielding their reports in chunks of at most ``chunk_size``.

        The default loops over :meth:`train_client`; fast trainers override it with a batched
        computation that gives the same results.
        """
        ids: list[int] = []
        deltas: list[torch.Tensor] = []
        counts: list[int] = []
        losses: list[float] = []
        bits: list[bool | None] = []
        for task in tasks:
            result = self.train_client(params, task, config)
            ids.append(task.device_id)
            deltas.append(result.delta)
            counts.append(result.num_examples)
            losses.append(result.loss)
            bits.append(result.below_clip)
            if len(ids) == chunk_size:
                yield _chunk(ids, deltas, counts, losses, config.round, bits)
                ids, deltas, counts, losses, bits = [], [], [], [], []
        if ids:
            yield _chunk(ids, deltas, counts, losses, config.round, bits)

    def describe(self) -> dict[str, str] | None:
        """Which training path runs and why (``{"path": ..., "reason": ...}``: shown at the start
        of a run and kept in ``summary.json["trainer"]``), or ``None`` (default) to say nothing."""
        return None

    def set_device(self, device: torch.device) -> torch.device:
        """Train on ``device`` (``[engine] device``) when this trainer can; return the device it
        will train on. Default: the CPU whatever was asked (a trainer that can move its work to an
        accelerator overrides this); the engine reports a run that asked for ``"cuda"`` and got
        the CPU as an error."""
        return torch.device("cpu")

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release what training holds between rounds (worker processes) at the end of a run
        (the engine calls it once; default: nothing to release)."""
        return None

    def set_private_source(self, source: Any) -> None:
        """Receive the run's secret :class:`~fedsim.privacy.noise.NoiseSource` (the engine calls it
        whenever the run is keyed). A trainer whose local training draws private randomness
        (DP-SGD noise and sampling) takes it from here in simulation; default: not needed."""
        return None

    def state_dict(self) -> dict[str, Any] | None:
        """Trainer state that a checkpoint must keep (plain values and tensors), or ``None``
        (default: trainers keep no state between rounds)."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (called only with a state the trainer returned)."""
        raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)}")

    def set_participation_bound(self, max_participations: int, basis: str) -> None:
        """Receive the most participations per device the run's configuration allows (the
        strategy's participation limit, ``basis="strategy"``, else the planned rounds,
        ``basis="rounds"``), for a data-independent :meth:`example_privacy`; default: not needed."""
        return None

    def example_privacy(self, *, delta: float | None = None) -> dict[str, Any] | None:
        """Example-level privacy figures of local training (DP-SGD trainers), else ``None``.

        Published in ``summary.json["example_level"]``, so they must not depend on the devices'
        data (their sizes, or who was sampled): a function of the configuration alone.
        ``delta`` is the scenario's ``[privacy] delta``, which the engine passes so that the
        example-level ``(epsilon, delta)`` uses the same delta as the user-level one.
        """
        return None

    def observed_example_privacy(self, *, delta: float | None = None) -> dict[str, Any] | None:
        """Example-level figures of the devices that actually trained (data-dependent), else
        ``None``: ``private/summary.json`` in a DP run, ``summary.json["example_level_observed"]``
        in a non-DP one."""
        return None


def stated_bits(bits: list[bool | None]) -> np.ndarray | None:
    """The clients' adaptive-clipping bits as an array, or ``None`` unless every client stated one."""
    if not bits or any(b is None for b in bits):
        return None
    return np.asarray(bits, dtype=bool)


def _chunk(ids: list[int], deltas: list[torch.Tensor], counts: list[int], losses: list[float], round: int,
           bits: list[bool | None] | None = None) -> CohortChunk:
    return CohortChunk(
        device_ids=np.asarray(ids, dtype=np.int64),
        deltas=torch.stack(deltas),
        num_examples=torch.tensor(counts, dtype=torch.int64),
        losses=torch.tensor(losses, dtype=torch.float32),
        rounds=np.full(len(ids), round, dtype=np.int64),
        below_clip=stated_bits(bits or []),
    )


TRAINERS: Registry[type[ClientTrainer]] = Registry("client trainer", builtin_package="clients")


def register_trainer(name: str, cls: type[ClientTrainer]) -> type[ClientTrainer]:
    """Register a trainer class so scenarios can say ``[client] trainer = "<name>"``."""
    TRAINERS.register(name, cls)
    return cls
