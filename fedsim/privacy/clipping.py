"""Bounding a client's sensitivity: L2 clipping of model deltas.

User-level DP (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models")
needs every device's contribution to a round's sum to have L2 norm at most ``C``: the client clips
its delta, ``delta * min(1, C / ||delta||)``, and the server re-checks the bound before summing.
"""

from __future__ import annotations

import torch

#: Relative slack the server allows on ``||delta|| <= C`` for float32 rounding after clipping.
NORM_TOLERANCE = 1e-5


def clip_by_norm(delta: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Scale ``delta`` (one vector, or rows of a 2-D tensor) to L2 norm at most ``clip_norm``."""
    if clip_norm <= 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    # norms accumulated in float64: a float32 sum of squares over ~1e6 entries underestimates
    # the norm by ~1e-4 relative, so a "clipped" float32 delta would exceed C by that much
    if delta.dim() == 1:
        norm = torch.linalg.vector_norm(delta, dtype=torch.float64)
        return delta * torch.clamp(clip_norm / (norm + 1e-12), max=1.0).to(delta.dtype)
    norms = torch.linalg.vector_norm(delta, dim=1, keepdim=True, dtype=torch.float64)
    return delta * torch.clamp(clip_norm / (norms + 1e-12), max=1.0).to(delta.dtype)


def within_clip(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Boolean mask of norms that respect ``clip_norm`` up to :data:`NORM_TOLERANCE`.

    ``norms`` should be accumulated in float64 (``vector_norm(..., dtype=torch.float64)``): float32
    accumulation over a large model is off by more than the tolerance.
    """
    return norms <= clip_norm * (1.0 + NORM_TOLERANCE)
