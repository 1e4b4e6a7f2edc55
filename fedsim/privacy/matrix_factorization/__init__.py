"""Matrix-factorization DP-FTRL: buffered linear Toeplitz (BLT) and banded Toeplitz strategies.

The mechanism
-------------
DP-FTRL releases the prefix sums ``A x`` of the rounds' sums of clipped updates ``x_0 .. x_{T-1}``
(``A`` the lower-triangular all-ones matrix). The matrix mechanism factors ``A = B C`` with a
lower-triangular *strategy matrix* ``C``, releases ``C x + sigma xi`` (``xi`` i.i.d. standard
normal, ``sigma = z C_clip``) and post-processes it with ``B = A C^-1``: the noisy prefix sums are
``A x + sigma B xi`` and the per-round increments ``x_t + sigma (C^-1 xi)_t`` (Denisov, McMahan,
Rush, Smith, Thakurta, NeurIPS 2022; Choquette-Choo et al., ICML 2023). Every strategy matrix here
is lower-triangular Toeplitz.

Modules (one file per parameterisation, as jax_privacy's ``matrix_factorization``)
-----------------------------------------------------------------------------------
==================  ==============================================================================
module              holds
==================  ==============================================================================
``toeplitz``        Toeplitz algebra, prefix-sum error, worst-case sensitivity under ``(k, b)``
                    (exact or an upper bound) and its brute-force reference; numpy only
``optimization``    the optimisers' shared objective terms (torch autograd), ``ErrorKind``
``streaming``       ``NoiseStream``: round bookkeeping of the online ``C^-1 xi`` noise streams
``blt``             ``BLT``, ``optimize_blt``, ``BLTNoise``
``banded``          ``optimize_banded``, ``BandedNoise``
``factorization``   ``ToeplitzFactorization`` (a chosen ``C`` in the flat form of a privacy event),
                    ``optimal_blt``, ``optimal_banded``
==================  ==============================================================================

The package imports a module only when one of its names is first used (PEP 562), so the
accountant's use of :mod:`.toeplitz` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the module that defines it.
_EXPORTS = {
    "BLT": "blt",
    "TAG_BLT": "blt",
    "BLTNoise": "blt",
    "optimize_blt": "blt",
    "TAG_BANDED": "banded",
    "BandedNoise": "banded",
    "banded_init_coefs": "banded",
    "optimize_banded": "banded",
    "FAMILIES": "factorization",
    "ToeplitzFactorization": "factorization",
    "optimal_banded": "factorization",
    "optimal_blt": "factorization",
    "toeplitz_coefs": "factorization",
    "ErrorKind": "optimization",
    "OptimizationError": "optimization",
    "NoiseStream": "streaming",
    "GRAM_LIMIT": "toeplitz",
    "Sensitivity": "toeplitz",
    "brute_force_sensitivity_sq": "toeplitz",
    "effective_participations": "toeplitz",
    "inverse_coefs": "toeplitz",
    "prefix_variances": "toeplitz",
    "toeplitz_gram": "toeplitz",
    "toeplitz_matrix": "toeplitz",
    "toeplitz_sensitivity_sq": "toeplitz",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:  # a submodule used as an attribute (``matrix_factorization.blt``)
        if name.startswith("_"):
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
