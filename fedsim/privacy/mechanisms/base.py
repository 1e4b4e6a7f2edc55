"""The :class:`Mechanism` contract, its options, its registry and how a run of it is planned.

A :class:`Mechanism` turns each round's exact sum of clipped updates ``x_t`` (every device clipped
to L2 norm ``C``, re-checked by the server, summed unweighted) into the noisy value the server may
use, and says which privacy event that release is. It owns the noise multiplier ``z``, the clip
bound ``C``, the :class:`~fedsim.privacy.noise.NoiseSource` its noise comes from, and whatever
state the noise needs between rounds. A strategy composes a mechanism with a server optimizer
(:class:`fedsim.optim.ServerOptimizer`); everything after :meth:`Mechanism.release` is
post-processing and does not change the guarantee.

Life cycle: ``setup(num_params=, num_rounds=, source=)`` once (again before a resume), then per
round, in order, ``privacy_event(round)`` *before* the round (so the engine can stop a run that
would exceed its budget) and ``release(round, clipped_sum)`` after it. ``state_dict()`` /
``load_state_dict()`` save and restore the state between rounds; the noise key is never part of
it (it is handed to :meth:`Mechanism.setup`).

Planning: :meth:`Mechanism.plan_events` gives the events a run of ``T`` rounds will record, which
the accountant turns into the run's privacy (``fedsim privacy``) and calibration bisects on
(``target-rho``, :mod:`fedsim.privacy.calibration`): the prediction is the run's accounting, by
construction. :meth:`Mechanism.describe_plan` adds what is particular to the mechanism to the
planning report.

Options: a mechanism's own settings are the fields of its :attr:`Mechanism.Options` frozen
dataclass (value checks in ``__post_init__``, messages starting with the kebab-case key). They
reach it as keywords, from a scenario's ``[strategy]`` keys and from ``fedsim privacy`` flags
(``--<key>``), with no list of them anywhere else. :func:`option` declares a field's help line and
whether it is a scenario key.

A new mechanism is one file: a subclass registered with :func:`register_mechanism` (or named by
import path, ``mechanism = "package.module:Class"``); docs/architecture.md, "How to add a
mechanism".
"""

from __future__ import annotations

import dataclasses
import math
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from fedsim.privacy.events import (
    PrivacyEvent,
    check_clip_norm,
    check_noise_multiplier,
    check_noise_std,
)
from fedsim.registry import Registry, UnknownPluginError
from fedsim.validation import int_at_least, is_number

if TYPE_CHECKING:
    import torch

    from fedsim.privacy.noise import NoiseSource

__all__ = [
    "MECHANISMS",
    "Mechanism",
    "NoOptions",
    "PlanDescription",
    "build_mechanism",
    "mechanism_class",
    "mechanism_options",
    "noise_or_target",
    "option",
    "option_fields",
    "register_mechanism",
]


def option(default: Any, help: str, *, scenario: bool = True, file: str | None = None,
           file_extra: tuple[str, ...] = ()) -> Any:
    """A field of a mechanism's ``Options`` dataclass.

    Parameters
    ----------
    default:
        The value when the option is not given.
    help:
        One line for ``fedsim privacy --help`` and the docs.
    scenario:
        Whether it is a ``[strategy]`` key of a scenario (``False``: a planning option, given to
        ``fedsim privacy`` and the constructor; a run uses the default).
    file:
        Options read together from one JSON file by ``fedsim privacy --<file> PATH`` (an object
        with exactly these keys, plus any of ``file_extra``, which are ignored) instead of a flag each.
    """
    metadata = {"help": help, "scenario": scenario, "file": file, "file_extra": tuple(file_extra)}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class NoOptions:
    """The options of a mechanism that has none."""


@dataclass(frozen=True)
class PlanDescription:
    """What a mechanism adds to the report of a planned run (``fedsim privacy``).

    Attributes
    ----------
    title:
        What the noise is, e.g. ``"tree aggregation"``.
    fields:
        Keys added to the ``--json`` object.
    rows:
        ``(name, value)`` rows of the table, shown before the privacy figures.
    tail_rows:
        Rows shown after them (noise figures that depend on the privacy, comparisons).
    long_fields:
        Keys of the ``--json`` object that are long lists (one number per band or round, e.g. a
        banded factorization's coefficients), printed only with ``--coefficients``; ``fields``
        says how long they are.
    """

    title: str
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    rows: tuple[tuple[str, str], ...] = ()
    tail_rows: tuple[tuple[str, str], ...] = ()
    long_fields: dict[str, Any] = dataclasses.field(default_factory=dict)


