"""Privacy events, the accounting each kind of event does for itself, and the append-only ledger.

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
``ClippedCountEvent``
    The clipped-count query of adaptive clipping (Andrew et al. 2021): the noisy
    number of devices whose update norm was at most the round's clip norm, released
    in the same round as the update's event.

``max_participations`` (``k``) and ``min_separation`` (``b``, the number of
rounds strictly between two contributions of the same device) describe how
often a device can contribute. They are measured in recorded rounds: the
ledger is expected to hold exactly one event of each kind a round releases
(a round with adaptive clipping records two: the update's and the count's).

Each kind of event knows its own accounting (:class:`PrivacyEvent`): the zCDP ``rho`` of a group
of its events (:meth:`PrivacyEvent.group_rho`) and, for kinds whose guarantee is amplified beyond
``rho`` (Poisson sampling), their Renyi DP curve (:meth:`PrivacyEvent.group_rdp`). The
:class:`~fedsim.privacy.accountant.Accountant` composes whatever kinds are registered
(:func:`register_event`), so a mechanism with a new kind of event brings its accounting in the
same file. The rules of the built-in kinds are in :mod:`fedsim.privacy.accountant`'s docstring.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np

from fedsim.privacy.rdp import RDP_ORDERS, sampled_rdp_per_round
from fedsim.privacy.sensitivity import (
    exact_gaussian_weight_sum,
    max_gaussian_participations,
    prefix_cache,
)
from fedsim.validation import (
    finite_numbers,
    int_at_least,
    is_int,
    is_number,
    number_in,
    positive_number,
)

__all__ = [
    "MAX_CLIP_NORM",
    "MAX_NOISE_STD",
    "MIN_NOISE_MULTIPLIER",
    "EventGroup",
    "GaussianEvent",
    "MatrixFactorizationEvent",
    "PrivacyEvent",
    "PrivacyLedger",
    "ClippedCountEvent",
    "SampledGaussianEvent",
    "TreeAggregationEvent",
    "check_clip_norm",
    "check_event",
    "check_noise_multiplier",
    "check_noise_std",
    "common_fields",
    "event_from_dict",
    "event_kinds",
    "event_to_dict",
    "mf_sensitivity_sq",
    "register_event",
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


#: Largest clip bound ``C`` accepted. A model delta of L2 norm above it is no update a model
#: makes (the engine rejects deltas above ``[engine] max-update-norm``, 1e4 by default); larger
#: values are typos, and ``C = 1e308`` overflows the noise to ``inf``.
MAX_CLIP_NORM = 1e6
#: Largest noise standard deviation ``z * C`` accepted. With it every noise value, even summed
#: over a tree's nodes or a matrix factorization's buffers, stays many orders of magnitude inside
#: float32's range (3.4e38), so a release is never ``inf`` or ``NaN``.
MAX_NOISE_STD = 1e9


def check_clip_norm(value: Any, name: str = "clip-norm") -> float:
    """``value`` as a float in ``(0, MAX_CLIP_NORM]``, else ``ValueError`` naming ``name``."""
    c = positive_number(name, value)
    if c > MAX_CLIP_NORM:
        raise ValueError(f"{name} must be a number in (0, {MAX_CLIP_NORM:g}], got {value!r}")
    return c


def check_noise_std(
    noise_multiplier: float, clip_norm: float, names: tuple[str, str] = ("noise-multiplier", "clip-norm")
) -> float:
    """The noise standard deviation ``z * C``, which must be at most :data:`MAX_NOISE_STD`.

    ``names`` are the keys of ``z`` and ``C`` the message names.
    """
    std = float(noise_multiplier) * float(clip_norm)
    if not math.isfinite(std) or std > MAX_NOISE_STD:
        raise ValueError(
            f"{names[0]} x {names[1]} (the noise standard deviation) must be <= {MAX_NOISE_STD:g}, "
            f"got {float(noise_multiplier):g} x {float(clip_norm):g} = {std:g}"
        )
    return std


def _check_noise(event: Any) -> None:
    object.__setattr__(event, "noise_multiplier", check_noise_multiplier(event.noise_multiplier))


def _int_field(event: Any, name: str, low: int, allow_none: bool = False) -> None:
    object.__setattr__(event, name, int_at_least(name, getattr(event, name), low, optional=allow_none))


class EventGroup:
    """The events of one kind in a ledger (or a plan): how many, the distinct ones with counts,
    and, where known, all of them in order (``ordered``; ``None`` for a plan of identical events).

    ``distinct`` and ``ordered`` are the ledger's own (not copies): do not mutate them.
    """

    __slots__ = ("count", "distinct", "ordered")

    def __init__(self, count: int, distinct: Mapping[PrivacyEvent, int],
                 ordered: Sequence[PrivacyEvent] | None) -> None:
        self.count = count
        self.distinct = distinct
        self.ordered = ordered

    def with_noise(self, noise_multiplier: float) -> EventGroup:
        """The same events with every noise multiplier set to ``noise_multiplier`` (calibration)."""
        mapped: dict[PrivacyEvent, PrivacyEvent] = {
            e: dataclasses.replace(e, noise_multiplier=noise_multiplier) for e in self.distinct  # type: ignore[type-var]
        }
        distinct: dict[PrivacyEvent, int] = {}
        for event, count in self.distinct.items():
            distinct[mapped[event]] = distinct.get(mapped[event], 0) + count
        ordered = None if self.ordered is None else _Mapped(self.ordered, mapped)
        return EventGroup(self.count, distinct, ordered)


class _Mapped(Sequence):
    """``[mapping[e] for e in base]`` without building the list."""

    def __init__(self, base: Sequence, mapping: Mapping) -> None:
        self._base = base
        self._mapping = mapping

    def __len__(self) -> int:
        return len(self._base)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self._mapping[e] for e in self._base[i]]
        return self._mapping[self._base[i]]

    def __iter__(self) -> Iterator[Any]:
        return (self._mapping[e] for e in self._base)


def common_fields(group: EventGroup, fields: tuple[str, ...], kind: str) -> dict[str, Any]:
    """The values of ``fields`` that every event of ``group`` shares; ``ValueError`` if they differ
    (a run uses one participation schedule, and one mechanism configuration)."""
    params = {tuple(getattr(e, f) for f in fields) for e in group.distinct}
    if len(params) > 1:
        raise ValueError(
            f"ledger mixes {kind} events with different {', '.join(fields)}: {sorted(params, key=str)}; "
            "a run must use one participation schedule"
        )
    (values,) = params
    return dict(zip(fields, values, strict=True))


class PrivacyEvent(ABC):
    """Base class of privacy events: frozen dataclasses with a ``noise_multiplier`` field.

    A kind of event is registered under :attr:`kind` (:func:`register_event`; the ``"type"`` of its
    JSON form) and accounts for a group of its events itself:

    * :meth:`group_rho`: the zCDP ``rho`` of the group (every event of the kind in a ledger, one
      per round) and the noise multiplier they share (``None`` if they differ);
    * :meth:`group_rdp`, for kinds with :attr:`amplified` set: their Renyi DP curve at
      :data:`~fedsim.privacy.rdp.RDP_ORDERS`, tighter than ``alpha * rho`` (the accountant uses
      the smaller of the two at each order).

    The accountant adds the ``rho`` of the kinds (zCDP composes additively, Bun & Steinke 2016,
    Prop. 1.7) and their RDP curves, so a kind must give a ``rho`` valid for any other release
    composed with it. Calibration sets the noise multiplier with ``dataclasses.replace``.
    """

    #: Name of the kind: the ``"type"`` of :func:`event_to_dict`.
    kind: ClassVar[str] = ""
    #: Whether :meth:`group_rdp` gives a curve tighter than ``alpha * rho`` (privacy amplification).
    amplified: ClassVar[bool] = False

    noise_multiplier: float

    @classmethod
    @abstractmethod
    def group_rho(cls, group: EventGroup) -> tuple[float, float | None]:
        """``(rho, z)``: the zCDP ``rho`` of ``group`` and its common noise multiplier (or ``None``)."""

    @classmethod
    def group_rdp(cls, group: EventGroup) -> np.ndarray:
        """The group's RDP at :data:`~fedsim.privacy.rdp.RDP_ORDERS` (amplified kinds only)."""
        raise NotImplementedError(f"{cls.__name__} is not amplified: its accounting is its rho")

    @classmethod
    def check_groups(cls, groups: Mapping[type[PrivacyEvent], EventGroup]) -> None:
        """Refuse (``ValueError``) a ledger whose other kinds this kind's accounting relies on do
        not hold what it needs (default: it relies on none)."""
        return None


