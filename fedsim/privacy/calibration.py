"""Noise calibration: the smallest noise multiplier whose run meets a zCDP budget.

One solver for every mechanism (:func:`calibrate`): the mechanism plans its run
(:meth:`~fedsim.privacy.mechanisms.Mechanism.plan_events`), and the accountant's own ``rho`` of
that plan as a function of the noise multiplier (:func:`~fedsim.privacy.accountant.noise_rho`) is
bisected on ``log z``, as Opacus's ``get_noise_multiplier`` drives its accountant. ``rho`` is
decreasing in ``z`` for every kind of event (a Gaussian mechanism's ``sensitivity^2 / (2 z^2)``),
so the returned ``z`` never overshoots the target and is within ``rel_tol`` of the smallest such
``z``; a run with it records exactly the planned events, so it ends at the planned ``rho``.

:func:`calibrate_noise_multiplier` and :func:`calibrate_mf_noise_multiplier` are conveniences for
scripts: they build the mechanism of a DP-FTRL (tree) or DP-FedAvg run from its parameters, or
solve ``s / (2 z^2) <= target`` for a given squared sensitivity ``s``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from fedsim.privacy.accountant import noise_rho
from fedsim.privacy.conversions import validate_rho
from fedsim.privacy.events import MIN_NOISE_MULTIPLIER, ClippedCountEvent, PrivacyLedger
from fedsim.privacy.mechanisms import GaussianSumMechanism, Mechanism, TreeAggregationMechanism
from fedsim.privacy.sensitivity import (
    effective_max_participations,
    max_gaussian_participations,
    max_tree_sensitivity_sq,
)
from fedsim.validation import int_at_least

__all__ = [
    "STRATEGY_NAMES",
    "calibrate",
    "calibrate_count_noise",
    "count_rho",
    "calibrate_mf_noise_multiplier",
    "calibrate_noise_multiplier",
    "sensitivity_sq",
]

#: The runs :func:`calibrate_noise_multiplier` and :func:`sensitivity_sq` know by name.
STRATEGY_NAMES = ("dp-ftrl", "dp-fedavg")


def _check_target(target_rho: float, rel_tol: float) -> float:
    target = validate_rho(target_rho)
    if target == 0.0 or math.isinf(target):
        raise ValueError(f"target_rho must be a finite number > 0, got {target_rho!r}")
    if not 0.0 < rel_tol < 1.0:
        raise ValueError(f"rel_tol must be in (0, 1), got {rel_tol!r}")
    return target


def bisect_noise(rho_of: Callable[[float], float], target_rho: float, rel_tol: float) -> float:
    """Smallest ``z`` (up to ``rel_tol``) with ``rho_of(z) <= target_rho``, ``rho_of`` decreasing."""
    hi = 1.0
    while rho_of(hi) > target_rho:
        hi *= 2.0
        if hi > 1e300:
            raise ValueError(f"no finite noise multiplier reaches rho <= {target_rho}")
    lo = hi / 2.0
    while rho_of(lo) <= target_rho:
        hi = lo
        lo /= 2.0
        if lo < MIN_NOISE_MULTIPLIER:
            raise ValueError(
                f"target rho {target_rho!r} is met by every noise multiplier >= {MIN_NOISE_MULTIPLIER:g}: "
                "choose a smaller target"
            )
    # invariant: rho_of(lo) > target >= rho_of(hi)
    while hi / lo - 1.0 > rel_tol:
        mid = math.sqrt(lo * hi)
        if not lo < mid < hi:
            break
        if rho_of(mid) <= target_rho:
            hi = mid
        else:
            lo = mid
    return hi


def calibrate(mechanism: Mechanism, target_rho: float, *, num_rounds: int,
              rel_tol: float = 1e-6) -> float:
    """Smallest noise multiplier (within ``rel_tol``) whose ``num_rounds``-round run of
    ``mechanism`` has ``rho <= target_rho``, by the accountant on the mechanism's planned events.

    Does not change ``mechanism`` (its noise multiplier only scales the events it plans).
    """
    target = _check_target(target_rho, rel_tol)
    rounds = int_at_least("rounds", num_rounds, 1)
    rho_of = noise_rho(PrivacyLedger.planned(mechanism.plan_events(rounds)))
    return bisect_noise(rho_of, target, rel_tol)


def _count_plan(num_rounds: int, max_participations: int | None, min_separation: int) -> PrivacyLedger:
    rounds = int_at_least("rounds", num_rounds, 1)
    return PrivacyLedger.planned([ClippedCountEvent(1.0, max_participations, min_separation)] * rounds)


def count_rho(count_noise_multiplier: float, *, num_rounds: int, max_participations: int | None,
              min_separation: int) -> float:
    """The ``rho`` of a run's clipped-count queries (adaptive clipping): ``num_rounds`` count events
    with noise multiplier ``count_noise_multiplier`` under ``(k, b)``, by the accountant."""
    return noise_rho(_count_plan(num_rounds, max_participations, min_separation))(float(count_noise_multiplier))


def calibrate_count_noise(target_rho: float, *, num_rounds: int, max_participations: int | None,
                          min_separation: int, rel_tol: float = 1e-6) -> float:
    """Smallest clipped-count noise multiplier whose ``num_rounds`` count queries under ``(k, b)``
    spend ``rho <= target_rho`` (the count's share of a run's budget)."""
    target = _check_target(target_rho, rel_tol)
    return bisect_noise(noise_rho(_count_plan(num_rounds, max_participations, min_separation)), target, rel_tol)


def _strategy_name(mechanism: str) -> str:
    name = str(mechanism).replace("_", "-").lower()
    if name not in STRATEGY_NAMES:
        raise ValueError(f"mechanism must be one of {STRATEGY_NAMES}, got {mechanism!r}")
    return name


def sensitivity_sq(mechanism: str, *, rounds: int, max_participations: int | None = None,
                   min_separation: int = 0, restart_every: int | None = None,
                   sampling_rate: float | None = None, warn: bool = True) -> int:
    """Squared L2 sensitivity (in units of ``C**2``) of a whole run, so ``rho = it / (2 z**2)``.

    ``dp-ftrl``: the exact tree-aggregation ``S`` (``max_participations`` required).
    ``dp-fedavg``: the number of rounds a device can contribute to (sampling is not
    used: this is the unamplified bound that ``rho`` reports). With ``warn`` a
    ``UserWarning`` names the effective ``max_participations`` when the requested
    one cannot be reached.
    """
    del sampling_rate  # rho is unamplified; accepted so callers can pass the run's parameters
    name = _strategy_name(mechanism)
    int_at_least("rounds", rounds, 1)
    int_at_least("min_separation", min_separation, 0)
    int_at_least("max_participations", max_participations, 1, optional=True)
    if name == "dp-ftrl":
        if max_participations is None:
            raise ValueError("dp-ftrl needs max_participations")
        if warn:
            effective_max_participations(rounds, max_participations, min_separation, warn=True)
        return max_tree_sensitivity_sq(rounds, max_participations, min_separation, restart_every)
    if restart_every is not None:
        raise ValueError("restart_every only applies to dp-ftrl")
    if warn and max_participations is not None:
        effective_max_participations(rounds, max_participations, min_separation, warn=True)
    return max_gaussian_participations(rounds, max_participations, min_separation)


def calibrate_noise_multiplier(target_rho: float, mechanism: str = "dp-ftrl", *, rounds: int,
                               max_participations: int | None = None, min_separation: int = 0,
                               restart_every: int | None = None,
                               sampling_rate: float | None = None,
                               rel_tol: float = 1e-6) -> float:
    """Smallest noise multiplier ``z`` (within ``rel_tol`` relative) whose run ``rho`` is ``<= target_rho``.

    The run is DP-FTRL with tree aggregation (``mechanism="dp-ftrl"``, the parameters of
    :func:`~fedsim.privacy.accountant.dp_ftrl_privacy`) or DP-FedAvg (``"dp-fedavg"``, those of
    :func:`~fedsim.privacy.accountant.dp_fedavg_privacy`; ``rho`` does not depend on
    ``sampling_rate``): :func:`calibrate` on the mechanism that run uses. Warns
    (``UserWarning``) when ``max_participations`` cannot be reached.
    """
    _check_target(target_rho, rel_tol)
    # the checks (and the unreachable-k warning) of the planning functions
    sensitivity_sq(mechanism, rounds=rounds, max_participations=max_participations,
                   min_separation=min_separation, restart_every=restart_every)
    if _strategy_name(mechanism) == "dp-ftrl":
        mech: Mechanism = TreeAggregationMechanism(
            noise_multiplier=1.0, clip_norm=1.0, max_participations=max_participations,
            min_separation=min_separation, restart_every=restart_every)
    else:
        mech = GaussianSumMechanism(noise_multiplier=1.0, clip_norm=1.0,
                                    max_participations=max_participations,
                                    min_separation=min_separation, sampling_rate=sampling_rate)
    return calibrate(mech, target_rho, num_rounds=rounds, rel_tol=rel_tol)


def calibrate_mf_noise_multiplier(target_rho: float, sensitivity_sq: float,
                                  rel_tol: float = 1e-6) -> float:
    """Smallest ``z`` (within ``rel_tol``) with ``sensitivity_sq / (2 z**2) <= target_rho``.

    The ``rho`` of a matrix-factorization run (:class:`~fedsim.privacy.events.MatrixFactorizationEvent`)
    whose worst-case squared sensitivity is ``sensitivity_sq`` (e.g. from
    :func:`~fedsim.privacy.accountant.mf_sensitivity_sq`); the returned ``z`` never overshoots.
    A run's mechanism is calibrated by :func:`calibrate`, which gives the same ``z``.
    """
    target = _check_target(target_rho, rel_tol)
    s = float(sensitivity_sq)
    if not (s > 0 and math.isfinite(s)):
        raise ValueError(f"sensitivity_sq must be a finite number > 0, got {sensitivity_sq!r}")

    def rho_of(z: float) -> float:
        return s / (2.0 * z * z)

    return bisect_noise(rho_of, target, rel_tol)