class Mechanism(ABC):
    """Base class of DP mechanisms on the per-round sum of clipped updates.

    Parameters
    ----------
    noise_multiplier:
        ``z``: the noise standard deviation (per round, or per tree node) is ``z * clip_norm``,
        at most :data:`~fedsim.privacy.events.MAX_NOISE_STD`.
    clip_norm:
        ``C``: the L2 bound every device's update is clipped to (the sum's sensitivity), at most
        :data:`~fedsim.privacy.events.MAX_CLIP_NORM`.
    max_participations, min_separation:
        The per-device participation limit ``(k, b)`` the accounting assumes (``k = None``: no
        limit). The engine enforces it on devices and on the server.
    **options:
        The fields of :attr:`Options`.

    Class attributes
    ----------------
    name:
        Registry name (``[strategy] mechanism = "<name>"``).
    Options:
        Frozen dataclass of the mechanism's own options (:func:`option` fields).
    correlated:
        ``True`` when a release is the increment of a noisy prefix sum whose noise is correlated
        across rounds (tree aggregation, matrix factorizations): only strategies that apply the
        increments as such (DP-FTRL) take it; ``False``: each round's release is an independent
        noisy sum (DP-FedAvg takes any such mechanism).
    accounts_for_sampling:
        Whether the mechanism takes a ``sampling_rate`` keyword and records amplified events for
        Poisson sampling of devices at that rate (DP-FedAvg's ``sampling = "poisson"`` needs one).
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    correlated: ClassVar[bool] = False
    accounts_for_sampling: ClassVar[bool] = False

    #: The Poisson sampling rate the mechanism accounts for (``None``: none; only mechanisms with
    #: :attr:`accounts_for_sampling` take one).
    sampling_rate: float | None = None

    def __init__(
        self,
        *,
        noise_multiplier: float,
        clip_norm: float,
        max_participations: int | None = None,
        min_separation: int = 0,
        **options: Any,
    ) -> None:
        self.noise_multiplier = check_noise_multiplier(noise_multiplier, "noise-multiplier")
        self.clip_norm = check_clip_norm(clip_norm)
        check_noise_std(self.noise_multiplier, self.clip_norm)
        self.max_participations = int_at_least("max-participations", max_participations, 1, optional=True)
        self.min_separation = int_at_least("min-separation", min_separation, 0)
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(self.Options)})
        if unknown:
            raise TypeError(
                f"{type(self).__name__} takes no option {unknown[0]!r}; its options: "
                + (", ".join(f.name for f in dataclasses.fields(self.Options)) or "(none)")
            )
        self.options = self.Options(**options)
        self.source: NoiseSource | None = None
        self.num_params = 0
        self.num_rounds = 0

    @property
    def std(self) -> float:
        """Noise standard deviation per coordinate on a sum, ``z * C``."""
        return self.noise_multiplier * self.clip_norm

    def setup(self, *, num_params: int, num_rounds: int, source: NoiseSource) -> None:
        """Size the mechanism and give it its noise source; resets its state."""
        from fedsim.privacy.noise import NoiseSource  # torch: only a run that draws noise needs it

        if not isinstance(source, NoiseSource):
            raise TypeError(f"a mechanism's noise comes from a NoiseSource, got {type(source).__name__}")
        self.num_params = int_at_least("num_params", num_params, 1)
        self.num_rounds = int_at_least("num_rounds", num_rounds, 1)
        self.source = source

    def require_setup(self) -> NoiseSource:
        """The noise source, or ``RuntimeError`` before :meth:`setup`."""
        if self.source is None:
            raise RuntimeError(f"{type(self).__name__}: setup() must be called before release()")
        return self.source

    def restarts_at(self, round: int) -> bool:
        """Does ``round`` start a fresh segment (a strategy's server momentum restarts with it)?"""
        return False

    @abstractmethod
    def privacy_event(self, round: int) -> PrivacyEvent:
        """The event the release of ``round`` records (asked before the round runs)."""

    @abstractmethod
    def release(self, round: int, clipped_sum: torch.Tensor) -> torch.Tensor:
        """This round's noisy sum of clipped updates (for correlated noise: its increment)."""

    # -- planning ---------------------------------------------------------------------------------
    def plan_events(self, num_rounds: int) -> list[PrivacyEvent]:
        """The events a run of ``num_rounds`` rounds records, in order (default: each round's
        :meth:`privacy_event`, asked without :meth:`setup`). Does not change the mechanism."""
        return [self.privacy_event(t) for t in range(num_rounds)]

    @classmethod
    def check_plan(cls, num_rounds: int, *, options: Any, max_participations: int | None,
                   min_separation: int) -> None:
        """Refuse a plan of ``num_rounds`` rounds that cannot mean what was asked (``ValueError``
        starting with the key at fault), before the mechanism is built for it (``fedsim privacy``).
        A run clamps what it can; a plan asks for exactness. ``options`` is an :attr:`Options`.
        Default: every plan a mechanism can be built for is fine."""
        return None

    def describe_plan(self, num_rounds: int, rho: float) -> PlanDescription:
        """What the planning report adds for this mechanism, for a run of ``num_rounds`` rounds at
        the current noise multiplier, whose accounting gives ``rho``."""
        return PlanDescription(title=self.name or type(self).__name__)

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """State between rounds (tensors and plain values; never the noise key)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")


#: Registered mechanisms by name (``[strategy] mechanism = "<name>"``); the built-ins register
#: themselves when :mod:`fedsim.privacy.mechanisms` is first imported.
MECHANISMS: Registry[type[Mechanism]] = Registry("mechanism", builtin_package="fedsim.privacy.mechanisms")


def register_mechanism(name: str, cls: type[Mechanism]) -> type[Mechanism]:
    """Register a mechanism class under ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, Mechanism)):
        raise TypeError(f"a mechanism is a Mechanism subclass, got {cls!r}")
    if not (isinstance(cls.Options, type) and dataclasses.is_dataclass(cls.Options)):
        raise TypeError(f"{cls.__name__}.Options must be a dataclass")
    MECHANISMS.register(name, cls)
    return cls


