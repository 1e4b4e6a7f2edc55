"""Differential-privacy accounting for fedsim (pure numpy/scipy/opacus; no torch engine code).

* :mod:`~fedsim.privacy.sensitivity` -- exact DP-FTRL tree-aggregation sensitivity.
* :mod:`~fedsim.privacy.conversions` -- zCDP to (epsilon, delta) conversions.
* :mod:`~fedsim.privacy.events` -- privacy events and the append-only ledger.
* :mod:`~fedsim.privacy.accountant` -- the accountant and the planning functions.
* :mod:`~fedsim.privacy.calibration` -- noise calibration to a zCDP budget.
* :mod:`~fedsim.privacy.matrix_factorization` -- BLT and banded matrix-factorization strategies
  for DP-FTRL (sensitivity, optimiser, noise streams).

See ``docs/privacy.md`` for the accounting rules and conventions.
"""

from fedsim.privacy.accountant import (
    Accountant,
    PrivacyReport,
    dp_fedavg_privacy,
    dp_ftrl_privacy,
    mf_privacy,
    sampled_gaussian_epsilon,
)
from fedsim.privacy.calibration import calibrate_noise_multiplier, sensitivity_sq
from fedsim.privacy.conversions import (
    epsilon_from_rho,
    epsilon_naive_from_rho,
    epsilon_rdp_from_rho,
)
from fedsim.privacy.events import (
    GaussianEvent,
    MatrixFactorizationEvent,
    PrivacyLedger,
    SampledGaussianEvent,
    TreeAggregationEvent,
)
from fedsim.privacy.sensitivity import (
    TreePrefixSensitivity,
    brute_force_tree_sensitivity_sq,
    effective_max_participations,
    max_tree_sensitivity_sq,
    tree_sensitivity_sq_prefixes,
)

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
