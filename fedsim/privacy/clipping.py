"""Bounding a client's sensitivity: L2 clipping of model deltas.

User-level DP (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models")
needs every device's contribution to a round's sum to have L2 norm at most ``C``: the client clips
its delta, ``delta * min(1, C / ||delta||)``, and the server re-checks the bound before summing.

Every trainer clips with :func:`clip_by_norm` (a new tensor) or :func:`clip_by_norm_` (in place,
for the batched paths' work buffers): one formula, with norms accumulated in float64. A float32 sum
of squares over ~1e6 entries underestimates the norm by ~1e-4 relative, so a delta "clipped" with a
float32 norm would exceed ``C`` by more than the server's :data:`NORM_TOLERANCE`.
"""

from __future__ import annotations

import numpy as np
import torch

from fedsim.validation import positive_number

#: Relative slack the server allows on ``||delta|| <= C`` for float32 rounding after clipping.
NORM_TOLERANCE = 1e-5


def clip_factors(delta: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """The factor ``min(1, C / ||row||)`` per row (shape ``[]`` for a vector, ``[rows, 1]`` for rows).

    Norms are accumulated in float64; the factor is returned in ``delta``'s dtype.
    """
    clip_norm = positive_number("clip_norm", clip_norm)
    if delta.dim() == 1:
        norms = torch.linalg.vector_norm(delta, dtype=torch.float64)
    elif delta.dim() == 2:
        norms = torch.linalg.vector_norm(delta, dim=1, keepdim=True, dtype=torch.float64)
    else:
        raise ValueError(f"clipping takes one vector or rows of a 2-D tensor, got shape {tuple(delta.shape)}")
    return torch.clamp(clip_norm / (norms + 1e-12), max=1.0).to(delta.dtype)


def clip_by_norm(delta: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """``delta`` (one vector, or rows of a 2-D tensor) scaled to L2 norm at most ``clip_norm``."""
    return delta * clip_factors(delta, clip_norm)


def clip_and_bit(delta: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, bool]:
    """One delta clipped (:func:`clip_by_norm`) and adaptive clipping's bit: whether its norm
    before clipping (float64) was at most ``clip_norm``."""
    norm = float(torch.linalg.vector_norm(delta, dtype=torch.float64))
    return clip_by_norm(delta, clip_norm), norm <= clip_norm


def clip_by_norm_(delta: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """:func:`clip_by_norm` in place: scales ``delta``'s rows and returns ``delta``."""
    return delta.mul_(clip_factors(delta, clip_norm))


def clip_rows_with_bits_(deltas: torch.Tensor, clip_norm: float) -> np.ndarray:
    """:func:`clip_by_norm_` on the rows of ``deltas`` (the same factors, the same result), and
    adaptive clipping's bits: whether each row's float64 norm before clipping was at most
    ``clip_norm``."""
    clip_norm = positive_number("clip_norm", clip_norm)
    if deltas.dim() != 2:
        raise ValueError(f"clip_rows_with_bits_ takes rows of a 2-D tensor, got shape {tuple(deltas.shape)}")
    norms = torch.linalg.vector_norm(deltas, dim=1, keepdim=True, dtype=torch.float64)
    deltas.mul_(torch.clamp(clip_norm / (norms + 1e-12), max=1.0).to(deltas.dtype))
    return (norms.reshape(-1) <= clip_norm).cpu().numpy()


def within_clip(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Boolean mask of norms that respect ``clip_norm`` up to :data:`NORM_TOLERANCE`.

    ``norms`` should be accumulated in float64 (``vector_norm(..., dtype=torch.float64)``): float32
    accumulation over a large model is off by more than the tolerance.
    """
    return norms <= clip_norm * (1.0 + NORM_TOLERANCE)


#: A reported delta whose norm is within this relative margin of ``C`` counts as clipped when the
#: server reads a client's adaptive-clipping bit off it (:func:`below_clip`).
CLIPPED_MARGIN = 1e-6


def below_clip(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Adaptive clipping's bits read off reported, clipped deltas: ``True`` where the norm is below
    ``C (1 - CLIPPED_MARGIN)``.

    A delta that needed clipping arrives with norm ``C`` up to float32 rounding (far below the
    margin), one that did not arrives with its own norm; only an unclipped delta within the margin
    of ``C`` reads as clipped, a boundary the quantile estimate cannot resolve anyway. Clients
    that report their bit (the Flower ClientApp) are taken at their word.
    """
    return norms < clip_norm * (1.0 - CLIPPED_MARGIN)
