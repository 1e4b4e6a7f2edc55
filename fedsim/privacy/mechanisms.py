"""Differential-privacy mechanisms on the sum of clipped client updates.

A :class:`Mechanism` turns each round's exact sum of clipped updates ``x_t`` (every device clipped
to L2 norm ``C``, re-checked by the server, summed unweighted) into the noisy value the server may
use, and says which privacy event that release is. It owns the noise multiplier ``z``, the clip
bound ``C``, the :class:`~fedsim.privacy.noise.NoiseSource` its noise comes from, and whatever
state the noise needs between rounds. A strategy composes a mechanism with a server optimizer
(:class:`fedsim.optim.ServerOptimizer`); everything after :meth:`Mechanism.release` is
post-processing and does not change the guarantee. A new mechanism is a new class registered in
:data:`MECHANISMS`, not a new strategy.

Life cycle: ``setup(num_params=, num_rounds=, source=)`` once (again before a resume), then per
round, in order, ``privacy_event(round)`` *before* the round (so the engine can stop a run that
would exceed its budget) and ``release(round, clipped_sum)`` after it. ``state_dict()`` /
``load_state_dict()`` save and restore the state between rounds; the noise key is never part of
it (it is handed to :meth:`Mechanism.setup`).

Built-in mechanisms
-------------------
``"gaussian"`` (:class:`GaussianSumMechanism`)
    ``x_t + N(0, (z C)^2 I)`` with fresh noise each round (the Gaussian mechanism, Dwork & Roth,
    "The Algorithmic Foundations of Differential Privacy", 2014, Thm. A.1; zCDP ``rho = 1/(2 z^2)``
    per contribution, Bun & Steinke 2016, Prop. 1.6). With Poisson sampling of devices at rate
    ``q`` it is the sampled Gaussian mechanism (Mironov, Talwar, Zhang 2019), as in DP-FedAvg
    (McMahan, Ramage, Talwar, Zhang, ICLR 2018).
``"tree"`` (:class:`TreeAggregationMechanism`)
    Tree aggregation of the prefix sums ``X_t = x_0 + ... + x_t`` (Dwork, Naor, Pitassi, Rothblum
    2010; Chan, Shi, Song 2011), as in DP-FTRL (Kairouz et al., ICML 2021): the noisy prefix is
    ``X_t + N_t`` with ``N_t`` from :class:`~fedsim.privacy.tree_noise.TreeNoise`, and
    :meth:`~TreeAggregationMechanism.release` returns the per-round increment
    ``(X_t + N_t) - (X_{t-1} + N_{t-1}) = x_t + N_t - N_{t-1}`` (the previous prefix is zero at a
    tree restart), so that the increments' running sum is exactly the noisy prefix. The run is a
    Gaussian mechanism with sensitivity ``C sqrt(S)`` (``fedsim.privacy.sensitivity``); the
    accountant records :class:`~fedsim.privacy.events.TreeAggregationEvent` s.

Guarantee: user-level (adding or removing all of one device's data), under the participation
limit ``(k, b)`` the mechanism is given (at most ``k`` contributions, ``b`` rounds strictly
between two), provided the clip bound is enforced; see each class.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

import torch

from fedsim.privacy.calibration import calibrate_noise_multiplier
from fedsim.privacy.events import (
    GaussianEvent,
    PrivacyEvent,
    SampledGaussianEvent,
    TreeAggregationEvent,
    check_noise_multiplier,
)
from fedsim.privacy.noise import TAG_ROUND, NoiseSource
from fedsim.privacy.tree_noise import TreeNoise
from fedsim.registry import Registry
from fedsim.validation import choice, int_at_least, is_number, number_in, positive_number

__all__ = [
    "MECHANISMS",
    "GaussianSumMechanism",
    "Mechanism",
    "TreeAggregationMechanism",
    "build_mechanism",
    "mechanism_options",
    "noise_or_target",
    "register_mechanism",
]


class Mechanism(ABC):
    """Base class of DP mechanisms on the per-round sum of clipped updates.

    Parameters
    ----------
    noise_multiplier:
        ``z``: the noise standard deviation (per round, or per tree node) is ``z * clip_norm``.
    clip_norm:
        ``C``: the L2 bound every device's update is clipped to (the sum's sensitivity).
    max_participations, min_separation:
        The per-device participation limit ``(k, b)`` the accounting assumes (``k = None``: no
        limit). The engine enforces it on devices and on the server.
    """

    name: ClassVar[str] = ""

    def __init__(
        self,
        *,
        noise_multiplier: float,
        clip_norm: float,
        max_participations: int | None = None,
        min_separation: int = 0,
    ) -> None:
        self.noise_multiplier = check_noise_multiplier(noise_multiplier, "noise-multiplier")
        self.clip_norm = positive_number("clip-norm", clip_norm)
        self.max_participations = int_at_least("max-participations", max_participations, 1, optional=True)
        self.min_separation = int_at_least("min-separation", min_separation, 0)
        self.source: NoiseSource | None = None
        self.num_params = 0
        self.num_rounds = 0

    @property
    def std(self) -> float:
        """Noise standard deviation per coordinate on a sum, ``z * C``."""
        return self.noise_multiplier * self.clip_norm

    def setup(self, *, num_params: int, num_rounds: int, source: NoiseSource) -> None:
        """Size the mechanism and give it its noise source; resets its state."""
        if not isinstance(source, NoiseSource):
            raise TypeError(f"a mechanism's noise comes from a NoiseSource, got {type(source).__name__}")
        self.num_params = int_at_least("num_params", num_params, 1)  # type: ignore[assignment]
        self.num_rounds = int_at_least("num_rounds", num_rounds, 1)  # type: ignore[assignment]
        self.source = source

    def _require_setup(self) -> NoiseSource:
        if self.source is None:
            raise RuntimeError(f"{type(self).__name__}: setup() must be called before release()")
        return self.source

    def restarts_at(self, round: int) -> bool:
        """Does ``round`` start a fresh segment (a strategy's server momentum restarts with it)?"""
        return False

    def calibrate(self, target_rho: float, *, num_rounds: int) -> float:
        """The smallest noise multiplier whose run of ``num_rounds`` rounds reaches ``target_rho``.

        Uses the planning code (:mod:`fedsim.privacy.calibration`) with this mechanism's
        participation limit; does not change the mechanism.
        """
        raise ValueError(f"target-rho is not supported by mechanism {self.name!r}")

    @abstractmethod
    def privacy_event(self, round: int) -> PrivacyEvent:
        """The event the release of ``round`` records (asked before the round runs)."""

    @abstractmethod
    def release(self, round: int, clipped_sum: torch.Tensor) -> torch.Tensor:
        """This round's noisy sum of clipped updates (for correlated noise: its increment)."""

    def state_dict(self) -> dict[str, Any]:
        """State between rounds (tensors and plain values; never the noise key)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")


class GaussianSumMechanism(Mechanism):
    """``x_t + N(0, (z C)^2 I)``, fresh noise each round (a pure function of the key and ``t``).

    Parameters
    ----------
    sampling_rate:
        ``q`` when devices are Poisson-sampled at that rate (the event is then a
        :class:`~fedsim.privacy.events.SampledGaussianEvent`); ``None``: a fixed cohort, no
        amplification claimed (:class:`~fedsim.privacy.events.GaussianEvent`).

    Guarantee: per round, a Gaussian mechanism with L2 sensitivity ``C``; with Poisson sampling,
    the sampled Gaussian mechanism, which needs the sampling to be random and hidden.
    """

    name = "gaussian"

    def __init__(
        self,
        *,
        noise_multiplier: float,
        clip_norm: float,
        max_participations: int | None = None,
        min_separation: int = 0,
        sampling_rate: float | None = None,
    ) -> None:
        super().__init__(
            noise_multiplier=noise_multiplier,
            clip_norm=clip_norm,
            max_participations=max_participations,
            min_separation=min_separation,
        )
        self.sampling_rate = (
            None if sampling_rate is None else number_in("sampling-rate", sampling_rate, 0.0, 1.0, low_open=True)
        )

    def privacy_event(self, round: int) -> GaussianEvent | SampledGaussianEvent:
        if self.sampling_rate is not None:
            return SampledGaussianEvent(
                self.noise_multiplier,
                self.sampling_rate,
                max_participations=self.max_participations,
                min_separation=self.min_separation,
            )
        return GaussianEvent(
            self.noise_multiplier, max_participations=self.max_participations, min_separation=self.min_separation
        )

    def calibrate(self, target_rho: float, *, num_rounds: int) -> float:
        return calibrate_noise_multiplier(
            target_rho,
            "dp-fedavg",
            rounds=num_rounds,
            max_participations=self.max_participations,
            min_separation=self.min_separation,
        )

    def noise(self, round: int) -> torch.Tensor:
        """The noise of ``round``: ``N(0, (z C)^2 I)`` from words ``(TAG_ROUND, round)``."""
        source = self._require_setup()
        if round < 0:
            raise ValueError(f"round must be >= 0, got {round}")
        out = source.normal((TAG_ROUND, int(round)), self.num_params)
        std = self.std
        return out.mul_(std) if std != 1.0 else out

    def release(self, round: int, clipped_sum: torch.Tensor) -> torch.Tensor:
        return clipped_sum + self.noise(round)


class TreeAggregationMechanism(Mechanism):
    """Tree-aggregation noise on the prefix sums; releases the per-round increments.

    Parameters
    ----------
    estimator:
        ``"efficient"`` (Honaker's lower-variance estimate, same privacy) or ``"vanilla"``.
    restart_every:
        Restart the tree every ``E`` rounds (rounds ``0, E, 2E, ...``), or ``None``.

    ``max_participations`` must be given (the tree's sensitivity depends on ``k``).
    Rounds must be released in order; restore a saved state to replay one (a replayed round adds
    bit-for-bit the same noise, as every node's noise is a pure function of the key and node).
    """

    name = "tree"

    def __init__(
        self,
        *,
        noise_multiplier: float,
        clip_norm: float,
        max_participations: int | None = 1,
        min_separation: int = 0,
        estimator: Literal["vanilla", "efficient"] = "efficient",
        restart_every: int | None = None,
    ) -> None:
        super().__init__(
            noise_multiplier=noise_multiplier,
            clip_norm=clip_norm,
            max_participations=int_at_least("max-participations", max_participations, 1),
            min_separation=min_separation,
        )
        self.restart_every = int_at_least("restart-every", restart_every, 1, optional=True)
        self.estimator: Literal["vanilla", "efficient"] = choice(  # type: ignore[assignment]
            "estimator", estimator, ("vanilla", "efficient")
        )
        self.tree: TreeNoise | None = None
        self.prev_noise: torch.Tensor | None = None

    def setup(self, *, num_params: int, num_rounds: int, source: NoiseSource) -> None:
        super().setup(num_params=num_params, num_rounds=num_rounds, source=source)
        self.tree = TreeNoise(
            self.num_params, self.std, source, estimator=self.estimator, restart_every=self.restart_every
        )
        self.prev_noise = torch.zeros(self.num_params, dtype=torch.float32)

    @property
    def next_round(self) -> int:
        """The round :meth:`release` expects next."""
        return 0 if self.tree is None else self.tree.next_round

    def restarts_at(self, round: int) -> bool:
        """Does ``round`` start a new tree (round 0 or a multiple of ``restart_every``)?"""
        return round == 0 or (self.restart_every is not None and round % self.restart_every == 0)

    def calibrate(self, target_rho: float, *, num_rounds: int) -> float:
        return calibrate_noise_multiplier(
            target_rho,
            "dp-ftrl",
            rounds=num_rounds,
            max_participations=self.max_participations,
            min_separation=self.min_separation,
            restart_every=self.restart_every,
        )

    def privacy_event(self, round: int) -> TreeAggregationEvent:
        return TreeAggregationEvent(
            self.noise_multiplier,
            max_participations=self.max_participations,
            min_separation=self.min_separation,
            restart_every=self.restart_every,
        )

    def release(self, round: int, clipped_sum: torch.Tensor) -> torch.Tensor:
        """``x_t + N_t - N_{t-1}``: the increment of the noisy prefix sum of the segment."""
        self._require_setup()
        tree, prev = self.tree, self.prev_noise
        assert tree is not None and prev is not None
        if round != tree.next_round:
            raise ValueError(
                f"the tree mechanism expects round {tree.next_round}, got {round}; "
                "to replay a round, restore the strategy state saved before it"
            )
        if tree.is_restart(round):
            prev.zero_()
        noise = tree.step(round)
        out = clipped_sum + (noise - prev)
        self.prev_noise = noise.clone()
        return out

    def state_dict(self) -> dict[str, Any]:
        assert self.tree is not None and self.prev_noise is not None, "setup() must be called first"
        return {"tree": self.tree.state_dict(), "prev_noise": self.prev_noise.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.tree is None:
            raise RuntimeError("setup() must be called before load_state_dict()")
        if set(state) != {"tree", "prev_noise"}:
            raise ValueError(f"tree mechanism state needs keys ['prev_noise', 'tree'], got {sorted(state)}")
        self.tree.load_state_dict(state["tree"])
        prev = torch.as_tensor(state["prev_noise"], dtype=torch.float32).clone()
        if prev.shape != (self.num_params,):
            raise ValueError("tree mechanism state is malformed: prev_noise has the wrong shape")
        self.prev_noise = prev


#: Registered mechanisms by name (``[strategy] mechanism = "<name>"``).
MECHANISMS: Registry[type[Mechanism]] = Registry("mechanism")


def noise_or_target(noise_multiplier: Any, target_rho: Any) -> tuple[float, float | None]:
    """Validate ``noise-multiplier`` / ``target-rho`` (at most one; neither: ``z = 1``).

    Returns ``(z, target)``; with a target, ``z`` is a placeholder 1.0 until it is solved
    (:meth:`Mechanism.calibrate`) for the run's number of rounds.
    """
    if target_rho is None:
        z = 1.0 if noise_multiplier is None else noise_multiplier
        return check_noise_multiplier(z, "noise-multiplier"), None
    if noise_multiplier is not None:
        raise ValueError("give noise-multiplier or target-rho, not both")
    if not is_number(target_rho) or not math.isfinite(target_rho) or target_rho <= 0:
        raise ValueError(f"target-rho must be a finite number > 0, got {target_rho!r}")
    return 1.0, float(target_rho)


def mechanism_options(name: str, options: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The ``options`` that the registered mechanism ``name`` takes (its constructor's keywords).

    Each option the mechanism does not take must be left at its value in ``defaults`` (a tree's
    ``estimator`` means nothing to another mechanism); errors name the scenario key (kebab-case).
    """
    if not isinstance(name, str) or name not in MECHANISMS.names():
        known = ", ".join(repr(n) for n in MECHANISMS.names())
        raise ValueError(f"mechanism must be one of {known}, got {name!r}")
    accepted = set(inspect.signature(MECHANISMS.get(name).__init__).parameters)
    kwargs: dict[str, Any] = {}
    for key, value in options.items():
        if key in accepted:
            kwargs[key] = value
        elif value != defaults.get(key):
            raise ValueError(f"{key.replace('_', '-')} does not apply to mechanism = {name!r}")
    return kwargs


def build_mechanism(name: str, options: dict[str, Any], defaults: dict[str, Any], **common: Any) -> Mechanism:
    """The registered mechanism ``name`` built from a strategy's parameters.

    ``common`` (noise multiplier, clip bound, participation limit) goes to every mechanism,
    ``options`` as :func:`mechanism_options` filters them.
    """
    kwargs = mechanism_options(name, options, defaults)
    return MECHANISMS.get(name)(**common, **kwargs)


def register_mechanism(name: str, cls: type[Mechanism]) -> type[Mechanism]:
    """Register a mechanism class under ``name``."""
    MECHANISMS.register(name, cls)
    return cls


register_mechanism("gaussian", GaussianSumMechanism)
register_mechanism("tree", TreeAggregationMechanism)

# the matrix-factorization mechanisms register "blt" and "banded" (a plain import: it works
# whichever of the two modules is imported first)
import fedsim.privacy.mf_mechanisms  # noqa: E402,F401
