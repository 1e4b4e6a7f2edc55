"""Noise calibration: the smallest noise multiplier that meets a zCDP budget.

For every mechanism in fedsim, ``rho`` is decreasing in the noise multiplier
``z`` (it is ``sensitivity_sq / (2 z**2)`` with a ``z``-independent
``sensitivity_sq``; see :mod:`fedsim.privacy.accountant`). The calibration
bisects on ``log z`` with the same ``rho`` expression the accountant uses, so
the returned ``z`` never overshoots the target and is within ``rel_tol`` of the
smallest such ``z``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from fedsim.privacy.conversions import validate_rho
from fedsim.privacy.events import MIN_NOISE_MULTIPLIER
from fedsim.privacy.sensitivity import (
    effective_max_participations,
    max_gaussian_participations,
    max_tree_sensitivity_sq,
)
from fedsim.validation import int_at_least

__all__ = [
    "MECHANISMS",
    "calibrate_mf_noise_multiplier",
    "calibrate_noise_multiplier",
    "sensitivity_sq",
]

MECHANISMS = ("dp-ftrl", "dp-fedavg")


def _norm_mechanism(mechanism: str) -> str:
    name = str(mechanism).replace("_", "-").lower()
    if name not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
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
    name = _norm_mechanism(mechanism)
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


def _bisect_noise(rho_of: Callable[[float], float], target_rho: float, rel_tol: float) -> float:
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


def calibrate_noise_multiplier(target_rho: float, mechanism: str = "dp-ftrl", *, rounds: int,
                               max_participations: int | None = None, min_separation: int = 0,
                               restart_every: int | None = None,
                               sampling_rate: float | None = None,
                               rel_tol: float = 1e-6) -> float:
    """Smallest noise multiplier ``z`` (within ``rel_tol`` relative) whose run ``rho`` is ``<= target_rho``.

    The mechanism parameters are those of :func:`~fedsim.privacy.accountant.dp_ftrl_privacy`
    (``mechanism="dp-ftrl"``) or :func:`~fedsim.privacy.accountant.dp_fedavg_privacy`
    (``"dp-fedavg"``; ``rho`` does not depend on ``sampling_rate``).
    """
    target = validate_rho(target_rho)
    if target == 0.0 or math.isinf(target):
        raise ValueError(f"target_rho must be a finite number > 0, got {target_rho!r}")
    if not 0.0 < rel_tol < 1.0:
        raise ValueError(f"rel_tol must be in (0, 1), got {rel_tol!r}")
    s = sensitivity_sq(mechanism, rounds=rounds, max_participations=max_participations,
                       min_separation=min_separation, restart_every=restart_every,
                       sampling_rate=sampling_rate)

    def rho_of(z: float) -> float:
        return s / (2.0 * z * z)

    return _bisect_noise(rho_of, target, rel_tol)


def calibrate_mf_noise_multiplier(target_rho: float, sensitivity_sq: float,
                                  rel_tol: float = 1e-6) -> float:
    """Smallest ``z`` (within ``rel_tol``) with ``sensitivity_sq / (2 z**2) <= target_rho``.

    For matrix-factorization DP-FTRL (:class:`~fedsim.privacy.events.MatrixFactorizationEvent`):
    ``sensitivity_sq`` is the run's worst-case squared sensitivity of the strategy, e.g. from
    :func:`~fedsim.privacy.accountant.mf_sensitivity_sq`; the bisection uses the accountant's
    ``rho`` expression, so the returned ``z`` never overshoots the target.
    """
    target = validate_rho(target_rho)
    if target == 0.0 or math.isinf(target):
        raise ValueError(f"target_rho must be a finite number > 0, got {target_rho!r}")
    if not 0.0 < rel_tol < 1.0:
        raise ValueError(f"rel_tol must be in (0, 1), got {rel_tol!r}")
    s = float(sensitivity_sq)
    if not (s > 0 and math.isfinite(s)):
        raise ValueError(f"sensitivity_sq must be a finite number > 0, got {sensitivity_sq!r}")

    def rho_of(z: float) -> float:
        return s / (2.0 * z * z)

    return _bisect_noise(rho_of, target, rel_tol)
