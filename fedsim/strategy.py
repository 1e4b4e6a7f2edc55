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
``privacy_events(round=)``    every event the round records: ``privacy_event``'s, if any
``public_metrics(...)``       ``{}``: public values of the round for ``metrics.jsonl``
``state_dict()`` / ``load``   empty: strategies with server state (momentum, tree noise) override
============================  =====================================================================

Hooks take keyword-only arguments, so adding an argument later does not break a user strategy.
Randomness reaches a strategy only through the ``rng`` argument (a ``numpy.random.Generator``
derived from the run's seed and the round), so a round replayed after a crash selects the same
cohort.
"""

from __future__ import annotations

import contextlib
import copy
import typing
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from fedsim.optim import ServerOptimizer, ServerOptimizerParams
from fedsim.privacy.adaptive_clipping import AdaptiveClipping, check_adaptive
from fedsim.privacy.calibration import calibrate, calibrate_count_noise, count_rho
from fedsim.privacy.equivalent import Deployment, check_deployment, simulated_noise_multiplier
from fedsim.privacy.events import (
    MIN_NOISE_MULTIPLIER,
    ClippedCountEvent,
    PrivacyEvent,
    SampledGaussianEvent,
    check_clip_norm,
    check_noise_multiplier,
    check_noise_std,
)
from fedsim.privacy.mechanisms import (
    MECHANISMS,
    Mechanism,
    mechanism_class,
    mechanism_options,
    noise_or_target,
    option_fields,
)
from fedsim.privacy.noise import NoiseSource
from fedsim.registry import OpenParams, Registry
from fedsim.types import TrainConfig, UpdateBatch
from fedsim.validation import int_at_least


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
    """Facts about the run that a strategy may need, given once at :meth:`Strategy.setup`.

    ``noise`` is where privacy noise comes from: the engine gives the run's secret source (its
    key and run id). There is no fallback: a DP strategy set up without one refuses to draw noise
    (noise derived from the public seed would give no privacy).
    """

    num_params: int
    num_rounds: int
    num_devices: int
    clients_per_round: int
    seed: int
    base_train_config: TrainConfig
    noise: NoiseSource | None = None

    def noise_source(self) -> NoiseSource:
        """The run's :class:`~fedsim.privacy.noise.NoiseSource`; ``ValueError`` when none was given."""
        if self.noise is None:
            raise ValueError(
                "this strategy adds privacy noise but its StrategyContext has no noise source: pass "
                "noise=NoiseSource(NoiseKey.generate(), run_id) (noise from a public seed gives no privacy)"
            )
        return self.noise


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
    #: the deployment a DP run's noise is equivalent to (``[privacy] equivalent-cohort``; set by
    #: :meth:`MechanismStrategy.set_equivalent`), ``None``: the run's own noise
    equivalent: Deployment | None = None

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

    def privacy_events(self, *, round: int) -> tuple[Any, ...]:
        """Every privacy event the coming round records, in order (default: :meth:`privacy_event`'s,
        if any). A round may release several things (adaptive clipping: the update and the
        clipped count), each its own event of its own kind."""
        event = self.privacy_event(round=round)
        return () if event is None else (event,)

    def public_metrics(self, *, round: int, config: TrainConfig) -> dict[str, Any]:
        """Public values of the round for its ``metrics.jsonl`` row (default: none); only values
        that are public or post-processing of the round's noisy releases."""
        return {}

    def calibrated_noise_multiplier(self, *, num_rounds: int) -> float | None:
        """The noise multiplier the run will use (solved from a privacy target where the strategy
        takes one), or ``None`` (default) for a strategy that adds no noise. Called when a
        scenario loads (a target no noise reaches fails before the run) and by sweeps."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Server-side state for checkpoints (tensors and plain Python values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")


@dataclass(frozen=True)
class MechanismParams(ServerOptimizerParams, OpenParams):
    """Parameters every :class:`MechanismStrategy` has: its mechanism's and its optimizer's.

    A DP strategy's ``Params`` dataclass extends this one (``fedsim.registry``: typed plug-in
    parameters); the scenario keys are the kebab-case field names. The server optimizer's fields
    (``server_lr``, ``momentum``, ``server_optimizer``, ``beta1``, ``beta2``, ``tau``) are
    :class:`~fedsim.optim.ServerOptimizerParams`'. The options of the mechanism
    (:attr:`mechanism`) are keys too, which it does not list: they are collected into
    :attr:`~fedsim.registry.OpenParams.options` and checked by the mechanism's ``Options``.

    Attributes
    ----------
    noise_multiplier:
        ``z``: the noise standard deviation (per round, or per tree node) is ``z * clip_norm``
        (default 1 when neither it nor ``target_rho`` is given).
    target_rho:
        Instead of ``noise_multiplier``: the run's ``rho`` (zCDP); the smallest ``z`` that reaches
        it over the run's rounds under ``(k, b)`` is solved before the first round
        (:func:`fedsim.privacy.calibration.calibrate`).
    clip_norm:
        ``C``: L2 bound every client clips its delta to (sent in the round's ``TrainConfig``).
    max_participations:
        ``k``: at most this many contributions per device over the run (``None``: no limit).
    min_separation:
        ``b``: rounds strictly between two contributions of one device.
    target_quantile:
        Adaptive clipping (Andrew et al. 2021, :mod:`fedsim.privacy.adaptive_clipping`): the
        fraction ``gamma`` in ``(0, 1)`` of updates the clip norm should let through unclipped;
        ``clip_norm`` is then the initial clip norm. ``None`` (default): a fixed clip norm.
    clip_lr:
        Adaptive clipping's geometric rate (default 0.2): the clip norm changes by at most a factor
        ``exp(clip_lr)`` a round.
    count_noise_multiplier:
        ``z_b``: the clipped-count query's noise multiplier (noise std ``z_b / 2`` on the count of
        centred bits; ``1 / (2 z_b**2)`` zCDP per contribution). Needed with ``target_quantile``
        unless ``target_rho`` is given.
    count_rho_fraction:
        With ``target_rho`` and ``target_quantile``: the share of ``target_rho`` the count
        queries spend (default 0.05 when ``count_noise_multiplier`` is not given); both noise
        multipliers are solved from their shares.
    mechanism:
        The registered mechanism (:data:`fedsim.privacy.mechanisms.MECHANISMS`) that adds the
        noise, or one named by import path (``package.module:Class``); it must fit the strategy
        (:meth:`takes`).
    """

    noise_multiplier: float | None = None
    target_rho: float | None = None
    clip_norm: float = 1.0
    max_participations: int | None = None
    min_separation: int = 0
    target_quantile: float | None = None
    clip_lr: float | None = None
    count_noise_multiplier: float | None = None
    count_rho_fraction: float | None = None
    mechanism: str = "gaussian"

    #: The strategy these parameters are for, in messages.
    strategy_name: ClassVar[str] = "this strategy"
    #: Adaptive clipping's defaults: Andrew et al.'s geometric rate, the count's share of a target.
    default_clip_lr: ClassVar[float] = 0.2
    default_count_rho_fraction: ClassVar[float] = 0.05

    def __post_init__(self) -> None:
        z, _ = noise_or_target(self.noise_multiplier, self.target_rho)
        check_clip_norm(self.clip_norm)
        check_adaptive(self.target_quantile, self.clip_lr, self.count_noise_multiplier,
                       self.count_rho_fraction, self.target_rho)
        if self.target_rho is None:
            check_noise_std(z, self.clip_norm)
        int_at_least("max-participations", self.max_participations, 1, optional=True)
        int_at_least("min-separation", self.min_separation, 0)
        super().__post_init__()
        cls = mechanism_class(self.mechanism)
        if not self.takes(cls):
            taken = ", ".join(repr(n) for n in self.mechanism_names())
            raise ValueError(f"mechanism = {self.mechanism!r} does not fit {self.strategy_name}; "
                             f"it takes: {taken}")
        cls.Options(**self.mechanism_kwargs())  # the mechanism's own checks of its options

    @classmethod
    def takes(cls, mechanism: type[Mechanism]) -> bool:
        """Whether the strategy can use ``mechanism`` (default: any)."""
        return True

    @classmethod
    def mechanism_names(cls) -> list[str]:
        """The registered mechanisms the strategy takes."""
        return [n for n in MECHANISMS.names() if cls.takes(MECHANISMS.get(n))]

    @classmethod
    def option_hints(cls, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The scenario keys of the options of every mechanism the strategy takes (and of the one
        ``values`` name, when it is given by import path), with their annotated types."""
        classes = [MECHANISMS.get(n) for n in cls.mechanism_names()]
        chosen = None if values is None else values.get("mechanism")
        if isinstance(chosen, str) and chosen not in MECHANISMS.names():
            with contextlib.suppress(ValueError):  # __post_init__ says what is wrong with it
                classes.append(mechanism_class(chosen))
        hints: dict[str, Any] = {}
        for mech in classes:
            types = typing.get_type_hints(mech.Options)
            for name in option_fields(mech, scenario_only=True):
                hints.setdefault(name, types[name])
        return hints

    def mechanism_kwargs(self) -> dict[str, Any]:
        """The options that configure the mechanism (those of other mechanisms left at their
        defaults are dropped; any other is a one-line error naming the key)."""
        classes = [MECHANISMS.get(n) for n in self.mechanism_names()]
        return mechanism_options(self.mechanism, dict(self.options), among=classes)

    def mechanism_common(self) -> dict[str, Any]:
        """The keyword arguments every mechanism takes (``noise_multiplier`` is a placeholder 1.0
        when ``target_rho`` is given: :meth:`MechanismStrategy.setup` solves it)."""
        z, _ = noise_or_target(self.noise_multiplier, self.target_rho)
        return {
            "noise_multiplier": z,
            # adaptive clipping: the mechanism runs on the sum normalised by the round's clip norm
            "clip_norm": 1.0 if self.target_quantile is not None else self.clip_norm,
            "max_participations": self.max_participations,
            "min_separation": self.min_separation,
        }

    def build_adaptive_clipping(self) -> AdaptiveClipping | None:
        """The adaptive clipping these parameters describe, or ``None`` for a fixed clip norm."""
        if self.target_quantile is None:
            return None
        return AdaptiveClipping(
            initial_clip_norm=self.clip_norm,
            target_quantile=self.target_quantile,
            clip_lr=self.default_clip_lr if self.clip_lr is None else self.clip_lr,
            count_noise_multiplier=self.count_noise_multiplier,
        )

    def count_fraction(self) -> float | None:
        """The share of ``target_rho`` the count queries get (``None``: none solved)."""
        if self.target_quantile is None or self.target_rho is None or self.count_noise_multiplier is not None:
            return None
        return self.default_count_rho_fraction if self.count_rho_fraction is None else float(self.count_rho_fraction)

    def build_mechanism(self, **extra: Any) -> Mechanism:
        """The mechanism these parameters describe (``extra``: what the strategy adds, e.g. a
        sampling rate)."""
        return mechanism_class(self.mechanism)(**self.mechanism_common(), **self.mechanism_kwargs(), **extra)