def _unamplified_rho(group: EventGroup, kind: str) -> tuple[float, float | None]:
    params = common_fields(group, ("max_participations", "min_separation"), kind)
    k, b = params["max_participations"], params["min_separation"]
    zs = {e.noise_multiplier for e in group.distinct}
    if len(zs) == 1:
        (z,) = zs
        m = max_gaussian_participations(group.count, k, b)
        return m / (2.0 * z * z), z
    ordered = group.ordered
    assert ordered is not None and len(ordered) == group.count
    weights = np.array([1.0 / (2.0 * e.noise_multiplier ** 2) for e in ordered])
    return exact_gaussian_weight_sum(weights, k, b), None


@dataclass(frozen=True)
class GaussianEvent(PrivacyEvent):
    """One round of a Gaussian sum with per-device L2 sensitivity ``C`` and no amplification.

    Accounting: ``rho = m / (2 z**2)`` with ``m = min(k, ceil(n / (b + 1)))`` (``k = n`` when
    unset); if ``z`` varies, the exact maximum of ``sum 1 / (2 z_i**2)`` over the rounds of a
    pattern allowed by ``(k, b)``.
    """

    kind: ClassVar[str] = "gaussian"

    noise_multiplier: float
    max_participations: int | None = None
    min_separation: int = 0

    def __post_init__(self) -> None:
        _check_noise(self)
        _int_field(self, "max_participations", 1, allow_none=True)
        _int_field(self, "min_separation", 0)

    @classmethod
    def group_rho(cls, group: EventGroup) -> tuple[float, float | None]:
        return _unamplified_rho(group, "GaussianEvent")


