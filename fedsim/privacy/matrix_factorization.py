"""Matrix-factorization DP-FTRL: buffered linear Toeplitz (BLT) and banded Toeplitz strategies.

The mechanism
-------------
DP-FTRL releases the prefix sums ``A x`` of the rounds' sums of clipped updates ``x_0 .. x_{T-1}``
(``A`` the lower-triangular all-ones matrix). The matrix mechanism factors ``A = B C`` with a
lower-triangular *strategy* ``C``, releases ``C x + sigma xi`` (``xi`` i.i.d. standard normal,
``sigma = z C_clip``) and post-processes it with ``B = A C^-1``: the noisy prefix sums are
``A x + sigma B xi`` and the per-round increments ``x_t + sigma (C^-1 xi)_t`` (Denisov, McMahan,
Rush, Smith, Thakurta, NeurIPS 2022; Choquette-Choo et al., ICML 2023). Every strategy here is
lower-triangular *Toeplitz* with coefficients ``c_0 = 1, c_1, c_2, ...``; then ``C^-1`` and ``B``
are Toeplitz too, ``C^-1`` with coefficients ``r`` (``r = 1 / c`` as power series) and ``B`` with
the partial sums ``R_m = r_0 + ... + r_m``.

* **BLT** (Dvijotham, McMahan, Pillutla, Steinke, Thakurta, arXiv:2404.16706; McMahan, Xu et al.,
  "A Hassle-free Algorithm for Private Learning in Practice: Don't Use Tree Aggregation, Use
  BLTs", arXiv:2408.08868): ``c_k = sum_j s_j d_j^(k-1)`` for ``k >= 1`` with decays
  ``d_j in (0, 1)`` and output scales ``s_j > 0``. ``C^-1 y`` is computed online with one buffer
  per decay (arXiv:2408.08868, Algorithm 3)::

      x_t = y_t - sum_j s_j buf_j ;   buf_j <- d_j buf_j + x_t

  so the server holds ``buffers x model`` numbers whatever ``T`` is. The inverse is again a BLT
  (arXiv:2404.16706, Lemma 5.2): its decays are the eigenvalues ``l_j`` of
  ``diag(d) - sqrt(s) sqrt(s)^T`` and its scales ``-(U^T sqrt(s))_j^2`` (``U`` the eigenvectors),
  a symmetric form of ``diag(d) - 1 s^T`` (the state matrix of the inverse recursion).
* **Banded** (Choquette-Choo, McMahan, Rush, Thakurta, "(Amplified) Banded Matrix Factorization",
  arXiv:2306.08153): ``c_k = 0`` for ``k >= bands``; ``C^-1 y`` needs the last ``bands - 1``
  outputs: ``x_t = y_t - sum_{m=1}^{bands-1} c_m x_{t-m}``.

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
  4096 rounds the cruder ``k_eff^2 ||c||^2`` (triangle inequality over the columns).

:func:`brute_force_sensitivity_sq` enumerates every pattern for small ``T`` (the tests' reference).

Error
-----
The noise on prefix ``t`` has per-coordinate variance ``sigma^2 sum_{m <= t} R_m^2``;
:func:`prefix_variances` returns these sums (``sigma = 1``). Strategies are optimised for
``error x sens^2`` (max or mean over ``t``), which is invariant to scaling ``C``.

Optimisation
------------
:func:`optimize_blt` and :func:`optimize_banded` minimise ``log(error) + log(sens^2)`` plus small
log-barrier penalties (decays in ``(0, 1)``, inverse decays ``> 0``, separated decays,
``sum(s) < 1`` so the coefficients stay non-increasing and the exact sensitivity applies) with
scipy's L-BFGS-B on float64 torch autograd gradients, from fixed starting points: the result is a
deterministic function of ``(T, k, b, buffers or bands, error)``, cached in-process.

Noise streams
-------------
:class:`BLTNoise` and :class:`BandedNoise` draw ``xi_t = source.normal((TAG, t), P)`` for round
``t`` from a :class:`fedsim.privacy.noise.NoiseSource`-like object, so the noise is a pure function
of (secret key, round) and a replay from saved state is bit-identical. The BLT buffers are float64:
decays within ``1e-8`` of one (e.g. ``1 - 1.2e-10`` at the Gboard parameters) are not representable
in float32. Banded history is kept in float32 (``bands - 1`` model-sized vectors).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from fedsim.validation import finite_numbers, int_at_least, number_at_least

__all__ = [
    "BLT",
    "TAG_BANDED",
    "TAG_BLT",
    "BLTNoise",
    "BandedNoise",
    "MFStrategy",
    "OptimizationError",
    "Sensitivity",
    "banded_init_coefs",
    "banded_strategy",
    "blt_strategy",
    "brute_force_sensitivity_sq",
    "effective_participations",
    "inverse_coefs",
    "optimize_banded",
    "optimize_blt",
    "prefix_variances",
    "strategy_coefs",
    "toeplitz_matrix",
    "toeplitz_sensitivity_sq",
]

#: Domain-separation words of the noise streams (``source.normal((TAG, round), n)``).
TAG_BLT = 0x424C5400  # "BLT\0"
TAG_BANDED = 0x42414E44  # "BAND"

ErrorKind = Literal["max", "mean"]


class OptimizationError(ValueError):
    """The strategy optimisation did not converge to a valid strategy."""


class _TorchThreads:
    """Run small float64 autograd graphs on one intra-op thread, restoring the setting afterwards.

    The graphs of the optimisers are tiny (``T x buffers``); more threads only add
    synchronisation (about 4x slower on two busy cores).
    """

    def __enter__(self) -> None:
        self._saved = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self._saved)


# -- participation -------------------------------------------------------------------------------
def effective_participations(num_rounds: int, max_participations: int, min_separation: int) -> int:
    """``min(k, ceil(T / (b + 1)))``: how many contributions fit in ``T`` rounds."""
    t = int_at_least("num_rounds", num_rounds, 1)
    k = int_at_least("max_participations", max_participations, 1)
    b = int_at_least("min_separation", min_separation, 0)
    return min(k, -(-t // (b + 1)))


# -- Toeplitz algebra ----------------------------------------------------------------------------
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
    if n > _GRAM_LIMIT:  # ||sum_{p in P} C[:, p]|| <= k_eff max column norm = k_eff ||c||
        return Sensitivity(float(k_eff * k_eff * np.dot(c, c)), False)
    gram = np.abs(_toeplitz_gram(c))
    far = np.abs(np.arange(n)[:, None] - np.arange(n)[None, :]) >= sep
    off = np.where(far, gram, 0.0).max(axis=1) if n > sep else np.zeros(n)
    weights = np.diag(gram) + (k_eff - 1) * off
    return Sensitivity(_best_separated_sum(weights, k_eff, sep), False)


#: Above this many rounds the upper bound uses ``k_eff^2 ||c||^2`` instead of the ``T x T`` Gram matrix.
_GRAM_LIMIT = 4096


def _toeplitz_gram(c: np.ndarray) -> np.ndarray:
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


def _patterns(n: int, k: int, sep: int):
    def rec(start: int, pts: tuple[int, ...]):
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


# -- BLT -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BLT:
    """A buffered linear Toeplitz matrix: ``t_0 = 1``, ``t_k = sum_j scales_j decays_j^(k-1)``.

    A *strategy* BLT has ``decays`` in ``(0, 1)`` and ``scales > 0`` (:meth:`check_strategy`);
    its :meth:`inverse` (the noise-correlating matrix) has negative scales.
    """

    decays: tuple[float, ...]
    scales: tuple[float, ...]

    def __post_init__(self) -> None:
        d = finite_numbers("decays", self.decays)
        s = finite_numbers("scales", self.scales)
        if not d or len(d) != len(s):
            raise ValueError(
                f"decays and scales must be non-empty and of equal length, got {len(d)} and {len(s)}"
            )
        object.__setattr__(self, "decays", d)
        object.__setattr__(self, "scales", s)

    @property
    def num_buffers(self) -> int:
        return len(self.decays)

    def check_strategy(self) -> BLT:
        """``self`` if every decay is in ``(0, 1)`` and every scale ``> 0``, else ``ValueError``."""
        for i, d in enumerate(self.decays):
            if not 0.0 < d < 1.0:
                raise ValueError(f"decays[{i}] must be in the open interval (0, 1), got {d!r}")
        for i, s in enumerate(self.scales):
            if not s > 0.0:
                raise ValueError(f"scales[{i}] must be > 0, got {s!r}")
        return self

    def coefs(self, n: int) -> np.ndarray:
        """The first ``n`` Toeplitz coefficients ``t_0 .. t_{n-1}`` (float64)."""
        d = np.asarray(self.decays)
        s = np.asarray(self.scales)
        out = np.empty(n, dtype=np.float64)
        out[0] = 1.0
        if n > 1:
            powers = np.arange(n - 1, dtype=np.float64)[:, None]
            out[1:] = (s * np.exp(powers * np.log(d)) if np.all(d > 0)
                       else s * np.power(d, powers)).sum(axis=1)
        return out

    def inverse(self) -> BLT:
        """The BLT of ``C^-1`` (arXiv:2404.16706, Lemma 5.2), by a symmetric eigendecomposition.

        Needs ``scales >= 0``: ``diag(d) - 1 s^T`` is similar to ``diag(d) - q q^T`` with
        ``q = sqrt(s)``, whose eigenvalues are the inverse decays; the inverse scales are
        ``-(U^T q)^2``.
        """
        s = np.asarray(self.scales)
        if np.any(s < 0):
            raise ValueError("inverse() needs non-negative scales")
        q = np.sqrt(s)
        lam, vec = np.linalg.eigh(np.diag(self.decays) - np.outer(q, q))
        w = -(vec.T @ q) ** 2
        order = np.argsort(lam)[::-1]
        return BLT(tuple(lam[order]), tuple(w[order]))

    def inverse_coefs(self, n: int) -> np.ndarray:
        """First column of ``C^-1`` by the streaming recursion on a unit impulse (float64)."""
        d = np.asarray(self.decays)
        s = np.asarray(self.scales)
        buf = np.zeros_like(d)
        out = np.empty(n, dtype=np.float64)
        for t in range(n):
            x = (1.0 if t == 0 else 0.0) - float(s @ buf)
            buf = d * buf + x
            out[t] = x
        return out

    def to_dict(self) -> dict[str, list[float]]:
        return {"decays": list(self.decays), "scales": list(self.scales)}


def strategy_coefs(family: str, params: Sequence[float], n: int) -> np.ndarray:
    """Toeplitz coefficients of a strategy given by the flat parameters of a privacy event.

    ``family = "blt"``: ``params`` = decays followed by scales; ``"banded"``: ``c_0 .. c_{bands-1}``.
    """
    p = np.asarray(params, dtype=np.float64)
    if family == "blt":
        if p.size % 2 or p.size == 0:
            raise ValueError(f"blt parameters must be decays then scales, got {p.size} numbers")
        half = p.size // 2
        return BLT(tuple(p[:half]), tuple(p[half:])).coefs(n)
    if family == "banded":
        out = np.zeros(n, dtype=np.float64)
        out[: min(n, p.size)] = p[:n]
        return out
    raise ValueError(f"unknown matrix-factorization family {family!r}; expected 'blt' or 'banded'")


# -- optimisation --------------------------------------------------------------------------------
_BARRIER = 1e-7


def _log(x: torch.Tensor) -> torch.Tensor:
    return torch.log(torch.clamp(x, min=1e-300))


def _error_torch(r: torch.Tensor, error: ErrorKind) -> torch.Tensor:
    partial = torch.cumsum(r, 0)
    sq = partial * partial
    n = r.shape[0]
    if error == "max":
        return sq.sum()
    weights = torch.arange(n, 0, -1, dtype=r.dtype) / n
    return (weights * sq).sum()


def _sens_torch(c: torch.Tensor, k_eff: int, sep: int) -> torch.Tensor:
    n = c.shape[0]
    if k_eff > 16:  # many shifted copies: one FFT convolution with the pattern's indicator
        mask = torch.zeros(n, dtype=c.dtype)
        starts = torch.arange(k_eff) * sep
        mask[starts[starts < n]] = 1.0
        length = 1 << (2 * n - 1).bit_length()
        v = torch.fft.irfft(torch.fft.rfft(c, length) * torch.fft.rfft(mask, length), length)[:n]
        return (v * v).sum()
    v = torch.zeros_like(c)
    for p in range(k_eff):
        start = p * sep
        if start >= n:
            break
        v = v + torch.nn.functional.pad(c[: n - start], (start, 0))
    return (v * v).sum()


def _blt_loss(theta: np.ndarray, n: int, k_eff: int, sep: int, error: ErrorKind
              ) -> tuple[float, np.ndarray]:
    x = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
    nb = theta.size // 2
    a, b = x[:nb], x[nb:]
    one_minus_d = torch.exp(a)
    d = -torch.expm1(a)
    s = torch.exp(b)
    m = torch.arange(max(n - 1, 1), dtype=torch.float64)[:, None]
    c = torch.cat([torch.ones(1, dtype=torch.float64),
                   (s * torch.exp(m * torch.log1p(-one_minus_d))).sum(dim=1)])[:n]
    q = torch.sqrt(s)
    lam, vec = torch.linalg.eigh(torch.diag(d) - torch.outer(q, q))
    w = -((vec.T @ q) ** 2)
    if bool((lam <= 0).any()):
        return math.inf, np.zeros_like(theta)
    r = torch.cat([torch.ones(1, dtype=torch.float64),
                   (w * torch.exp(m * torch.log(lam))).sum(dim=1)])[:n]
    err = _error_torch(r, error)
    sens = _sens_torch(c, k_eff, sep)
    penalty = -(_log(d).sum() + _log(one_minus_d).sum() + _log(lam).sum() + _log(1.0 - s.sum()))
    if nb > 1:
        ds = torch.sort(d).values
        penalty = penalty - _log(ds[1:] - ds[:-1] - 1e-12).sum()
    loss = torch.log(err) + torch.log(sens) + _BARRIER * penalty
    if not bool(torch.isfinite(loss)):
        return math.inf, np.zeros_like(theta)
    loss.backward()
    grad = x.grad.detach().numpy().copy()
    if not np.all(np.isfinite(grad)):
        return math.inf, np.zeros_like(theta)
    return float(loss.detach()), grad


def _blt_starts(n: int, nb: int) -> list[np.ndarray]:
    """Fixed starting points: decays with ``1 - d`` log-spaced between ~``1/n`` and ~0.5."""
    starts = []
    for slow, total in ((1.0 / n, 0.5), (0.1 / n, 0.4), (10.0 / n, 0.3)):
        gaps = np.geomspace(slow, 0.5, nb) if nb > 1 else np.array([slow])
        scales = np.full(nb, total / nb)
        starts.append(np.concatenate([np.log(gaps), np.log(scales)]))
    return starts


def _check_optimize_args(num_rounds: int, max_participations: int, min_separation: int,
                         error: str) -> tuple[int, int, int]:
    n = int_at_least("num_rounds", num_rounds, 2)
    k_eff = effective_participations(n, max_participations, min_separation)
    if error not in ("max", "mean"):
        raise ValueError(f"error must be 'max' or 'mean', got {error!r}")
    return n, k_eff, int(min_separation) + 1


@functools.lru_cache(maxsize=64)
def optimize_blt(num_rounds: int, max_participations: int, min_separation: int,
                 num_buffers: int = 3, error: ErrorKind = "max", max_iter: int = 2000) -> BLT:
    """BLT strategy minimising ``error x sens^2`` for ``T`` rounds under ``(k, b)``.

    Deterministic (fixed starting points, float64, L-BFGS-B); cached per arguments. Raises
    :class:`OptimizationError` when no start converges to a valid strategy within ``max_iter``
    iterations.
    """
    from scipy.optimize import minimize

    n, k_eff, sep = _check_optimize_args(num_rounds, max_participations, min_separation, error)
    nb = int_at_least("num_buffers", num_buffers, 1)
    if nb > 12:
        raise ValueError(f"num_buffers must be <= 12, got {nb}")
    int_at_least("max_iter", max_iter, 1)
    bounds = [(-34.0, -1e-9)] * nb + [(-30.0, 0.0)] * nb
    found: list[tuple[float, np.ndarray]] = []
    for i, start in enumerate(_blt_starts(n, nb)):
        if i >= 2 and len(found) == 2 and abs(found[0][0] - found[1][0]) <= 1e-6:
            break  # the first two starts agree: the later ones are only a fallback
        with _TorchThreads():
            res = minimize(_blt_loss, start, args=(n, k_eff, sep, error), jac=True,
                           method="L-BFGS-B", bounds=bounds,
                           options={"maxiter": max_iter, "maxfun": 4 * max_iter,
                                    "ftol": 1e-10, "gtol": 1e-7})
        if res.status != 1 and math.isfinite(res.fun):  # not the iteration limit, finite loss
            found.append((float(res.fun), np.asarray(res.x)))
    best = min(found, key=lambda item: item[0]) if found else None
    if best is None:
        raise OptimizationError(
            f"BLT optimisation did not converge in {max_iter} iterations (T={n}, "
            f"k={max_participations}, b={min_separation}, buffers={nb})"
        )
    theta = best[1]
    d = -np.expm1(theta[:nb])
    s = np.exp(theta[nb:])
    order = np.argsort(d)[::-1]
    blt = BLT(tuple(d[order]), tuple(s[order]))
    try:
        return blt.check_strategy()
    except ValueError as exc:
        raise OptimizationError(f"BLT optimisation gave an invalid strategy: {exc}") from None


def banded_init_coefs(bands: int) -> np.ndarray:
    """Coefficients of ``(1 - x)^(-1/2)`` truncated to ``bands`` (the square root of ``A``)."""
    out = np.ones(bands, dtype=np.float64)
    for m in range(1, bands):
        out[m] = out[m - 1] * (2 * m - 1) / (2 * m)
    return out


def _series_inverse_torch(c: torch.Tensor, n: int) -> torch.Tensor:
    """First ``n`` coefficients of ``1 / c(x)`` (``c_0 = 1``) by Newton iteration with FFT products."""
    r = torch.ones(1, dtype=c.dtype)
    size = 1
    while size < n:
        size = min(2 * size, n)
        cc = torch.nn.functional.pad(c[:size], (0, max(0, size - c.shape[0])))
        length = 1 << (2 * size - 1).bit_length()
        prod = torch.fft.irfft(torch.fft.rfft(cc, length) * torch.fft.rfft(r, length), length)[:size]
        two_minus = -prod
        two_minus = two_minus + torch.nn.functional.pad(torch.full((1,), 2.0, dtype=c.dtype),
                                                        (0, size - 1))
        r = torch.fft.irfft(torch.fft.rfft(r, length) * torch.fft.rfft(two_minus, length),
                            length)[:size]
    return r[:n]


def _banded_loss(theta: np.ndarray, n: int, k_eff: int, sep: int, error: ErrorKind
                 ) -> tuple[float, np.ndarray]:
    x = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
    c = torch.cat([torch.ones(1, dtype=torch.float64), x])
    r = _series_inverse_torch(c, n)
    err = _error_torch(r, error)
    full = torch.nn.functional.pad(c, (0, max(0, n - c.shape[0])))[:n]
    sens = _sens_torch(full, k_eff, sep)
    loss = torch.log(err) + torch.log(sens)
    if not bool(torch.isfinite(loss)):
        return math.inf, np.zeros_like(theta)
    loss.backward()
    return float(loss.detach()), x.grad.detach().numpy().copy()


@functools.lru_cache(maxsize=64)
def optimize_banded(num_rounds: int, max_participations: int, min_separation: int,
                    bands: int | None = None, error: ErrorKind = "max",
                    max_iter: int = 2000) -> np.ndarray:
    """Banded Toeplitz coefficients ``c_0 = 1 .. c_{bands-1}`` minimising ``error x sens^2``.

    ``bands`` defaults to ``min(b + 1, T)`` and must not exceed ``b + 1`` (then the sensitivity is
    exact for any signs). Starts from the truncated square root of ``A``; deterministic; cached.
    The returned array is read-only.
    """
    from scipy.optimize import minimize

    n, k_eff, sep = _check_optimize_args(num_rounds, max_participations, min_separation, error)
    nbands = min(sep, n) if bands is None else int_at_least("bands", bands, 1)
    if nbands > sep:
        raise ValueError(f"bands must be <= min_separation + 1 = {sep}, got {nbands}")
    if nbands > n:
        raise ValueError(f"bands must be <= num_rounds = {n}, got {nbands}")
    int_at_least("max_iter", max_iter, 1)
    out = banded_init_coefs(nbands)
    if nbands > 1:
        with _TorchThreads():
            res = minimize(_banded_loss, out[1:], args=(n, k_eff, sep, error), jac=True,
                           method="L-BFGS-B", options={"maxiter": max_iter, "maxfun": 4 * max_iter,
                                                       "ftol": 1e-10, "gtol": 1e-7})
        if res.status == 1 or not math.isfinite(res.fun):
            raise OptimizationError(
                f"banded optimisation did not converge in {max_iter} iterations (T={n}, "
                f"k={max_participations}, b={min_separation}, bands={nbands})"
            )
        out = np.concatenate([[1.0], res.x])
    out.setflags(write=False)
    return out


# -- noise streams -------------------------------------------------------------------------------
def _check_stream(num_params: int, std: float) -> tuple[int, float]:
    p = int_at_least("num_params", num_params, 1)
    return p, number_at_least("std", std, 0.0)


class _Stream:
    """Shared round bookkeeping of the correlated-noise streams."""

    tag: int

    def __init__(self, num_params: int, std: float, source: Any) -> None:
        self.num_params, self.std = _check_stream(num_params, std)
        self.source = source
        self.next_round = 0

    def _draw(self, round: int) -> torch.Tensor:
        z = self.source.normal((self.tag, int(round)), self.num_params)
        if tuple(z.shape) != (self.num_params,):
            raise ValueError(f"noise source returned shape {tuple(z.shape)}, expected ({self.num_params},)")
        return z

    def _check_round(self, round: int) -> None:
        if round != self.next_round:
            raise ValueError(
                f"noise stream expects round {self.next_round}, got {round}; "
                "to replay a round, restore the state saved before it"
            )


class BLTNoise(_Stream):
    """Online ``std * (C^-1 xi)_t`` for a BLT strategy ``C``: ``num_buffers`` float64 buffers."""

    tag = TAG_BLT

    def __init__(self, blt: BLT, num_params: int, std: float, source: Any) -> None:
        super().__init__(num_params, std, source)
        self.blt = blt.check_strategy()
        self.buffers = torch.zeros(blt.num_buffers, self.num_params, dtype=torch.float64)

    def step(self, round: int) -> torch.Tensor:
        """The noise of ``round`` (float32, shape ``[num_params]``); rounds must come in order."""
        self._check_round(round)
        x = self._draw(round).to(torch.float64)
        # one pass per buffer and operation (a (1 x n) @ (n x P) product is several times slower)
        for buf, scale in zip(self.buffers, self.blt.scales, strict=True):
            x.sub_(buf, alpha=scale)
        for buf, decay in zip(self.buffers, self.blt.decays, strict=True):
            buf.mul_(decay).add_(x)
        self.next_round += 1
        return x.mul_(self.std).to(torch.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"next_round": self.next_round, "buffers": self.buffers.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"next_round", "buffers"}:
            raise ValueError(f"BLT noise state needs keys ['buffers', 'next_round'], got {sorted(state)}")
        buffers = torch.as_tensor(state["buffers"], dtype=torch.float64)
        if tuple(buffers.shape) != tuple(self.buffers.shape):
            raise ValueError(f"BLT buffers have shape {tuple(buffers.shape)}, expected {tuple(self.buffers.shape)}")
        self.next_round = int_at_least("next_round", state["next_round"], 0)
        self.buffers = buffers.clone()


class BandedNoise(_Stream):
    """Online ``std * (C^-1 xi)_t`` for a banded Toeplitz ``C``: the last ``bands - 1`` outputs."""

    tag = TAG_BANDED

    def __init__(self, coefs: Sequence[float] | np.ndarray, num_params: int, std: float,
                 source: Any) -> None:
        super().__init__(num_params, std, source)
        c = np.asarray(coefs, dtype=np.float64)
        if c.ndim != 1 or c.size < 1 or not np.all(np.isfinite(c)) or c[0] != 1.0:
            raise ValueError("banded coefficients must be finite with c_0 = 1")
        self.coefs = tuple(float(v) for v in c)
        self.bands = c.size
        # a ring of the last bands - 1 outputs: round t's output lives in slot t % (bands - 1)
        self._band = torch.tensor(c[1:], dtype=torch.float32)
        self.history = torch.zeros(max(self.bands - 1, 0), self.num_params, dtype=torch.float32)

    def step(self, round: int) -> torch.Tensor:
        """The noise of ``round`` (float32, shape ``[num_params]``); rounds must come in order."""
        self._check_round(round)
        x = self._draw(round).to(torch.float32)
        width = self.bands - 1
        if width > 0:
            # slot (round - 1 - j) % width holds the output of round - 1 - j, weighted by c_{j+1}
            slots = (round - 1 - torch.arange(width)) % width
            weights = torch.zeros(width, dtype=torch.float32)
            weights[slots] = self._band
            x = x - weights @ self.history
            self.history[round % width] = x
        self.next_round += 1
        return x * self.std

    def state_dict(self) -> dict[str, Any]:
        return {"next_round": self.next_round, "history": self.history.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"next_round", "history"}:
            raise ValueError(f"banded noise state needs keys ['history', 'next_round'], got {sorted(state)}")
        history = torch.as_tensor(state["history"], dtype=torch.float32)
        if tuple(history.shape) != tuple(self.history.shape):
            raise ValueError(f"banded history has shape {tuple(history.shape)}, expected {tuple(self.history.shape)}")
        self.next_round = int_at_least("next_round", state["next_round"], 0)
        self.history = history.clone()


# -- strategies as used by the mechanisms, the accountant and the planning CLI -------------------
@dataclass(frozen=True)
class MFStrategy:
    """A Toeplitz strategy in the flat form of a privacy event, with its error for ``num_rounds``.

    ``family = "blt"``: ``params`` = decays then scales; ``"banded"``: ``c_0 = 1 .. c_{bands-1}``.
    """

    family: str
    params: tuple[float, ...]

    @property
    def blt(self) -> BLT:
        if self.family != "blt":
            raise ValueError(f"not a BLT strategy: {self.family!r}")
        half = len(self.params) // 2
        return BLT(self.params[:half], self.params[half:])

    def coefs(self, n: int) -> np.ndarray:
        """The first ``n`` Toeplitz coefficients of ``C``."""
        return strategy_coefs(self.family, self.params, n)

    def noise_coefs(self, n: int) -> np.ndarray:
        """The first ``n`` coefficients of ``C^-1`` (the noise-correlating matrix)."""
        if self.family == "blt":
            return self.blt.inverse_coefs(n)
        return inverse_coefs(self.coefs(n), n)

    def prefix_variances(self, n: int) -> np.ndarray:
        """Per-round prefix-sum noise variance, in units of ``(z C_clip)^2``."""
        return prefix_variances(self.noise_coefs(n))

    def to_dict(self) -> dict[str, Any]:
        if self.family == "blt":
            return {"family": "blt", **self.blt.to_dict()}
        return {"family": "banded", "bands": len(self.params), "coefs": list(self.params)}


def blt_strategy(num_rounds: int, max_participations: int, min_separation: int, *,
                 num_buffers: int = 3, error: ErrorKind = "max", max_iter: int = 2000,
                 blt: BLT | None = None) -> MFStrategy:
    """The BLT strategy for ``(T, k, b)``: ``blt`` as given, else :func:`optimize_blt`'s."""
    if blt is None:
        blt = optimize_blt(num_rounds, max_participations, min_separation, num_buffers, error,
                           max_iter)
    blt.check_strategy()
    return MFStrategy("blt", blt.decays + blt.scales)


def banded_strategy(num_rounds: int, max_participations: int, min_separation: int, *,
                    bands: int | None = None, error: ErrorKind = "max",
                    max_iter: int = 2000) -> MFStrategy:
    """The banded strategy of :func:`optimize_banded` for ``(T, k, b)``."""
    coefs = optimize_banded(num_rounds, max_participations, min_separation, bands, error, max_iter)
    return MFStrategy("banded", tuple(float(v) for v in coefs))
