"""A chosen Toeplitz factorization in the flat form of a privacy event (:class:`ToeplitzFactorization`).

The mechanisms (:mod:`fedsim.privacy.mechanisms.toeplitz`) choose one for a run's ``(T, k, b)``
when they are set up (:func:`optimal_blt`, :func:`optimal_banded`), each round records it in a
:class:`~fedsim.privacy.events.MatrixFactorizationEvent`, and the accountant computes the run's
sensitivity from it (:meth:`ToeplitzFactorization.sensitivity`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsim.privacy.matrix_factorization.banded import optimize_banded
from fedsim.privacy.matrix_factorization.blt import BLT, optimize_blt
from fedsim.privacy.matrix_factorization.optimization import ErrorKind
from fedsim.privacy.matrix_factorization.toeplitz import (
    Sensitivity,
    inverse_coefs,
    prefix_variances,
    toeplitz_sensitivity_sq,
)

__all__ = ["FAMILIES", "ToeplitzFactorization", "optimal_banded", "optimal_blt", "toeplitz_coefs"]

#: The parameterisations a :class:`ToeplitzFactorization` (and a privacy event) can name.
FAMILIES = ("blt", "banded")


def toeplitz_coefs(family: str, params: Sequence[float], n: int) -> np.ndarray:
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


@dataclass(frozen=True)
class ToeplitzFactorization:
    """The strategy matrix ``C`` of a matrix factorization ``A = B C``, lower-triangular Toeplitz.

    ``family = "blt"``: ``params`` = decays then scales; ``"banded"``: ``c_0 = 1 .. c_{bands-1}``.
    (Not to be confused with a server :class:`~fedsim.strategy.Strategy`: the literature calls
    ``C`` the *strategy matrix*.)
    """

    family: str
    params: tuple[float, ...]

    @property
    def blt(self) -> BLT:
        if self.family != "blt":
            raise ValueError(f"not a BLT factorization: {self.family!r}")
        half = len(self.params) // 2
        return BLT(self.params[:half], self.params[half:])

    def coefs(self, n: int) -> np.ndarray:
        """The first ``n`` Toeplitz coefficients of ``C``."""
        return toeplitz_coefs(self.family, self.params, n)

    def noise_coefs(self, n: int) -> np.ndarray:
        """The first ``n`` coefficients of ``C^-1`` (the noise-correlating matrix)."""
        if self.family == "blt":
            return self.blt.inverse_coefs(n)
        return inverse_coefs(self.coefs(n), n)

    def prefix_variances(self, n: int) -> np.ndarray:
        """Per-round prefix-sum noise variance, in units of ``(z C_clip)^2``."""
        return prefix_variances(self.noise_coefs(n))

    def sensitivity(self, num_rounds: int, max_participations: int, min_separation: int) -> Sensitivity:
        """Worst-case ``sens^2`` of the leading ``num_rounds x num_rounds`` block under ``(k, b)``."""
        return toeplitz_sensitivity_sq(self.coefs(num_rounds), num_rounds, max_participations,
                                       min_separation)

    def to_dict(self) -> dict[str, Any]:
        if self.family == "blt":
            return {"family": "blt", **self.blt.to_dict()}
        return {"family": "banded", "bands": len(self.params), "coefs": list(self.params)}


def optimal_blt(num_rounds: int, max_participations: int, min_separation: int, *,
                num_buffers: int = 3, error: ErrorKind = "max", max_iter: int = 2000,
                blt: BLT | None = None) -> ToeplitzFactorization:
    """The BLT factorization for ``(T, k, b)``: ``blt`` as given, else :func:`~.blt.optimize_blt`'s."""
    if blt is None:
        blt = optimize_blt(num_rounds, max_participations, min_separation, num_buffers, error,
                           max_iter)
    blt.check_strategy()
    return ToeplitzFactorization("blt", blt.decays + blt.scales)


def optimal_banded(num_rounds: int, max_participations: int, min_separation: int, *,
                   bands: int | None = None, error: ErrorKind = "max",
                   max_iter: int = 2000) -> ToeplitzFactorization:
    """The banded factorization of :func:`~.banded.optimize_banded` for ``(T, k, b)``."""
    coefs = optimize_banded(num_rounds, max_participations, min_separation, bands, error, max_iter)
    return ToeplitzFactorization("banded", tuple(float(v) for v in coefs))
