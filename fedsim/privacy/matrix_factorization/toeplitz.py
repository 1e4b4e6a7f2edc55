"""Lower-triangular Toeplitz matrices: algebra, prefix-sum error and worst-case sensitivity.

Every strategy matrix in :mod:`fedsim.privacy.matrix_factorization` is lower-triangular Toeplitz
with coefficients ``c_0 = 1, c_1, c_2, ...``; then ``C^-1`` and ``B = A C^-1`` are Toeplitz too,
``C^-1`` with coefficients ``r`` (``r = 1 / c`` as power series) and ``B`` with the partial sums
``R_m = r_0 + ... + r_m``. This module is numpy only (the accountant uses it).

Sensitivity under ``(k, b)`` participation
------------------------------------------
A device contributes at most ``k`` times, with at least ``b`` rounds strictly between two
contributions (``min_sep = b + 1`` in jax_privacy's convention). Its contributions change ``C x``
by ``sum_{i in P} C[:, i] u_i`` with ``||u_i|| <= C_clip``. When ``C^T C >= 0`` entrywise the worst
case is ``u_i`` all equal, so ``sens^2 = max_P 1_P^T C^T C 1_P`` (in units of ``C_clip^2``), and
``rho = sens^2 / (2 z^2)``-zCDP (Bun & Steinke 2016, Proposition 1.6).

* For Toeplitz coefficients that are non-negative and non-increasing the maximising pattern is
  ``0, min_sep, 2 min_sep, ...`` with ``min(k, ceil(T / min_sep))`` participations
  (Kalinin & Lampert, arXiv:2405.13763; arXiv:2408.08868, Section 3): **exact**.
* For a banded strategy with ``bands <= min_sep`` two contributions touch disjoint rows, so
  ``sens^2`` is the largest sum of squared column norms over allowed patterns, any signs; for a
  Toeplitz band the column norms do not increase, so it is again the pattern above: **exact**.
* Otherwise :func:`toeplitz_sensitivity_sq` returns an **upper bound**:
  ``max_P sum_{i in P} (|G_ii| + (k - 1) max_{|j - i| >= min_sep} |G_ij|)`` over allowed patterns
  (``G = C^T C``), which dominates ``sum_{i, j in P} |G_ij|`` and hence every pattern; above
  :data:`GRAM_LIMIT` rounds the cruder ``k_eff^2 ||c||^2`` (triangle inequality over the columns).

:func:`brute_force_sensitivity_sq` enumerates every pattern for small ``T`` (the tests' reference).

Error
-----
The noise on prefix ``t`` has per-coordinate variance ``sigma^2 sum_{m <= t} R_m^2``;
:func:`prefix_variances` returns these sums (``sigma = 1``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from fedsim.validation import int_at_least

__all__ = [
    "GRAM_LIMIT",
    "Sensitivity",
    "brute_force_sensitivity_sq",
    "effective_participations",
    "inverse_coefs",
    "prefix_variances",
    "toeplitz_gram",
    "toeplitz_matrix",
    "toeplitz_sensitivity_sq",
]


def effective_participations(num_rounds: int, max_participations: int, min_separation: int) -> int:
    """``min(k, ceil(T / (b + 1)))``: how many contributions fit in ``T`` rounds."""
    t = int_at_least("num_rounds", num_rounds, 1)
    k = int_at_least("max_participations", max_participations, 1)
    b = int_at_least("min_separation", min_separation, 0)
    return min(k, -(-t // (b + 1)))


def toeplitz_matrix(coefs: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    """The ``n x n`` lower-triangular Toeplitz matrix with first column ``coefs`` (padded with 0)."""
    c = np.zeros(n, dtype=np.float64)
    src = np.asarray(coefs, dtype=np.float64)[:n]
    c[: src.size] = src
    idx = np.arange(n)
    diff = idx[:, None] - idx[None, :]
    out = np.where(diff >= 0, c[np.clip(diff, 0, n - 1)], 0.0)
    return out


def inverse_coefs(coefs: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    """First ``n`` coefficients of ``1 / c(x)`` (the first column of ``C^-1``); ``c_0`` must be non-zero.

    Exact forward substitution ``r_m = -(sum_{j=1}^{m} c_j r_{m-j}) / c_0`` in float64.
    """
    c = np.zeros(n, dtype=np.float64)
    src = np.asarray(coefs, dtype=np.float64)[:n]
    c[: src.size] = src
    if c[0] == 0:
        raise ValueError("the first Toeplitz coefficient must be non-zero")
    nz = np.flatnonzero(c[1:]) + 1
    width = int(nz.max()) if nz.size else 0
    r = np.zeros(n, dtype=np.float64)
    r[0] = 1.0 / c[0]
    band = c[1: width + 1][::-1]  # c_width .. c_1
    for m in range(1, n):
        lo = max(0, m - width)
        r[m] = -np.dot(band[width - (m - lo):], r[lo:m]) / c[0]
    return r


def prefix_variances(noise_coefs: np.ndarray) -> np.ndarray:
    """Per-step prefix-sum noise variance ``sum_{m <= t} R_m^2`` (``R`` = partial sums of ``C^-1``'s column)."""
    partial = np.cumsum(np.asarray(noise_coefs, dtype=np.float64))
    return np.cumsum(partial * partial)


@dataclass(frozen=True)
class Sensitivity:
    """Squared L2 sensitivity (units of ``C_clip^2``) and whether it is exact or an upper bound."""

    value: float
    exact: bool


def _pattern_vector(c: np.ndarray, n: int, k_eff: int, sep: int) -> np.ndarray:
    v = np.zeros(n, dtype=np.float64)
    for p in range(k_eff):
        start = p * sep
        if start >= n:
            break
        v[start:] += c[: n - start]
    return v


def toeplitz_sensitivity_sq(coefs: Sequence[float] | np.ndarray, num_rounds: int,
                            max_participations: int, min_separation: int) -> Sensitivity:
    """Worst-case ``sens^2`` of the ``T x T`` lower-triangular Toeplitz strategy under ``(k, b)``.

    Exact for non-negative non-increasing coefficients and for bands ``<= b + 1``; otherwise the
    upper bound of the module docstring (``exact=False``).
    """
    n = int_at_least("num_rounds", num_rounds, 1)
    k_eff = effective_participations(n, max_participations, min_separation)
    sep = int(min_separation) + 1
    c = np.zeros(n, dtype=np.float64)
    src = np.asarray(coefs, dtype=np.float64)[:n]
    c[: src.size] = src
    if not np.all(np.isfinite(c)):
        raise ValueError("Toeplitz coefficients must be finite")
    nz = np.flatnonzero(c)
    bands = int(nz.max()) + 1 if nz.size else 0
    monotone = bool(np.all(c >= 0) and np.all(np.diff(c) <= 0))
    if monotone or bands <= sep:
        v = _pattern_vector(c, n, k_eff, sep)
        return Sensitivity(float(np.dot(v, v)), True)
    if n > GRAM_LIMIT:  # ||sum_{p in P} C[:, p]|| <= k_eff max column norm = k_eff ||c||
        return Sensitivity(float(k_eff * k_eff * np.dot(c, c)), False)
    gram = np.abs(toeplitz_gram(c))
    far = np.abs(np.arange(n)[:, None] - np.arange(n)[None, :]) >= sep
    off = np.where(far, gram, 0.0).max(axis=1) if n > sep else np.zeros(n)
    weights = np.diag(gram) + (k_eff - 1) * off
    return Sensitivity(_best_separated_sum(weights, k_eff, sep), False)


#: Above this many rounds the upper bound uses ``k_eff^2 ||c||^2`` instead of the ``T x T`` Gram matrix.
GRAM_LIMIT = 4096


def toeplitz_gram(c: np.ndarray) -> np.ndarray:
    """``C^T C`` of a lower-triangular Toeplitz ``C`` in ``O(T^2)``.

    ``(C^T C)_{i, i+l} = sum_{m=0}^{T-1-i-l} c_m c_{m+l}``: one cumulative sum per lag ``l``.
    """
    n = c.size
    gram = np.zeros((n, n), dtype=np.float64)
    rows = np.arange(n)
    for lag in range(n):
        tail = np.cumsum(c[: n - lag] * c[lag:])[::-1]  # index i -> sum up to m = n-1-lag-i
        gram[rows[: n - lag], rows[: n - lag] + lag] = tail
    return np.triu(gram) + np.triu(gram, 1).T


def _best_separated_sum(weights: np.ndarray, k: int, sep: int) -> float:
    """``max sum(weights[P])`` over ``|P| <= k`` positions at least ``sep`` apart (weights >= 0)."""
    n = weights.size
    prev = np.zeros(n)
    best = 0.0
    for _ in range(k):
        shifted = np.zeros(n)
        if n > sep:
            shifted[sep:] = prev[: n - sep]
        cur = np.maximum.accumulate(weights + shifted)
        best = max(best, float(cur[-1]))
        prev = cur
    return best


def _patterns(n: int, k: int, sep: int) -> Iterator[tuple[int, ...]]:
    def rec(start: int, pts: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
        if pts:
            yield pts
        if len(pts) == k:
            return
        for p in range(start, n):
            yield from rec(p + sep, pts + (p,))

    yield from rec(0, ())


def brute_force_sensitivity_sq(matrix: np.ndarray, max_participations: int,
                               min_separation: int) -> float:
    """``max_P 1_P^T C^T C 1_P`` over every pattern allowed by ``(k, b)`` (``T <= 24``).

    The exact ``sens^2`` when ``C^T C >= 0`` entrywise (then equal contributions are worst).
    Exponential in ``T``: the tests' reference for :func:`toeplitz_sensitivity_sq`.
    """
    mat = np.asarray(matrix, dtype=np.float64)
    n = mat.shape[1]
    if n > 24:
        raise ValueError(f"brute force is limited to 24 columns, got {n}")
    k = int_at_least("max_participations", max_participations, 1)
    sep = int_at_least("min_separation", min_separation, 0) + 1
    best = 0.0
    for pts in _patterns(n, k, sep):
        v = mat[:, list(pts)].sum(axis=1)
        best = max(best, float(v @ v))
    return best
