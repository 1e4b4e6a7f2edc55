"""Differential-privacy mechanisms on the sum of clipped client updates: one file each.

==============  ================================================================================
module          holds
==============  ================================================================================
``base``        the :class:`Mechanism` contract (release, events, planning, state), its options,
                the :data:`MECHANISMS` registry
``gaussian``    ``"gaussian"``: fresh Gaussian noise per round (DP-FedAvg; Poisson-sampled or not)
``tree``        ``"tree"``: tree aggregation of the prefix sums (DP-FTRL)
``toeplitz``    the life cycle the matrix-factorization mechanisms share
``blt``         ``"blt"``: a buffered linear Toeplitz factorization
``banded``      ``"banded"``: a banded Toeplitz factorization
==============  ================================================================================

Importing this package registers the built-in mechanisms (each module registers its class); the
registry imports it on its first lookup, so ``MECHANISMS.get("tree")`` works from anywhere. The
mechanisms import torch only to draw noise (``setup`` and after), so planning a run
(``fedsim privacy``) with the Gaussian or tree mechanism stays light. Guarantee: user-level
(adding or removing all of one device's data), under the participation limit ``(k, b)`` the
mechanism is given, provided the clip bound is enforced; see each module.
"""

from fedsim.privacy.mechanisms.banded import BandedMechanism, BandedOptions
from fedsim.privacy.mechanisms.base import (
    MECHANISMS,
    Mechanism,
    NoOptions,
    PlanDescription,
    build_mechanism,
    mechanism_class,
    mechanism_options,
    noise_or_target,
    option,
    option_fields,
    register_mechanism,
)
from fedsim.privacy.mechanisms.blt import BLTMechanism, BLTOptions
from fedsim.privacy.mechanisms.gaussian import GaussianSumMechanism
from fedsim.privacy.mechanisms.toeplitz import FactorizationOptions, ToeplitzMechanism
from fedsim.privacy.mechanisms.tree import TreeAggregationMechanism, TreeOptions

__all__ = [
    "MECHANISMS",
    "BLTMechanism",
    "BLTOptions",
    "BandedMechanism",
    "BandedOptions",
    "FactorizationOptions",
    "GaussianSumMechanism",
    "Mechanism",
    "NoOptions",
    "PlanDescription",
    "ToeplitzMechanism",
    "TreeAggregationMechanism",
    "TreeOptions",
    "build_mechanism",
    "mechanism_class",
    "mechanism_options",
    "noise_or_target",
    "option",
    "option_fields",
    "register_mechanism",
]
