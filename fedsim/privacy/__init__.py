"""Differential privacy for fedsim: the noise, the mechanisms and their accounting.

Layers inside the package (checked by ``tests/contracts/test_layers.py``; imports point downwards):

* :mod:`~fedsim.privacy.calibration` -- the noise multiplier that meets a zCDP budget, by the
  accountant on a mechanism's planned events.
* :mod:`~fedsim.privacy.mechanisms` -- the registered mechanisms, one file each (Gaussian, tree,
  BLT, banded): release, privacy events, planning, state.
* :mod:`~fedsim.privacy.accountant` -- composes the events of a ledger (or a plan) into a report.
* :mod:`~fedsim.privacy.events` -- privacy events, each kind with its own accounting, and the
  ledger.
* :mod:`~fedsim.privacy.matrix_factorization` (Toeplitz algebra and sensitivity, BLT, banded),
  :mod:`~fedsim.privacy.sensitivity` (exact DP-FTRL tree sensitivity), :mod:`~fedsim.privacy.rdp`
  (Opacus's subsampled-Gaussian RDP), :mod:`~fedsim.privacy.tree_noise`, ``audit``, ``clipping``.
* :mod:`~fedsim.privacy.conversions` (zCDP to ``(epsilon, delta)``),
  :mod:`~fedsim.privacy.noise` and :mod:`~fedsim.privacy.csprng` (the noise source),
  ``tree_structure``.

The planning command (``fedsim privacy``) is :mod:`fedsim.privacy_cli`, above this package. See
``docs/privacy.md`` for the accounting rules and conventions.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the submodule that defines it. The package imports a submodule only when one of
#: its names is first used (PEP 562), so ``import fedsim.privacy.events`` (the planning CLI, the
#: scenario loader) does not pull in scipy through the accountant.
_EXPORTS = {
    "Accountant": "fedsim.privacy.accountant",
    "GaussianEvent": "fedsim.privacy.events",
    "MatrixFactorizationEvent": "fedsim.privacy.events",
    "PrivacyLedger": "fedsim.privacy.events",
    "PrivacyReport": "fedsim.privacy.accountant",
    "SampledGaussianEvent": "fedsim.privacy.events",
    "TreeAggregationEvent": "fedsim.privacy.events",
    "TreePrefixSensitivity": "fedsim.privacy.sensitivity",
    "brute_force_tree_sensitivity_sq": "fedsim.privacy.sensitivity",
    "calibrate_noise_multiplier": "fedsim.privacy.calibration",
    "dp_fedavg_privacy": "fedsim.privacy.accountant",
    "dp_ftrl_privacy": "fedsim.privacy.accountant",
    "effective_max_participations": "fedsim.privacy.sensitivity",
    "epsilon_from_rho": "fedsim.privacy.conversions",
    "epsilon_naive_from_rho": "fedsim.privacy.conversions",
    "epsilon_rdp_from_rho": "fedsim.privacy.conversions",
    "max_tree_sensitivity_sq": "fedsim.privacy.sensitivity",
    "mf_privacy": "fedsim.privacy.accountant",
    "sampled_gaussian_epsilon": "fedsim.privacy.accountant",
    "sensitivity_sq": "fedsim.privacy.calibration",
    "tree_sensitivity_sq_prefixes": "fedsim.privacy.sensitivity",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:  # a submodule used as an attribute (``fedsim.privacy.accountant``)
        if name.startswith("_"):
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "Accountant",
    "GaussianEvent",
    "MatrixFactorizationEvent",
    "PrivacyLedger",
    "PrivacyReport",
    "SampledGaussianEvent",
    "TreeAggregationEvent",
    "TreePrefixSensitivity",
    "brute_force_tree_sensitivity_sq",
    "calibrate_noise_multiplier",
    "dp_fedavg_privacy",
    "dp_ftrl_privacy",
    "effective_max_participations",
    "epsilon_from_rho",
    "epsilon_naive_from_rho",
    "epsilon_rdp_from_rho",
    "max_tree_sensitivity_sq",
    "mf_privacy",
    "sampled_gaussian_epsilon",
    "sensitivity_sq",
    "tree_sensitivity_sq_prefixes",
]