@dataclass(frozen=True)
class SampledGaussianEvent(PrivacyEvent):
    """One round of DP-FedAvg where every device is included independently with probability ``q``.

    Accounting: ``rho`` is the unamplified bound of :class:`GaussianEvent` (sampling ignored); the
    RDP curve is the subsampled Gaussian mechanism's (Opacus), composed over the rounds.
    """

    kind: ClassVar[str] = "sampled_gaussian"
    amplified: ClassVar[bool] = True

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

    @classmethod
    def group_rho(cls, group: EventGroup) -> tuple[float, float | None]:
        return _unamplified_rho(group, "SampledGaussianEvent")

    @classmethod
    def group_rdp(cls, group: EventGroup) -> np.ndarray:
        curve = np.zeros(len(RDP_ORDERS))
        for event, count in group.distinct.items():
            assert isinstance(event, SampledGaussianEvent)
            curve = curve + sampled_rdp_per_round(event.sampling_rate, event.noise_multiplier) * count
        return curve


@dataclass(frozen=True)
class TreeAggregationEvent(PrivacyEvent):
    """One round of DP-FTRL with tree aggregation (optionally restarting every ``restart_every`` rounds).

    Accounting: ``rho = S_n / (2 z**2)`` with ``S_n`` the exact worst-case sum of squared node
    counts over the first ``n`` leaves (:mod:`fedsim.privacy.sensitivity`).
    """

    kind: ClassVar[str] = "tree_aggregation"

    noise_multiplier: float
    max_participations: int
    min_separation: int
    restart_every: int | None = None

    def __post_init__(self) -> None:
        _check_noise(self)
        _int_field(self, "max_participations", 1)
        _int_field(self, "min_separation", 0)
        _int_field(self, "restart_every", 1, allow_none=True)

    @classmethod
    def group_rho(cls, group: EventGroup) -> tuple[float, float | None]:
        params = common_fields(
            group, ("noise_multiplier", "max_participations", "min_separation", "restart_every"),
            "TreeAggregationEvent",
        )
        s = prefix_cache(params["max_participations"], params["min_separation"],
                         params["restart_every"])(group.count)
        z = params["noise_multiplier"]
        return s / (2.0 * z * z), z


