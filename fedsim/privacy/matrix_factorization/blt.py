"""Buffered linear Toeplitz (BLT) strategies: the matrix, its optimiser and its noise stream.

Dvijotham, McMahan, Pillutla, Steinke, Thakurta, arXiv:2404.16706; McMahan, Xu et al., "A
Hassle-free Algorithm for Private Learning in Practice: Don't Use Tree Aggregation, Use BLTs",
arXiv:2408.08868. A BLT has Toeplitz coefficients ``c_0 = 1``, ``c_k = sum_j s_j d_j^(k-1)`` for
``k >= 1`` with decays ``d_j in (0, 1)`` and output scales ``s_j > 0``. ``C^-1 y`` is computed
online with one buffer per decay (arXiv:2408.08868, Algorithm 3)::

    x_t = y_t - sum_j s_j buf_j ;   buf_j <- d_j buf_j + x_t

so the server holds ``buffers x model`` numbers whatever ``T`` is. The inverse is again a BLT
(arXiv:2404.16706, Lemma 5.2): its decays are the eigenvalues ``l_j`` of
``diag(d) - sqrt(s) sqrt(s)^T`` and its scales ``-(U^T sqrt(s))_j^2`` (``U`` the eigenvectors), a
symmetric form of ``diag(d) - 1 s^T`` (the state matrix of the inverse recursion).

:func:`optimize_blt` minimises ``log(error) + log(sens^2)`` plus small log-barrier penalties
(decays in ``(0, 1)``, inverse decays ``> 0``, separated decays, ``sum(s) < 1`` so the
coefficients stay non-increasing and the exact sensitivity of :mod:`.toeplitz` applies).

:class:`BLTNoise` keeps its buffers in float64: decays within ``1e-8`` of one (e.g.
``1 - 1.2e-10`` at the Gboard parameters) are not representable in float32.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedsim.privacy.matrix_factorization.optimization import (
    BARRIER,
    ErrorKind,
    OptimizationError,
    SingleThread,
    check_optimize_args,
    log_clamped,
    pattern_sensitivity_sq,
    prefix_error,
    progress,
)
from fedsim.privacy.matrix_factorization.streaming import NoiseStream
from fedsim.validation import finite_numbers, int_at_least

__all__ = ["BLT", "TAG_BLT", "BLTNoise", "optimize_blt"]

#: Domain-separation word of the BLT noise stream (``source.normal((TAG_BLT, round), n)``).
TAG_BLT = 0x424C5400  # "BLT\0"


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
    err = prefix_error(r, error)
    sens = pattern_sensitivity_sq(c, k_eff, sep)
    penalty = -(log_clamped(d).sum() + log_clamped(one_minus_d).sum() + log_clamped(lam).sum()
                + log_clamped(1.0 - s.sum()))
    if nb > 1:
        ds = torch.sort(d).values
        penalty = penalty - log_clamped(ds[1:] - ds[:-1] - 1e-12).sum()
    loss = torch.log(err) + torch.log(sens) + BARRIER * penalty
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


@functools.lru_cache(maxsize=64)
def optimize_blt(num_rounds: int, max_participations: int, min_separation: int,
                 num_buffers: int = 3, error: ErrorKind = "max", max_iter: int = 2000) -> BLT:
    """BLT strategy minimising ``error x sens^2`` for ``T`` rounds under ``(k, b)``.

    Deterministic (fixed starting points, float64, L-BFGS-B); cached per arguments. Raises
    :class:`OptimizationError` when no start converges to a valid strategy within ``max_iter``
    iterations.
    """
    from scipy.optimize import minimize

    n, k_eff, sep = check_optimize_args(num_rounds, max_participations, min_separation, error)
    nb = int_at_least("num_buffers", num_buffers, 1)
    if nb > 12:
        raise ValueError(f"num_buffers must be <= 12, got {nb}")
    int_at_least("max_iter", max_iter, 1)
    bounds = [(-34.0, -1e-9)] * nb + [(-30.0, 0.0)] * nb
    found: list[tuple[float, np.ndarray]] = []
    starts = _blt_starts(n, nb)
    desc = f"optimising the BLT strategy for T={n} rounds (k={max_participations}, b={min_separation})"
    # one bar over all starts (tqdm's reset() would draw it before its delay)
    with progress(desc, max_iter * len(starts)) as bar:
        for i, start in enumerate(starts):
            if i >= 2 and len(found) == 2 and abs(found[0][0] - found[1][0]) <= 1e-6:
                break  # the first two starts agree: the later ones are only a fallback
            bar.set_postfix_str(f"start {i + 1}/{len(starts)}, at most {max_iter} iterations each", refresh=False)
            with SingleThread():
                res = minimize(_blt_loss, start, args=(n, k_eff, sep, error), jac=True,
                               method="L-BFGS-B", bounds=bounds, callback=lambda _x: bar.update(1),
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


class BLTNoise(NoiseStream):
    """Online ``std * (C^-1 xi)_t`` for a BLT strategy ``C``: ``num_buffers`` float64 buffers."""

    tag = TAG_BLT

    def __init__(self, blt: BLT, num_params: int, std: float, source: Any) -> None:
        super().__init__(num_params, std, source)
        self.blt = blt.check_strategy()
        self.buffers = torch.zeros(blt.num_buffers, self.num_params, dtype=torch.float64)

    def step(self, round: int) -> torch.Tensor:
        """The noise of ``round`` (float32, shape ``[num_params]``); rounds must come in order."""
        self.check_round(round)
        x = self.draw(round).to(torch.float64)
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
