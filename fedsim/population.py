"""The simulated device population: availability, check-ins and participation limits.

Each round, devices *check in* according to an availability model (always, Bernoulli, or a diurnal
pattern with per-device time zones). A device that checked in is *eligible* only if its own
participation memory allows it (at most ``k`` contributions, at least ``b`` rounds strictly
between two of them): the device declines to check in otherwise. The server keeps an independent
ledger of accepted contributions and rejects any report that would violate the limit, so the
guarantee holds even if a device misbehaves. Neither check depends on sampling randomness: the
accountant uses the configured ``(k, b)``.

The per-device state is held in vectors (one entry per device) so populations of 100,000+
devices cost a few MB; all randomness is a pure function of ``(seed, round)``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from fedsim.data.federated import FederatedData
from fedsim.strategy import ParticipationLimit

_NEVER = np.iinfo(np.int64).min // 2


class ParticipationLedger:
    """Contribution counts and last contribution round for every device.

    The same class serves as the devices' own memory and as the server's ledger (two instances).
    """

    def __init__(self, num_devices: int, limit: ParticipationLimit | None) -> None:
        self.limit = limit or ParticipationLimit()
        self.count = np.zeros(num_devices, dtype=np.int64)
        self.last = np.full(num_devices, _NEVER, dtype=np.int64)

    def allowed(self, round: int, ids: np.ndarray | None = None) -> np.ndarray:
        """Boolean mask: may these devices (all, when ``ids`` is None) contribute in ``round``?"""
        count = self.count if ids is None else self.count[ids]
        last = self.last if ids is None else self.last[ids]
        ok = round - last >= self.limit.min_separation + 1
        if self.limit.max_participations is not None:
            ok &= count < self.limit.max_participations
        return ok

    def record(self, round: int, ids: np.ndarray) -> None:
        """Record one contribution in ``round`` for each device in ``ids``."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(np.unique(ids)) != len(ids):
            raise ValueError("a device can contribute at most once per round")
        self.count[ids] += 1
        self.last[ids] = round

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count.copy(), "last": self.last.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = np.asarray(state["count"], dtype=np.int64).copy()
        self.last = np.asarray(state["last"], dtype=np.int64).copy()


class Availability(ABC):
    """Which devices check in at a round (before participation limits)."""

    @abstractmethod
    def check_ins(self, round: int, num_devices: int, rng: np.random.Generator) -> np.ndarray:
        """Boolean mask of devices that check in."""


class AlwaysAvailable(Availability):
    """Every device checks in every round."""

    def check_ins(self, round: int, num_devices: int, rng: np.random.Generator) -> np.ndarray:
        return np.ones(num_devices, dtype=bool)


class BernoulliAvailability(Availability):
    """Each device checks in independently with probability ``p``."""

    def __init__(self, p: float) -> None:
        if not 0.0 < p <= 1.0:
            raise ValueError(f"check-in probability must be in (0, 1], got {p}")
        self.p = p

    def check_ins(self, round: int, num_devices: int, rng: np.random.Generator) -> np.ndarray:
        return rng.random(num_devices) < self.p


class DiurnalAvailability(Availability):
    """Check-in probability follows a day/night cycle shifted by each device's time zone.

    ``p_i(r) = mean * (1 + amplitude * cos(2 pi (r / period - phase_i)))``, clipped to [0, 1],
    with ``phase_i`` fixed per device (drawn from ``seed``): devices are most available at their
    local night-time (idle, charging, on Wi-Fi).
    """

    def __init__(self, mean: float, amplitude: float, period: int, *, num_devices: int, seed: int) -> None:
        if not 0.0 < mean <= 1.0:
            raise ValueError(f"mean check-in probability must be in (0, 1], got {mean}")
        if not 0.0 <= amplitude <= 1.0:
            raise ValueError(f"amplitude must be in [0, 1], got {amplitude}")
        if period < 1:
            raise ValueError(f"period must be >= 1, got {period}")
        self.mean, self.amplitude, self.period = mean, amplitude, period
        self.phase = np.random.default_rng([seed, 0x7135]).random(num_devices)

    def probabilities(self, round: int) -> np.ndarray:
        angle = 2 * math.pi * (round / self.period - self.phase)
        return np.clip(self.mean * (1 + self.amplitude * np.cos(angle)), 0.0, 1.0)

    def check_ins(self, round: int, num_devices: int, rng: np.random.Generator) -> np.ndarray:
        return rng.random(num_devices) < self.probabilities(round)


class Population:
    """Devices with local data, an availability model and participation memory.

    Parameters
    ----------
    data:
        Per-device local datasets.
    availability:
        Check-in model.
    limit:
        Participation limit enforced by every device (``device_memory``) and by the server
        (``server_ledger``), or ``None``.
    extra_devices:
        Devices without local data after the real ones (the audit's canary clients).
    """

    def __init__(
        self,
        data: FederatedData,
        availability: Availability,
        limit: ParticipationLimit | None,
        *,
        extra_devices: int = 0,
    ) -> None:
        self.data = data
        self.availability = availability
        self.limit = limit
        #: real devices plus ``extra_devices`` (canary clients, ids after the real ones) that check
        #: in and are limited like any device
        self.num_devices = data.num_devices + extra_devices
        self.device_memory = ParticipationLedger(self.num_devices, limit)
        self.server_ledger = ParticipationLedger(self.num_devices, limit)

    def check_in(self, round: int, rng: np.random.Generator) -> np.ndarray:
        """Sorted ids of devices that check in and whose own memory lets them contribute."""
        mask = self.availability.check_ins(round, self.num_devices, rng)
        mask &= self.device_memory.allowed(round)
        return np.flatnonzero(mask).astype(np.int64)

    def state_dict(self) -> dict[str, Any]:
        return {"device_memory": self.device_memory.state_dict(), "server_ledger": self.server_ledger.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.device_memory.load_state_dict(state["device_memory"])
        self.server_ledger.load_state_dict(state["server_ledger"])