MF_FAMILIES = ("blt", "banded")


@functools.lru_cache(maxsize=4096)
def mf_sensitivity_sq(family: str, params: tuple[float, ...], max_participations: int,
                      min_separation: int, rounds: int) -> tuple[float, bool]:
    """``(sens^2, exact)`` of the first ``rounds`` rounds of a matrix-factorization strategy."""
    # the factorization module imports torch (the optimisers): only runs with such events need it
    from fedsim.privacy.matrix_factorization.factorization import ToeplitzFactorization

    sens = ToeplitzFactorization(family, params).sensitivity(rounds, max_participations, min_separation)
    return sens.value, sens.exact


@dataclass(frozen=True)
class MatrixFactorizationEvent(PrivacyEvent):
    """One round of DP-FTRL with a lower-triangular Toeplitz strategy ``C`` (matrix factorization).

    ``family = "blt"``: ``params`` are the strategy's decays followed by its scales;
    ``"banded"``: ``params`` are the coefficients ``c_0 = 1, c_1, ..., c_{bands-1}``. The noise
    std is ``noise_multiplier * C_clip`` on ``C x``; ``rho`` after ``n`` rounds is
    ``sens_n^2 / (2 z^2)`` with ``sens_n^2`` the worst case under ``(k, b)`` of the leading
    ``n x n`` block of ``C`` (:func:`mf_sensitivity_sq`).
    """

    kind: ClassVar[str] = "matrix_factorization"

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

    @classmethod
    def group_rho(cls, group: EventGroup) -> tuple[float, float | None]:
        params = common_fields(
            group, ("noise_multiplier", "max_participations", "min_separation", "family", "params"),
            "MatrixFactorizationEvent",
        )
        s, _ = mf_sensitivity_sq(params["family"], params["params"], params["max_participations"],
                                 params["min_separation"], group.count)
        z = params["noise_multiplier"]
        return s / (2.0 * z * z), z