def mechanism_class(name: Any) -> type[Mechanism]:
    """The mechanism registered as ``name``, or named by import path (``package.module:Class``).

    ``ValueError`` naming the key ``mechanism`` and the registered names otherwise.
    """
    known = ", ".join(repr(n) for n in MECHANISMS.names())
    if not isinstance(name, str):
        raise ValueError(f"mechanism must be one of {known}, got {name!r}")
    if name not in MECHANISMS.names() and ":" not in name:
        raise ValueError(f"mechanism must be one of {known}, got {name!r}")
    try:
        cls = MECHANISMS.get(name)
    except UnknownPluginError as exc:
        raise ValueError(f"mechanism {name!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Mechanism)):
        raise ValueError(f"mechanism {name!r} is not a Mechanism subclass")
    return cls


def option_fields(cls: type[Mechanism], *, scenario_only: bool = False) -> dict[str, dataclasses.Field]:
    """The :attr:`Mechanism.Options` fields of ``cls`` by name (only the scenario keys if asked)."""
    return {
        f.name: f for f in dataclasses.fields(cls.Options)
        if not scenario_only or f.metadata.get("scenario", True)
    }


def option_hints(cls: type[Mechanism]) -> dict[str, Any]:
    """The annotated types of ``cls``'s options (for the scenario loader's type checks)."""
    return typing.get_type_hints(cls.Options)


def _option_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def mechanism_options(name: str, options: dict[str, Any], defaults: dict[str, Any] | None = None,
                      *, among: list[type[Mechanism]] | None = None) -> dict[str, Any]:
    """The ``options`` that the mechanism ``name`` takes (fields of its ``Options``).

    An option it does not take must be left at its default (``defaults``, or else the default the
    mechanisms in ``among`` (all registered ones) declaring it give it: a tree's ``estimator``
    means nothing to another mechanism, and a scenario may keep it while switching mechanism).
    Errors name the scenario key (kebab-case).
    """
    cls = mechanism_class(name)
    accepted = option_fields(cls)
    if defaults is None:
        defaults = {}
        for other in among if among is not None else [MECHANISMS.get(n) for n in MECHANISMS.names()]:
            for key, field in option_fields(other).items():
                defaults.setdefault(key, _option_default(field))
    kwargs: dict[str, Any] = {}
    for key, value in options.items():
        if key in accepted:
            kwargs[key] = value
        elif key not in defaults or value != defaults[key]:
            raise ValueError(f"{key.replace('_', '-')} does not apply to mechanism = {name!r}")
    return kwargs


def build_mechanism(name: str, options: dict[str, Any], defaults: dict[str, Any] | None = None,
                    **common: Any) -> Mechanism:
    """The mechanism ``name`` built from a strategy's parameters.

    ``common`` (noise multiplier, clip bound, participation limit, and whatever the strategy adds,
    e.g. a sampling rate) goes to the mechanism as is, ``options`` as :func:`mechanism_options`
    filters them.
    """
    kwargs = mechanism_options(name, options, defaults)
    return mechanism_class(name)(**common, **kwargs)


def noise_or_target(noise_multiplier: Any, target_rho: Any) -> tuple[float, float | None]:
    """Validate ``noise-multiplier`` / ``target-rho`` (at most one; neither: ``z = 1``).

    Returns ``(z, target)``; with a target, ``z`` is a placeholder 1.0 until it is solved
    (:func:`fedsim.privacy.calibration.calibrate`) for the run's number of rounds.
    """
    if target_rho is None:
        z = 1.0 if noise_multiplier is None else noise_multiplier
        return check_noise_multiplier(z, "noise-multiplier"), None
    if noise_multiplier is not None:
        raise ValueError("give noise-multiplier or target-rho, not both")
    if not is_number(target_rho) or not math.isfinite(target_rho) or target_rho <= 0:
        raise ValueError(f"target-rho must be a finite number > 0, got {target_rho!r}")
    return 1.0, float(target_rho)

