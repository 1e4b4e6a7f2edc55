"""What the BLT and banded optimisers share: the objective's terms, in float64 torch autograd.

Strategies are optimised for ``error x sens^2`` (max or mean over rounds of the prefix-sum
variance, times the worst-case squared sensitivity under ``(k, b)``), which is invariant to
scaling ``C``: :func:`optimize_blt <fedsim.privacy.matrix_factorization.blt.optimize_blt>` and
:func:`optimize_banded <fedsim.privacy.matrix_factorization.banded.optimize_banded>` minimise
``log(error) + log(sens^2)`` (plus small log-barrier penalties for the BLT) with scipy's L-BFGS-B
on the gradients computed here, from fixed starting points, so their result is a deterministic
function of their arguments.
"""

from __future__ import annotations

import sys
from typing import Any, Literal

import torch

from fedsim.privacy.matrix_factorization.toeplitz import effective_participations
from fedsim.validation import int_at_least

__all__ = [
    "BARRIER",
    "PROGRESS_DELAY_S",
    "ErrorKind",
    "OptimizationError",
    "SingleThread",
    "check_optimize_args",
    "log_clamped",
    "pattern_sensitivity_sq",
    "prefix_error",
    "progress",
]

#: The prefix-sum error a strategy is optimised for: the worst round's, or the mean over rounds.
ErrorKind = Literal["max", "mean"]

#: Weight of the log-barrier penalties that keep a BLT inside its valid region.
BARRIER = 1e-7


class OptimizationError(ValueError):
    """The strategy optimisation did not converge to a valid strategy."""


#: Seconds an optimisation runs before it shows a progress bar on stderr (a strategy for a few
#: hundred rounds takes well under a second; one for 50,000 rounds takes minutes).
PROGRESS_DELAY_S = 2.0


def progress(desc: str, total: int) -> Any:
    """A tqdm bar on stderr counting L-BFGS iterations; it appears only after
    :data:`PROGRESS_DELAY_S` seconds and is removed when the optimisation ends."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="iter", file=sys.stderr, delay=PROGRESS_DELAY_S,
                leave=False, dynamic_ncols=True)


class SingleThread:
    """Run small float64 autograd graphs on one intra-op thread, restoring the setting afterwards.

    The graphs of the optimisers are tiny (``T x buffers``); more threads only add
    synchronisation (about 4x slower on two busy cores).
    """

    def __enter__(self) -> None:
        self._saved = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self._saved)


def log_clamped(x: torch.Tensor) -> torch.Tensor:
    """``log(max(x, 1e-300))``: a barrier term that stays finite at the boundary."""
    return torch.log(torch.clamp(x, min=1e-300))


def prefix_error(r: torch.Tensor, error: ErrorKind) -> torch.Tensor:
    """Sum (``"max"``) or weighted mean (``"mean"``) of the squared partial sums of ``r`` (``C^-1``'s column)."""
    partial = torch.cumsum(r, 0)
    sq = partial * partial
    n = r.shape[0]
    if error == "max":
        return sq.sum()
    weights = torch.arange(n, 0, -1, dtype=r.dtype) / n
    return (weights * sq).sum()


def pattern_sensitivity_sq(c: torch.Tensor, k_eff: int, sep: int) -> torch.Tensor:
    """``||sum_p C[:, p sep]||^2`` for ``k_eff`` contributions ``sep`` apart (the exact worst case
    for non-negative non-increasing coefficients, see :mod:`.toeplitz`)."""
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


def check_optimize_args(num_rounds: int, max_participations: int, min_separation: int,
                        error: str) -> tuple[int, int, int]:
    """``(T, k_eff, b + 1)`` for an optimiser, or ``ValueError`` naming the bad argument."""
    n = int_at_least("num_rounds", num_rounds, 2)
    k_eff = effective_participations(n, max_participations, min_separation)
    if error not in ("max", "mean"):
        raise ValueError(f"error must be 'max' or 'mean', got {error!r}")
    return n, k_eff, int(min_separation) + 1