@dataclass(frozen=True)
class ClippedCountEvent(PrivacyEvent):
    """The clipped-count query of one round of adaptive clipping (Andrew, Thakkar, McMahan,
    Ramaswamy, "Differentially Private Learning with Adaptive Clipping", NeurIPS 2021,
    arXiv:1905.03871).

    Every device of the round reports a bit ``b_i`` (its update norm was at most the round's clip
    norm); the server releases ``sum_i (b_i - 1/2) + N(0, (z_b / 2)**2)``. Centred bits change the
    sum by ``1/2`` when one device is added or removed, so the release is a Gaussian mechanism with
    sensitivity ``1/2`` and noise multiplier ``z_b`` (``noise_multiplier``): ``1 / (2 z_b**2)`` zCDP
    per contribution. Andrew et al.'s noise ``sigma_b`` on the count is ``z_b / 2``.

    Accounting: as :class:`GaussianEvent` under the same ``(k, b)`` as the update's events,
    ``rho = m / (2 z_b**2)`` with ``m`` the most rounds a device contributes to. With Poisson
    sampling (``sampling_rate``, DP-FedAvg) the count and the update of a round share one sample:
    together they are one sampled Gaussian mechanism with noise multiplier
    ``z = (z_u**-2 + z_b**-2)**-1/2`` (Andrew et al., Theorem 1; ``z_u`` is
    ``update_noise_multiplier``, the noise multiplier of the round's :class:`SampledGaussianEvent`).
    The RDP curve of a sampled count event is the increment that brings the round's update event
    to that joint mechanism, so the ledger's curve is the joint mechanism's, round by round; the
    accountant checks that every such count event has its update event.
    """

    kind: ClassVar[str] = "clipped_count"
    amplified: ClassVar[bool] = True

    noise_multiplier: float
    max_participations: int | None = None
    min_separation: int = 0
    sampling_rate: float | None = None
    update_noise_multiplier: float | None = None

    def __post_init__(self) -> None:
        _check_noise(self)
        _int_field(self, "max_participations", 1, allow_none=True)
        _int_field(self, "min_separation", 0)
        if (self.sampling_rate is None) != (self.update_noise_multiplier is None):
            raise ValueError("a clipped-count event gives sampling_rate and update_noise_multiplier together, or neither")
        if self.sampling_rate is not None:
            object.__setattr__(self, "sampling_rate",
                               number_in("sampling_rate", self.sampling_rate, 0.0, 1.0, low_open=True))
            object.__setattr__(self, "update_noise_multiplier",
                               check_noise_multiplier(self.update_noise_multiplier, "update_noise_multiplier"))

    def unamplified(self) -> ClippedCountEvent:
        """The same count with no amplification claimed (the cohort is known)."""
        return ClippedCountEvent(self.noise_multiplier, self.max_participations, self.min_separation)

    def update_event(self) -> SampledGaussianEvent:
        """The sampled update event of the same round (Poisson sampling only)."""
        assert self.sampling_rate is not None and self.update_noise_multiplier is not None
        return SampledGaussianEvent(self.update_noise_multiplier, self.sampling_rate,
                                    self.max_participations, self.min_separation)

    @property
    def joint_noise_multiplier(self) -> float | None:
        """``(z_u**-2 + z_b**-2)**-1/2``: the noise multiplier of the round's joint release."""
        if self.update_noise_multiplier is None:
            return None
        return (self.update_noise_multiplier ** -2 + self.noise_multiplier ** -2) ** -0.5

    @classmethod
    def group_rho(cls, group: EventGroup) -> tuple[float, float | None]:
        return _unamplified_rho(group, "ClippedCountEvent")

    @classmethod
    def group_rdp(cls, group: EventGroup) -> np.ndarray:
        """Sampled events: per event, the RDP of the round's joint sampled Gaussian minus that of
        its update alone. Unsampled ones: ``alpha * rho`` of their own group."""
        orders = np.asarray(RDP_ORDERS)
        if all(e.sampling_rate is None for e in group.distinct):  # type: ignore[attr-defined]
            return orders * cls.group_rho(group)[0]
        curve = np.zeros(len(RDP_ORDERS))
        for event, count in group.distinct.items():
            assert isinstance(event, ClippedCountEvent)
            if event.sampling_rate is None:
                curve = curve + orders / (2.0 * event.noise_multiplier ** 2) * count
                continue
            joint = sampled_rdp_per_round(event.sampling_rate, event.joint_noise_multiplier)
            alone = sampled_rdp_per_round(event.sampling_rate, event.update_noise_multiplier)
            curve = curve + np.maximum(joint - alone, 0.0) * count
        return curve

    @classmethod
    def check_groups(cls, groups: Mapping[type[PrivacyEvent], EventGroup]) -> None:
        group = groups.get(cls)
        if group is None:
            return
        needed: dict[SampledGaussianEvent, int] = {}
        for event, count in group.distinct.items():
            assert isinstance(event, ClippedCountEvent)
            if event.sampling_rate is not None:
                update = event.update_event()
                needed[update] = needed.get(update, 0) + count
        if not needed:
            return
        updates = groups.get(SampledGaussianEvent)
        have = updates.distinct if updates is not None else {}
        for update, count in needed.items():
            if have.get(update, 0) < count:
                raise ValueError(
                    f"ledger holds {count} sampled clipped-count events with sampling_rate={update.sampling_rate:g}, "
                    f"update noise {update.noise_multiplier:g} but only {have.get(update, 0)} such update events: "
                    "a sampled count is accounted jointly with its round's update"
                )


# -- the registry of kinds -----------------------------------------------------------------------
_KINDS: dict[str, type[PrivacyEvent]] = {}

E = TypeVar("E", bound=type[PrivacyEvent])


def register_event(cls: E) -> E:
    """Register an event class under its :attr:`~PrivacyEvent.kind` (usable as a decorator).

    The accountant composes the kinds in the order they were registered.
    """
    if not (isinstance(cls, type) and issubclass(cls, PrivacyEvent) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"a privacy event is a PrivacyEvent dataclass, got {cls!r}")
    if not cls.kind:
        raise ValueError(f"{cls.__name__} needs a kind (its name in the ledger's JSON)")
    existing = _KINDS.get(cls.kind)
    if existing is not None and existing is not cls:
        raise ValueError(f"privacy event kind {cls.kind!r} is already registered to {existing!r}")
    _KINDS[cls.kind] = cls
    return cls


