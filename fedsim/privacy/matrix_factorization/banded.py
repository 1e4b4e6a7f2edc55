"""Banded Toeplitz strategies: the optimiser and the noise stream.

Choquette-Choo, McMahan, Rush, Thakurta, "(Amplified) Banded Matrix Factorization",
arXiv:2306.08153: ``c_k = 0`` for ``k >= bands``; ``C^-1 y`` needs the last ``bands - 1``
outputs: ``x_t = y_t - sum_{m=1}^{bands-1} c_m x_{t-m}``. With ``bands <= b + 1`` two
contributions of a device touch disjoint rows, so the sensitivity of :mod:`.toeplitz` is exact for
any signs. :class:`BandedNoise` keeps its history in float32 (``bands - 1`` model-sized vectors).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedsim.privacy.matrix_factorization.optimization import (
    ErrorKind,
    OptimizationError,
    SingleThread,
    check_optimize_args,
    pattern_sensitivity_sq,
    prefix_error,
    progress,
)
from fedsim.privacy.matrix_factorization.streaming import NoiseStream
from fedsim.validation import int_at_least

__all__ = ["TAG_BANDED", "BandedNoise", "banded_init_coefs", "optimize_banded"]

#: Domain-separation word of the banded noise stream (``source.normal((TAG_BANDED, round), n)``).
TAG_BANDED = 0x42414E44  # "BAND"


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
    err = prefix_error(r, error)
    full = torch.nn.functional.pad(c, (0, max(0, n - c.shape[0])))[:n]
    sens = pattern_sensitivity_sq(full, k_eff, sep)
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

    n, k_eff, sep = check_optimize_args(num_rounds, max_participations, min_separation, error)
    nbands = min(sep, n) if bands is None else int_at_least("bands", bands, 1)
    if nbands > sep:
        raise ValueError(f"bands must be <= min_separation + 1 = {sep}, got {nbands}")
    if nbands > n:
        raise ValueError(f"bands must be <= num_rounds = {n}, got {nbands}")
    int_at_least("max_iter", max_iter, 1)
    out = banded_init_coefs(nbands)
    if nbands > 1:
        desc = (f"optimising the banded strategy for T={n} rounds (k={max_participations}, "
                f"b={min_separation}, {nbands} bands)")
        with progress(desc, max_iter) as bar, SingleThread():
            res = minimize(_banded_loss, out[1:], args=(n, k_eff, sep, error), jac=True,
                           method="L-BFGS-B", callback=lambda _x: bar.update(1),
                           options={"maxiter": max_iter, "maxfun": 4 * max_iter,
                                    "ftol": 1e-10, "gtol": 1e-7})
        if res.status == 1 or not math.isfinite(res.fun):
            raise OptimizationError(
                f"banded optimisation did not converge in {max_iter} iterations (T={n}, "
                f"k={max_participations}, b={min_separation}, bands={nbands})"
            )
        out = np.concatenate([[1.0], res.x])
    out.setflags(write=False)
    return out


class BandedNoise(NoiseStream):
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
        self.check_round(round)
        x = self.draw(round).to(torch.float32)
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