class MechanismStrategy(Strategy):
    """A DP strategy: a :class:`~fedsim.privacy.mechanisms.Mechanism` and a server optimizer.

    Each round, the mechanism releases the noisy (for correlated noise: the increment of the
    noisy prefix) sum of the clipped deltas; the strategy divides it by the fixed
    :attr:`denominator` and the :class:`~fedsim.optim.ServerOptimizer` takes a step with it.
    Everything after the release is post-processing: the guarantee is the mechanism's.
    Subclasses call :meth:`compose` in ``__init__`` with their :class:`MechanismParams` and
    mechanism; with ``target_rho`` set, the noise multiplier is solved from that zCDP target
    (``target-rho``) for the run's number of rounds at :meth:`setup`.

    With ``target-quantile`` (adaptive clipping, :mod:`fedsim.privacy.adaptive_clipping`) each
    round's clip norm is :attr:`clip_norm`; the mechanism (built with ``C = 1``) releases the noisy
    sum of the deltas divided by it, scaled back; the round then releases its noisy clipped count
    (a second event, :meth:`privacy_events`) and moves the clip norm. With ``target-rho`` the
    count queries' share is taken off the target before the noise multiplier is solved.

    Deployment-equivalent noise (``[privacy] equivalent-cohort = N``, :meth:`set_equivalent`,
    :mod:`fedsim.privacy.equivalent`): the noise multiplier ``z`` (given or solved) is the
    deployment's with ``N`` clients per round; the mechanism adds noise of std ``z C n / N`` to the
    sum of the run's ``n`` (:attr:`denominator`) clients, so each averaged update carries the
    deployment's noise ``z C / N``. The run's own events (its ``rho``) are those of the multiplier
    ``z n / N`` it used; :meth:`equivalent_events` gives the deployment's events of each round.
    With adaptive clipping the clipped count is scaled the same way: its noise multiplier ``z_b``
    (given or solved from its share of ``target-rho``) is the deployment's, the run adds noise of
    std ``(z_b / 2) n / N`` to its count of ``n`` centred bits and accounts for it at ``z_b n / N``.
    """

    weighting: ClassVar[Literal["examples", "uniform"]] = "uniform"

    mechanism: Mechanism
    optimizer: ServerOptimizer
    target_rho: float | None = None
    #: adaptive clipping (set by :meth:`compose`), or ``None``: a fixed clip norm
    adaptive: AdaptiveClipping | None = None
    #: the deployment this run's noise is equivalent to (``None``: the run's own noise)
    equivalent: Deployment | None = None
    #: the deployment's noise multiplier ``z`` (after :meth:`setup`, with :attr:`equivalent`)
    deployment_noise_multiplier: float | None = None
    #: the fewest devices that fill the deployment's cohort under ``(k, b)`` (with :attr:`equivalent`)
    deployment_min_population: int | None = None
    #: the deployment's clipped-count noise multiplier ``z_b`` (adaptive clipping with :attr:`equivalent`)
    deployment_count_noise_multiplier: float | None = None
    _equivalent_events: list[PrivacyEvent] | None = None

    def compose(self, params: MechanismParams, mechanism: Mechanism) -> None:
        """Set :attr:`params`, the ``mechanism``, the server optimizer and, with
        ``target-quantile``, the adaptive clipping from ``params`` (called by a subclass's
        ``__init__``)."""
        self.params = params
        self.target_rho = None if params.target_rho is None else float(params.target_rho)
        self.mechanism = mechanism
        self.optimizer = params.build_server_optimizer()
        self.adaptive = params.build_adaptive_clipping()

    def count_noise_multiplier(self, *, num_rounds: int) -> float | None:
        """The clipped-count query's noise multiplier ``z_b`` (solved from its share of
        ``target-rho`` where that is how it is given), ``None`` without adaptive clipping."""
        if self.adaptive is None:
            return None
        fraction = self.params.count_fraction()
        if fraction is None:
            return self.adaptive.count_noise_multiplier
        assert self.target_rho is not None
        try:
            return calibrate_count_noise(fraction * self.target_rho, num_rounds=num_rounds,
                                         max_participations=self.mechanism.max_participations,
                                         min_separation=self.mechanism.min_separation)
        except ValueError as exc:
            raise ValueError(f"count-rho-fraction = {fraction:g} of target-rho = {self.target_rho:g}: {exc}") from None

    def update_target_rho(self, *, num_rounds: int) -> float | None:
        """The part of ``target-rho`` the update's mechanism is calibrated to: all of it, or what
        the clipped-count queries leave (``ValueError`` naming the key when they leave nothing)."""
        if self.target_rho is None:
            return None
        zb = self.count_noise_multiplier(num_rounds=num_rounds)
        if zb is None:
            return self.target_rho
        spent = count_rho(zb, num_rounds=num_rounds, max_participations=self.mechanism.max_participations,
                          min_separation=self.mechanism.min_separation)
        left = self.target_rho - spent
        if not left > 0.0 or left < 1e-12 * self.target_rho:
            raise ValueError(
                f"count-noise-multiplier = {zb:g}: the clipped-count queries spend rho = {spent:.4g} over "
                f"{num_rounds} rounds, all of target-rho = {self.target_rho:g}, leaving nothing for the updates; "
                "raise count-noise-multiplier or give count-rho-fraction instead"
            )
        return left

    def calibrated_noise_multiplier(self, *, num_rounds: int) -> float:
        """The run's noise multiplier: the mechanism's, or solved from ``target-rho`` (less the
        clipped-count queries' share with adaptive clipping)."""
        if self.target_rho is None:
            return self.mechanism.noise_multiplier
        target = self.update_target_rho(num_rounds=num_rounds)
        assert target is not None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # an unreachable k is reported by the accountant's users
                z = calibrate(self.mechanism, target, num_rounds=num_rounds)
            names = ("the solved noise-multiplier", "clip-norm")
            check_noise_std(z, self.params.clip_norm if self.adaptive is not None else self.mechanism.clip_norm, names)
            return z
        except ValueError as exc:
            raise ValueError(f"target-rho = {self.target_rho:g} over {num_rounds} rounds: {exc}") from None

    def set_equivalent(self, deployment: Deployment | None, *, clients_per_round: int, num_rounds: int) -> None:
        r"""Make the run's noise the deployment's per client (``None``: the run's own noise).

        Checks the deployment against the run (:func:`fedsim.privacy.equivalent.check_deployment`:
        a cohort smaller than ``clients_per_round``, a population that cannot supply it, Poisson
        sampling without a population are ``ValueError``\ s naming the key).
        """
        if deployment is None:
            self.equivalent = None
            self.deployment_min_population = None
            return
        self.deployment_min_population = check_deployment(
            deployment,
            clients_per_round=clients_per_round,
            rounds=num_rounds,
            max_participations=self.mechanism.max_participations,
            min_separation=self.mechanism.min_separation,
            poisson=self.mechanism.accounts_for_sampling and getattr(self, "sampling", None) == "poisson",
        )
        given = [("noise-multiplier", None if self.target_rho is not None else self.mechanism.noise_multiplier)]
        if self.adaptive is not None and self.params.count_fraction() is None:
            given.append(("count-noise-multiplier", self.adaptive.count_noise_multiplier))
        for key, z in given:
            if z is None:
                continue
            scaled = simulated_noise_multiplier(z, clients_per_round, deployment.cohort)
            try:
                check_noise_multiplier(scaled, key)
            except ValueError:
                raise ValueError(
                    f"{key} = {z:g} scaled to the simulation ({z:g} x clients-per-round {clients_per_round} / "
                    f"equivalent-cohort {deployment.cohort}) is {scaled:.3g}, below the smallest noise multiplier "
                    f"fedsim adds, {MIN_NOISE_MULTIPLIER:g}; raise {key} or lower equivalent-cohort"
                ) from None
        self.equivalent = deployment

    def deployment_mechanism(self, noise_multiplier: float) -> Mechanism:
        """The mechanism of the deployment (:attr:`equivalent`): this one's configuration at the
        deployment's ``noise_multiplier`` and, with Poisson sampling, its sampling rate ``N / P``.
        Used only to plan the deployment's events; it never releases anything."""
        if self.equivalent is None:
            raise RuntimeError("deployment_mechanism() needs an equivalent deployment (set_equivalent)")
        deployed = copy.copy(self.mechanism)
        deployed.noise_multiplier = float(noise_multiplier)
        if self.mechanism.sampling_rate is not None:
            deployed.sampling_rate = self.equivalent.sampling_rate
        return deployed

    def equivalent_event(self, *, round: int) -> PrivacyEvent | None:
        """The deployment's update event for ``round`` (after :meth:`setup`), ``None`` without
        :attr:`equivalent`; :meth:`equivalent_events` gives all of the round's events."""
        events = self.equivalent_events(round=round)
        return events[0] if events else None

    def equivalent_events(self, *, round: int) -> tuple[PrivacyEvent, ...]:
        """Every privacy event the deployment (:attr:`equivalent`) records for ``round``, as the
        run records its own (:meth:`privacy_events`): the update's and, with adaptive clipping, the
        clipped count's at the deployment's count noise multiplier ``z_b`` (joint with the update's
        under Poisson sampling, at the deployment's sampling rate). Empty without :attr:`equivalent`."""
        if self._equivalent_events is None:
            return ()
        event = self._equivalent_events[round]
        if self.adaptive is None or self.deployment_count_noise_multiplier is None:
            return (event,)
        sampled = isinstance(event, SampledGaussianEvent)
        count = ClippedCountEvent(
            self.deployment_count_noise_multiplier, self.mechanism.max_participations, self.mechanism.min_separation,
            event.sampling_rate if sampled else None, event.noise_multiplier if sampled else None,
        )
        return (event, count)

    def setup(self, ctx: StrategyContext) -> None:
        super().setup(ctx)
        if self.deployment_noise_multiplier is not None:
            # an earlier setup scaled the mechanism's multiplier to the simulation's: start again from
            # the deployment's, so that setting up twice (a resumed run) does not scale it twice
            self.mechanism.noise_multiplier = self.deployment_noise_multiplier
        if self.adaptive is not None and self.deployment_count_noise_multiplier is not None:
            self.adaptive.count_noise_multiplier = self.deployment_count_noise_multiplier
        z = self.calibrated_noise_multiplier(num_rounds=ctx.num_rounds)
        self._equivalent_events = None
        self.deployment_noise_multiplier = None
        if self.equivalent is not None:
            deployed = self.deployment_mechanism(z)
            self._equivalent_events = deployed.plan_events(ctx.num_rounds)
            self.deployment_noise_multiplier = z
            z = check_noise_multiplier(
                simulated_noise_multiplier(z, self.denominator, self.equivalent.cohort),
                "the simulated noise-multiplier (noise-multiplier x clients per round / equivalent-cohort)",
            )
        self.mechanism.noise_multiplier = z
        self.mechanism.setup(num_params=ctx.num_params, num_rounds=ctx.num_rounds, source=ctx.noise_source())
        self.optimizer.reset()
        self.deployment_count_noise_multiplier = None
        if self.adaptive is not None:
            zb = self.count_noise_multiplier(num_rounds=ctx.num_rounds)
            if self.equivalent is not None and zb is not None:
                # the count's noise std (z_b / 2) n / N on the sum of the run's n bits: the estimated
                # fraction carries the deployment's noise z_b / (2 N)
                self.deployment_count_noise_multiplier = zb
                zb = check_noise_multiplier(
                    simulated_noise_multiplier(zb, self.denominator, self.equivalent.cohort),
                    "the simulated count-noise-multiplier (count-noise-multiplier x clients per round / "
                    "equivalent-cohort)",
                )
            self.adaptive.count_noise_multiplier = zb
            self.adaptive.setup(source=ctx.noise_source(), denominator=self.denominator,
                                noise_multiplier=self.mechanism.noise_multiplier)

    # the strategy's parameters, as attributes (the mechanism and the optimizer own them)
    @property
    def noise_multiplier(self) -> float:
        return self.mechanism.noise_multiplier

    @property
    def clip_norm(self) -> float:
        """The clip norm of the coming round (adaptive clipping: the current one)."""
        return self.adaptive.clip_norm if self.adaptive is not None else self.mechanism.clip_norm

    @property
    def max_participations(self) -> int | None:
        return self.mechanism.max_participations

    @property
    def min_separation(self) -> int:
        return self.mechanism.min_separation

    @property
    def server_lr(self) -> float:
        return self.optimizer.lr

    @property
    def momentum(self) -> float:
        return self.optimizer.momentum

    @property
    def denominator(self) -> float:
        """The fixed denominator of the average (default: ``clients_per_round``)."""
        return float(self.ctx.clients_per_round)

    def configure_client(self, *, round: int, base: TrainConfig) -> TrainConfig:
        return replace(base, clip_norm=self.clip_norm)

    def privacy_event(self, *, round: int) -> Any:
        return self.mechanism.privacy_event(round)

    def privacy_events(self, *, round: int) -> tuple[Any, ...]:
        """The update's event and, with adaptive clipping, the clipped count's (joint with the
        update's under Poisson sampling)."""
        event = self.privacy_event(round=round)
        if self.adaptive is None:
            return (event,)
        sampled = isinstance(event, SampledGaussianEvent)
        count = self.adaptive.event(
            max_participations=self.mechanism.max_participations,
            min_separation=self.mechanism.min_separation,
            sampling_rate=event.sampling_rate if sampled else None,
            update_noise_multiplier=event.noise_multiplier if sampled else None,
        )
        return (event, count)

    def public_metrics(self, *, round: int, config: TrainConfig) -> dict[str, Any]:
        """With adaptive clipping, ``clip_norm``: the round's clip norm (post-processing of the
        earlier rounds' noisy counts, so public)."""
        if self.adaptive is None:
            return {}
        return {"clip_norm": config.clip_norm}

    def aggregate(self, *, round: int, params: torch.Tensor, batch: UpdateBatch) -> torch.Tensor:
        # every round releases a noisy sum, even one without accepted updates
        if self.adaptive is None:
            released = self.mechanism.release(round, batch.delta_sum)
        else:
            # the mechanism runs on the sum normalised by the round's clip norm (sensitivity 1);
            # its release is scaled back by that public clip norm
            clip = self.adaptive.clip_norm
            released = self.mechanism.release(round, batch.delta_sum / clip) * clip
            self.adaptive.update(round, below=batch.num_below_clip, reports=batch.num_updates)
        if self.mechanism.restarts_at(round):
            self.optimizer.reset()
        return self.optimizer.step(params, released / self.denominator)

    def state_dict(self) -> dict[str, Any]:
        state = {"mechanism": self.mechanism.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.adaptive is not None:
            state["adaptive_clipping"] = self.adaptive.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = {"mechanism", "optimizer"} | ({"adaptive_clipping"} if self.adaptive is not None else set())
        if set(state) != keys:
            raise ValueError(f"{self.name} state needs keys {sorted(keys)}, got {sorted(state)}")
        self.mechanism.load_state_dict(state["mechanism"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.adaptive is not None:
            self.adaptive.load_state_dict(state["adaptive_clipping"])


STRATEGIES: Registry[type[Strategy]] = Registry("strategy", builtin_package="strategies")


def register_strategy(name: str, cls: type[Strategy]) -> type[Strategy]:
    """Register a strategy class under ``name`` so scenarios can say ``name = "<name>"``."""
    STRATEGIES.register(name, cls)
    return cls
