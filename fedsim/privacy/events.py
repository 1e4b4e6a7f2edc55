"""Privacy events and the append-only privacy ledger.

The engine records one event per training round that releases a noisy
aggregate. All events are *user-level* (device-level): the unit protected is a
whole device, whose update in a round is clipped to L2 norm ``C``, and the
noise standard deviation is ``noise_multiplier * C``.

``GaussianEvent``
    One round of a Gaussian sum over a fixed cohort, without any amplification
    (e.g. DP-FedAvg without sampling).
``SampledGaussianEvent``
    One round of DP-FedAvg with Poisson sampling of devices at rate ``q``.
``TreeAggregationEvent``
    One round (one leaf) of DP-FTRL with tree aggregation; the leaf index is
    the event's position among the ledger's tree events.
``MatrixFactorizationEvent``
    One round of DP-FTRL with a matrix-factorization strategy (a BLT or a banded
    Toeplitz matrix, :mod:`fedsim.privacy.matrix_factorization`); the round index
    is the event's position among the ledger's matrix-factorization events.

``max_participations`` (``k``) and ``min_separation`` (``b``, the number of
rounds strictly between two contributions of the same device) describe how
often a device can contribute. They are measured in recorded rounds: the
ledger is expected to hold exactly one event per training round.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from fedsim.validation import finite_numbers, int_at_least, is_int, is_number, number_in

__all__ = [
    "GaussianEvent",
    "MatrixFactorizationEvent",
    "PrivacyEvent",
    "PrivacyLedger",
    "SampledGaussianEvent",
    "TreeAggregationEvent",
    "event_from_dict",
    "event_to_dict",
]


#: Smallest noise multiplier accepted anywhere. Below it rho exceeds 5e11 (no meaningful
#: privacy) and, near 1e-154, 2 z^2 underflows to zero: refuse such values with a clear error.
MIN_NOISE_MULTIPLIER = 1e-6


def check_noise_multiplier(z: Any, name: str = "noise_multiplier") -> float:
    """``z`` as a float, finite and ``>= MIN_NOISE_MULTIPLIER``, else ``ValueError`` naming ``name``."""
    if not is_number(z) or not math.isfinite(z) or z <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {z!r}")
    if z < MIN_NOISE_MULTIPLIER:
        raise ValueError(f"{name} must be >= {MIN_NOISE_MULTIPLIER:g} (smaller gives no meaningful privacy), got {z!r}")
    return float(z)


def _check_noise(event: Any) -> None:
    object.__setattr__(event, "noise_multiplier", check_noise_multiplier(event.noise_multiplier))


def _int_field(event: Any, name: str, low: int, allow_none: bool = False) -> None:
    object.__setattr__(event, name, int_at_least(name, getattr(event, name), low, optional=allow_none))


@dataclass(frozen=True)
class GaussianEvent:
    """One round of a Gaussian sum with per-device L2 sensitivity ``C`` and no amplification."""

    noise_multiplier: float
    max_participations: int | None = None
    min_separation: int = 0

    def __post_init__(self) -> None:
        _check_noise(self)
        _int_field(self, "max_participations", 1, allow_none=True)
        _int_field(self, "min_separation", 0)


@dataclass(frozen=True)
class SampledGaussianEvent:
    """One round of DP-FedAvg where every device is included independently with probability ``q``."""

    noise_multiplier: float
    sampling_rate: float
    max_participations: int | None = None
    min_separation: int = 0

    def __post_init__(self) -> None:
        _check_noise(self)
        object.__setattr__(self, "sampling_rate", number_in("sampling_rate", self.sampling_rate, 0.0, 1.0, low_open=True))
        _int_field(self, "max_participations", 1, allow_none=True)
        _int_field(self, "min_separation", 0)

    def unamplified(self) -> GaussianEvent:
        """The same round with no amplification claimed: what it is worth when the cohort is known.

        Amplification by sampling needs the adversary not to learn who was sampled; where it
        does (a deployment that sends each sampled device a message), the round is a Gaussian
        mechanism with sensitivity ``C`` on whoever took part.
        """
        return GaussianEvent(
            self.noise_multiplier, max_participations=self.max_participations, min_separation=self.min_separation
        )


@dataclass(frozen=True)
class TreeAggregationEvent:
    """One round of DP-FTRL with tree aggregation (optionally restarting every ``restart_every`` rounds)."""

    noise_multiplier: float
    max_participations: int
    min_separation: int
    restart_every: int | None = None

    def __post_init__(self) -> None:
        _check_noise(self)
        _int_field(self, "max_participations", 1)
        _int_field(self, "min_separation", 0)
        _int_field(self, "restart_every", 1, allow_none=True)


MF_FAMILIES = ("blt", "banded")


@dataclass(frozen=True)
class MatrixFactorizationEvent:
    """One round of DP-FTRL with a lower-triangular Toeplitz strategy ``C`` (matrix factorization).

    ``family = "blt"``: ``params`` are the strategy's decays followed by its scales;
    ``"banded"``: ``params`` are the coefficients ``c_0 = 1, c_1, ..., c_{bands-1}``. The noise
    std is ``noise_multiplier * C_clip`` on ``C x``; ``rho`` after ``n`` rounds is
    ``sens_n^2 / (2 z^2)`` with ``sens_n^2`` the worst case under ``(k, b)`` of the leading
    ``n x n`` block of ``C`` (see :mod:`fedsim.privacy.accountant`).
    """

    noise_multiplier: float
    max_participations: int
    min_separation: int
    family: str
    params: tuple[float, ...]

    def __post_init__(self) -> None:
        _check_noise(self)
        _int_field(self, "max_participations", 1)
        _int_field(self, "min_separation", 0)
        if self.family not in MF_FAMILIES:
            raise ValueError(f"family must be one of {MF_FAMILIES}, got {self.family!r}")
        values = finite_numbers("params", self.params)
        if not values or (self.family == "blt" and len(values) % 2):
            raise ValueError(
                f"params of a {self.family} event must be "
                + ("decays then scales (an even count)" if self.family == "blt"
                   else "the band coefficients (at least one)")
                + f", got {len(values)} numbers"
            )
        if self.family == "banded" and values[0] != 1.0:
            raise ValueError(f"banded params must start with c_0 = 1, got {values[0]!r}")
        object.__setattr__(self, "params", tuple(values))


PrivacyEvent = GaussianEvent | SampledGaussianEvent | TreeAggregationEvent | MatrixFactorizationEvent

_EVENT_TYPES: dict[str, type] = {
    "gaussian": GaussianEvent,
    "sampled_gaussian": SampledGaussianEvent,
    "tree_aggregation": TreeAggregationEvent,
    "matrix_factorization": MatrixFactorizationEvent,
}
_TYPE_NAMES = {cls: name for name, cls in _EVENT_TYPES.items()}


def event_to_dict(event: PrivacyEvent) -> dict[str, Any]:
    """``{"type": ..., **fields}``."""
    try:
        name = _TYPE_NAMES[type(event)]
    except KeyError:
        raise TypeError(f"not a privacy event: {event!r}") from None
    return {"type": name, **asdict(event)}


def event_from_dict(data: dict[str, Any]) -> PrivacyEvent:
    """Inverse of :func:`event_to_dict`."""
    if not isinstance(data, dict) or "type" not in data:
        raise ValueError(f"an event must be a dict with a 'type' key, got {data!r}")
    fields = dict(data)
    name = fields.pop("type")
    try:
        cls = _EVENT_TYPES[name]
    except KeyError:
        raise ValueError(
            f"unknown event type {name!r}; expected one of {sorted(_EVENT_TYPES)}"
        ) from None
    try:
        return cls(**fields)
    except TypeError as exc:
        raise ValueError(f"bad fields for event type {name!r}: {exc}") from None


class PrivacyLedger:
    """Append-only list of ``(round, event)`` pairs with strictly increasing rounds."""

    def __init__(self) -> None:
        self._entries: list[tuple[int, PrivacyEvent]] = []
        # incremental summary used by the accountant (kept in step with _entries)
        self._by_type: dict[type, list[PrivacyEvent]] = {}
        self._distinct: dict[type, dict[PrivacyEvent, int]] = {}

    def record(self, round: int, event: PrivacyEvent) -> None:
        """Append ``event`` for ``round``; rounds must be strictly increasing."""
        if not is_int(round):
            raise ValueError(f"round must be an integer, got {round!r}")
        if type(event) not in _TYPE_NAMES:
            raise TypeError(
                f"event must be a GaussianEvent, SampledGaussianEvent, TreeAggregationEvent or "
                f"MatrixFactorizationEvent, got {event!r}"
            )
        if self._entries and round <= self._entries[-1][0]:
            raise ValueError(
                f"rounds must be strictly increasing: got round {round} after round "
                f"{self._entries[-1][0]}"
            )
        self._entries.append((round, event))
        self._by_type.setdefault(type(event), []).append(event)
        counts = self._distinct.setdefault(type(event), {})
        counts[event] = counts.get(event, 0) + 1

    def events(self) -> list[tuple[int, PrivacyEvent]]:
        """A copy of the recorded ``(round, event)`` pairs, in order."""
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self):
        return iter(list(self._entries))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrivacyLedger):
            return NotImplemented
        return self._entries == other._entries

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        return f"PrivacyLedger({len(self._entries)} events)"

    def events_of_type(self, cls: type) -> list[PrivacyEvent]:
        """The recorded events of one class, in order (not a copy: do not mutate)."""
        return self._by_type.get(cls, [])

    def distinct_events(self, cls: type) -> dict[PrivacyEvent, int]:
        """``{event: number of times recorded}`` for one class (not a copy: do not mutate)."""
        return self._distinct.get(cls, {})

    def to_json(self) -> list[dict[str, Any]]:
        """``[{"round": r, "event": {"type": ..., ...}}, ...]`` (JSON-serialisable)."""
        return [{"round": r, "event": event_to_dict(e)} for r, e in self._entries]

    @classmethod
    def from_json(cls, data: list[dict[str, Any]]) -> PrivacyLedger:
        """Rebuild a ledger written by :meth:`to_json` (validates everything again)."""
        if not isinstance(data, list):
            raise ValueError(f"ledger JSON must be a list, got {type(data).__name__}")
        ledger = cls()
        for i, item in enumerate(data):
            if not isinstance(item, dict) or "round" not in item or "event" not in item:
                raise ValueError(f"ledger entry {i} must be a dict with 'round' and 'event': {item!r}")
            ledger.record(item["round"], event_from_dict(item["event"]))
        return ledger