def event_kinds() -> tuple[type[PrivacyEvent], ...]:
    """The registered event classes, in registration (= composition) order."""
    return tuple(_KINDS.values())


# the order of the built-in kinds is the order the accountant has always summed them in, so that
# reports stay bit-identical
register_event(TreeAggregationEvent)
register_event(MatrixFactorizationEvent)
register_event(GaussianEvent)
register_event(SampledGaussianEvent)
register_event(ClippedCountEvent)


def event_to_dict(event: PrivacyEvent) -> dict[str, Any]:
    """``{"type": ..., **fields}``."""
    cls = type(event)
    if _KINDS.get(cls.kind) is not cls:
        raise TypeError(f"not a registered privacy event: {event!r}")
    return {"type": cls.kind, **asdict(event)}  # type: ignore[call-overload]


def event_from_dict(data: dict[str, Any]) -> PrivacyEvent:
    """Inverse of :func:`event_to_dict`."""
    if not isinstance(data, dict) or "type" not in data:
        raise ValueError(f"an event must be a dict with a 'type' key, got {data!r}")
    fields = dict(data)
    name = fields.pop("type")
    cls = _KINDS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown event type {name!r}; expected one of {sorted(_KINDS)}")
    try:
        return cls(**fields)
    except TypeError as exc:
        raise ValueError(f"bad fields for event type {name!r}: {exc}") from None


def check_next(entries: Sequence[tuple[int, PrivacyEvent]], round: int, event: PrivacyEvent) -> None:
    """``ValueError`` unless ``event`` may follow ``entries`` for ``round``: rounds do not decrease,
    and a round holds at most one event of each kind."""
    if not entries:
        return
    last = entries[-1][0]
    if round < last:
        raise ValueError(f"rounds must be strictly increasing (for each kind of event): got round {round} after round {last}")
    if round == last:
        for r, e in reversed(entries):
            if r != round:
                break
            if type(e) is type(event):
                raise ValueError(f"rounds must be strictly increasing for each kind of event: round {round} "
                                 f"already holds a {type(event).kind} event")


def check_event(event: Any) -> None:
    """``TypeError`` unless ``event`` is an instance of a registered event class."""
    cls = type(event)
    if not isinstance(event, PrivacyEvent) or _KINDS.get(cls.kind) is not cls:
        names = ", ".join(c.__name__ for c in _KINDS.values())
        raise TypeError(f"event must be a registered privacy event ({names}), got {event!r}")


class PrivacyLedger:
    """Append-only list of ``(round, event)`` pairs with non-decreasing rounds: a round holds at
    most one event of each kind (adaptive clipping records the update's and the count's)."""

    def __init__(self) -> None:
        self._entries: list[tuple[int, PrivacyEvent]] = []
        # incremental summary used by the accountant (kept in step with _entries)
        self._by_type: dict[type, list[PrivacyEvent]] = {}
        self._distinct: dict[type, dict[PrivacyEvent, int]] = {}

    def record(self, round: int, event: PrivacyEvent) -> None:
        """Append ``event`` for ``round``; rounds must not decrease, and a round holds at most one
        event of each kind."""
        if not is_int(round):
            raise ValueError(f"round must be an integer, got {round!r}")
        check_event(event)
        check_next(self._entries, round, event)
        self._entries.append((round, event))
        self._by_type.setdefault(type(event), []).append(event)
        counts = self._distinct.setdefault(type(event), {})
        counts[event] = counts.get(event, 0) + 1

    def events(self) -> list[tuple[int, PrivacyEvent]]:
        """A copy of the recorded ``(round, event)`` pairs, in order."""
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[tuple[int, PrivacyEvent]]:
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
    def planned(cls, events: Iterable[PrivacyEvent]) -> PrivacyLedger:
        """The ledger of a planned run: ``events`` recorded for rounds ``0, 1, ...``."""
        ledger = cls()
        for round, event in enumerate(events):
            ledger.record(round, event)
        return ledger

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
