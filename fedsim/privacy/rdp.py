"""Renyi DP of the Poisson-subsampled Gaussian mechanism, from Opacus's analysis module.

The accountant's amplified events (:class:`~fedsim.privacy.events.SampledGaussianEvent`) give
their RDP curve at :data:`RDP_ORDERS` (Mironov, Talwar & Zhang 2019, arXiv:1908.10530, as computed
by ``opacus.accountants.analysis.rdp``), and :func:`privacy_spent` converts a composed curve to
``(epsilon, delta)``. Numpy and scipy only: the one Opacus file is loaded without importing torch
(and scipy only when a curve is computed).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "RDP_ORDERS",
    "clear_caches",
    "privacy_spent",
    "sampled_gaussian_epsilon",
    "sampled_rdp_per_round",
]

# The default orders of Opacus's RDPAccountant (1.1 .. 10.9 by 0.1, then 12 .. 63),
# extended upwards for small deltas / large noise.
RDP_ORDERS: tuple[float, ...] = (
    tuple(1.0 + x / 10.0 for x in range(1, 100))
    + tuple(float(a) for a in range(12, 64))
    + (64.0, 80.0, 96.0, 128.0, 160.0, 192.0, 256.0, 384.0, 512.0, 1024.0)
)


@functools.cache
def _opacus_rdp() -> Any:
    """Opacus's RDP analysis module (``opacus.accountants.analysis.rdp``).

    Importing the ``opacus`` package imports torch (seconds); the analysis module
    itself only needs numpy and scipy. When opacus is not loaded yet, that one
    file of the installed opacus is loaded on its own, so planning from the
    command line stays fast; otherwise the regular module is used.
    """
    loaded = sys.modules.get("opacus.accountants.analysis.rdp")
    if loaded is not None:
        return loaded
    if "opacus" not in sys.modules:
        spec = importlib.util.find_spec("opacus")
        locations = spec.submodule_search_locations if spec is not None else None
        if locations:
            path = Path(next(iter(locations))) / "accountants" / "analysis" / "rdp.py"
            if path.is_file():
                file_spec = importlib.util.spec_from_file_location("_fedsim_opacus_rdp", path)
                if file_spec is not None and file_spec.loader is not None:
                    module = importlib.util.module_from_spec(file_spec)
                    file_spec.loader.exec_module(module)
                    return module
    from opacus.accountants.analysis import rdp

    return rdp


@functools.lru_cache(maxsize=256)
def sampled_rdp_per_round(sampling_rate: float, noise_multiplier: float) -> np.ndarray:
    """RDP of one subsampled-Gaussian round at :data:`RDP_ORDERS` (Opacus)."""
    rdp = _opacus_rdp().compute_rdp(
        q=sampling_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(RDP_ORDERS)
    )
    out = np.asarray(rdp, dtype=np.float64)
    out.setflags(write=False)
    return out


def privacy_spent(rdp: Sequence[float] | np.ndarray, delta: float) -> float:
    """Opacus's RDP-to-(epsilon, delta) conversion over :data:`RDP_ORDERS`, without its warnings.

    Opacus warns when the best order is the smallest or the largest of the grid: the epsilon it
    returns is still a valid upper bound (a finer grid could only lower it), and where it is
    loose (large epsilon, optimum at the smallest order) the accountant reports the minimum with the
    zCDP conversion anyway. A user cannot act on the warning, so it is not shown.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Optimal order is the (smallest|largest) alpha")
        eps, _ = _opacus_rdp().get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
    return float(eps)


def sampled_gaussian_epsilon(noise_multiplier: float, sampling_rate: float, rounds: int,
                             delta: float) -> float:
    """Amplified epsilon of ``rounds`` Poisson-subsampled Gaussian rounds (Opacus RDP, no cap)."""
    from fedsim.privacy.conversions import validate_delta  # scipy: not needed to build the CLI

    delta = validate_delta(delta)
    rdp = sampled_rdp_per_round(float(sampling_rate), float(noise_multiplier)) * rounds
    return privacy_spent(rdp, delta)


def clear_caches() -> None:
    """Empty the per-round RDP memo cache."""
    sampled_rdp_per_round.cache_clear()
