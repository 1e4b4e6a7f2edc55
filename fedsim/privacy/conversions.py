"""Conversions from zero-concentrated DP (``rho``-zCDP) to ``(epsilon, delta)``-DP.

All mechanisms accounted by fedsim are (compositions of) Gaussian mechanisms, and
a composition of Gaussian mechanisms with total zCDP ``rho`` is itself exactly a
single Gaussian mechanism with ``mu = sensitivity / sigma = sqrt(2 rho)``
(Dong, Roth & Su, "Gaussian Differential Privacy", JRSS-B 2022, Corollary 3.3).
Three conversions are offered:

``epsilon_from_rho``
    The tight one: the exact privacy profile of that Gaussian mechanism
    (Balle & Wang, "Improving the Gaussian Mechanism for Differential Privacy:
    Analytical Calibration and Optimal Denoising", ICML 2018, Theorem 8),
    ``delta(eps) = Phi(-eps/mu + mu/2) - exp(eps) * Phi(-eps/mu - mu/2)``,
    solved for ``eps``.

``epsilon_rdp_from_rho``
    The Renyi-DP route used for published DP-FTRL figures: a ``rho``-zCDP
    mechanism has RDP ``rho * alpha`` at every order ``alpha > 1`` (Bun & Steinke,
    "Concentrated Differential Privacy", TCC 2016, arXiv:1605.02065), and
    ``eps = min_alpha rho*alpha + log((alpha-1)/alpha) - (log(delta) + log(alpha))/(alpha-1)``
    (Canonne, Kamath & Steinke, "The Discrete Gaussian for Differential
    Privacy", NeurIPS 2020, Proposition 12; also Balle et al. 2020,
    "Hypothesis Testing Interpretations and Renyi Differential Privacy"),
    minimised over continuous ``alpha``.

``epsilon_naive_from_rho``
    The classic bound ``rho + 2 sqrt(rho log(1/delta))`` (Bun & Steinke 2016,
    Proposition 1.3), kept for comparison with older write-ups.

For the Gboard es-ES DP-FTRL model (``rho = 0.806``, ``delta = 1e-10``) these give
8.53, 8.90 and 9.42 respectively.
"""

from __future__ import annotations

import math

from scipy import optimize, special

__all__ = [
    "epsilon_from_rho",
    "epsilon_naive_from_rho",
    "epsilon_rdp_from_rho",
    "gaussian_delta",
    "validate_delta",
    "validate_rho",
]


def validate_rho(rho: float) -> float:
    """Return ``rho`` as a float or raise ``ValueError`` unless it is a finite number >= 0."""
    try:
        value = float(rho)
    except (TypeError, ValueError):
        raise ValueError(f"rho must be a number >= 0, got {rho!r}") from None
    if not value >= 0 or math.isnan(value):
        raise ValueError(f"rho must be >= 0, got {rho!r}")
    return value


def validate_delta(delta: float) -> float:
    """Return ``delta`` as a float or raise ``ValueError`` unless ``0 < delta < 1``."""
    try:
        value = float(delta)
    except (TypeError, ValueError):
        raise ValueError(f"delta must be a number in (0, 1), got {delta!r}") from None
    if not 0.0 < value < 1.0:
        raise ValueError(f"delta must be in the open interval (0, 1), got {delta!r}")
    return value


def _log_sub(log_a: float, log_b: float) -> float:
    """``log(exp(log_a) - exp(log_b))`` for ``log_a >= log_b``."""
    if log_b == -math.inf:
        return log_a
    if log_b >= log_a:
        return -math.inf
    return log_a + math.log1p(-math.exp(log_b - log_a))


def _log_gaussian_delta(epsilon: float, mu: float) -> float:
    return _log_sub(
        float(special.log_ndtr(-epsilon / mu + mu / 2.0)),
        epsilon + float(special.log_ndtr(-epsilon / mu - mu / 2.0)),
    )


def gaussian_delta(epsilon: float, mu: float) -> float:
    """Exact ``delta(epsilon)`` of the Gaussian mechanism with ``mu = sensitivity / sigma``.

    Balle & Wang (2018), Theorem 8.
    """
    if mu <= 0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    return math.exp(_log_gaussian_delta(float(epsilon), float(mu)))


def epsilon_from_rho(rho: float, delta: float) -> float:
    """Smallest ``epsilon >= 0`` such that a ``rho``-zCDP Gaussian mechanism is ``(epsilon, delta)``-DP.

    Uses the exact Gaussian privacy profile with ``mu = sqrt(2 rho)`` (Balle & Wang
    2018); returns ``inf`` for ``rho = inf``.
    """
    rho = validate_rho(rho)
    delta = validate_delta(delta)
    if rho == 0.0:
        return 0.0
    if math.isinf(rho):
        return math.inf
    mu = math.sqrt(2.0 * rho)
    log_delta = math.log(delta)

    def gap(eps: float) -> float:
        return _log_gaussian_delta(eps, mu) - log_delta

    if gap(0.0) <= 0.0:
        return 0.0
    # delta(eps) is decreasing; the naive zCDP bound always satisfies it, so it brackets
    hi = max(1e-12, epsilon_naive_from_rho(rho, delta))
    while gap(hi) > 0.0:  # defensive, should not happen
        hi *= 2.0
    return float(optimize.brentq(gap, 0.0, hi, xtol=1e-13, rtol=4 * 2.0**-52, maxiter=500))


def epsilon_naive_from_rho(rho: float, delta: float) -> float:
    """``rho + 2 sqrt(rho log(1/delta))`` (Bun & Steinke 2016, Proposition 1.3)."""
    rho = validate_rho(rho)
    delta = validate_delta(delta)
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def _rdp_epsilon_at(alpha: float, rho: float, log_delta: float) -> float:
    return (
        rho * alpha
        + math.log1p(-1.0 / alpha)
        - (log_delta + math.log(alpha)) / (alpha - 1.0)
    )


def epsilon_rdp_from_rho(rho: float, delta: float) -> float:
    """``min_{alpha > 1} rho*alpha + log((alpha-1)/alpha) - (log delta + log alpha)/(alpha-1)``.

    RDP of order ``alpha`` for ``rho``-zCDP is ``rho * alpha``; the conversion is
    Canonne, Kamath & Steinke (2020), Proposition 12. The minimum is taken over
    continuous ``alpha`` (bounded Brent search on ``log(alpha - 1)``), clipped at 0.
    """
    rho = validate_rho(rho)
    delta = validate_delta(delta)
    if rho == 0.0:
        return 0.0
    if math.isinf(rho):
        return math.inf
    log_delta = math.log(delta)

    def objective(u: float) -> float:
        return _rdp_epsilon_at(1.0 + math.exp(u), rho, log_delta)

    # the optimum sits near alpha - 1 = sqrt(log(1/delta) / rho)
    guess = 0.5 * (math.log(-log_delta + 1.0) - math.log(rho))
    lo, hi = min(guess - 8.0, -30.0), max(guess + 8.0, 30.0)
    res = optimize.minimize_scalar(
        objective, bounds=(lo, hi), method="bounded", options={"xatol": 1e-10, "maxiter": 500}
    )
    best = min(float(res.fun), objective(guess))
    return max(0.0, best)
