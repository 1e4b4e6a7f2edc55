"""Quantile-based adaptive clipping: the clip norm follows a target quantile of the update norms.

Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive Clipping",
NeurIPS 2021 (arXiv:1905.03871), with geometric updates:

1. round ``t`` clips every device's update to the current clip norm ``C_t`` (the scenario's
   ``clip-norm`` is ``C_0``); every device also reports a bit ``b_i = [||delta_i|| <= C_t]``,
   taken on its update before clipping;
2. the server releases the noisy centred count ``c_t = sum_i (b_i - 1/2) + N(0, (z_b / 2)**2)`` over
   the round's accepted updates (noise from the run's secret key, words ``(TAG_COUNT, t)``, so a
   replayed round adds the same noise) and estimates the unclipped fraction
   ``beta_t = c_t / n + 1/2`` with the strategy's fixed denominator ``n`` (the expected cohort size);
3. ``C_{t+1} = C_t * exp(-clip_lr * (beta_t - gamma))`` with ``gamma`` the target quantile: the
   clip norm grows while fewer than ``gamma`` of the updates fit under it, shrinks while more do.

The count is a Gaussian mechanism with sensitivity ``1/2`` (one device's centred bit) and noise
multiplier ``z_b`` (:class:`~fedsim.privacy.events.ClippedCountEvent`); ``C_{t+1}`` is
post-processing of the released counts, so it is public (``metrics.jsonl``'s ``clip_norm``).
The update's mechanism runs on the normalised sum ``x_t / C_t`` (sensitivity 1, noise multiplier
``z``) and its release is scaled back by ``C_t``: for the Gaussian mechanism that is exactly
``x_t + N(0, (z C_t)**2)``; for correlated mechanisms (tree, BLT, banded) each round's increment of
the normalised noisy prefix is scaled by that round's public ``C_t``, post-processing of a release
whose accounting is the fixed-clip one at ``C = 1``.

The clip norm stays in ``[MIN_ADAPTIVE_CLIP, MAX_CLIP_NORM]``, and below ``MAX_NOISE_STD / z`` so the
update's noise std ``z C_t`` stays within the bound every fixed-clip run respects (clamping is
post-processing too).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from fedsim.privacy.events import (
    MAX_CLIP_NORM,
    MAX_NOISE_STD,
    ClippedCountEvent,
    check_clip_norm,
    check_noise_multiplier,
)
from fedsim.validation import number_in, positive_number

if TYPE_CHECKING:
    from fedsim.privacy.noise import NoiseSource

__all__ = ["MIN_ADAPTIVE_CLIP", "AdaptiveClipping", "check_adaptive"]

#: Smallest clip norm adaptive clipping moves to (a clip norm of 0 would stop training).
MIN_ADAPTIVE_CLIP = 1e-9


def check_adaptive(target_quantile: Any, clip_lr: Any, count_noise_multiplier: Any,
                   count_rho_fraction: Any, target_rho: Any) -> None:
    """``ValueError`` (starting with the key) for adaptive-clipping settings that mean nothing."""
    if target_quantile is None:
        for key, value in (("clip-lr", clip_lr), ("count-noise-multiplier", count_noise_multiplier),
                           ("count-rho-fraction", count_rho_fraction)):
            if value is not None:
                raise ValueError(f"{key} applies only with target-quantile (adaptive clipping)")
        return
    number_in("target-quantile", target_quantile, 0.0, 1.0, low_open=True, high_open=True)
    if clip_lr is not None:
        positive_number("clip-lr", clip_lr)
    if count_noise_multiplier is not None:
        check_noise_multiplier(count_noise_multiplier, "count-noise-multiplier")
        if count_rho_fraction is not None:
            raise ValueError("give count-noise-multiplier or count-rho-fraction, not both")
    if count_rho_fraction is not None:
        if target_rho is None:
            raise ValueError("count-rho-fraction applies only with target-rho (it splits that budget)")
        number_in("count-rho-fraction", count_rho_fraction, 0.0, 1.0, low_open=True, high_open=True)
    if target_rho is None and count_noise_multiplier is None:
        raise ValueError(
            "target-quantile needs count-noise-multiplier (the clipped-count query's noise; Andrew et al. "
            "suggest clients-per-round / 10), or target-rho to split with count-rho-fraction"
        )


class AdaptiveClipping:
    """The clip norm of a run with adaptive clipping, and its clipped-count query.

    Parameters
    ----------
    initial_clip_norm:
        ``C_0`` (the scenario's ``clip-norm``).
    target_quantile:
        ``gamma`` in ``(0, 1)``: the fraction of updates meant to fit under the clip norm.
    clip_lr:
        ``eta`` > 0: the geometric rate (the clip norm changes by at most ``exp(eta)`` a round).
    count_noise_multiplier:
        ``z_b``: the count's noise std is ``z_b / 2``; ``None`` until solved (``target-rho``).
    """

    def __init__(self, *, initial_clip_norm: float, target_quantile: float, clip_lr: float,
                 count_noise_multiplier: float | None) -> None:
        self.initial_clip_norm = check_clip_norm(initial_clip_norm)
        self.target_quantile = number_in("target-quantile", target_quantile, 0.0, 1.0, low_open=True, high_open=True)
        self.clip_lr = positive_number("clip-lr", clip_lr)
        self.count_noise_multiplier = (
            None if count_noise_multiplier is None
            else check_noise_multiplier(count_noise_multiplier, "count-noise-multiplier")
        )
        self.clip_norm = self.initial_clip_norm
        self.source: NoiseSource | None = None
        self.denominator = 1.0
        #: the largest clip norm the update moves to (:meth:`setup`)
        self.max_clip_norm = MAX_CLIP_NORM

    def setup(self, *, source: NoiseSource, denominator: float, noise_multiplier: float) -> None:
        """Give the noise source, the fixed denominator and the update's noise multiplier ``z``
        (the clip norm stays below ``MAX_NOISE_STD / z``); the clip norm starts at ``C_0``."""
        self.source = source
        self.denominator = positive_number("denominator", denominator)
        self.max_clip_norm = min(MAX_CLIP_NORM, MAX_NOISE_STD / positive_number("noise_multiplier", noise_multiplier))
        self.clip_norm = self.initial_clip_norm

    def event(self, *, max_participations: int | None, min_separation: int, sampling_rate: float | None = None,
              update_noise_multiplier: float | None = None) -> ClippedCountEvent:
        """The count's privacy event for a round (with Poisson sampling: joint with the update's)."""
        if self.count_noise_multiplier is None:
            raise RuntimeError("adaptive clipping: the count's noise multiplier is solved at setup()")
        if sampling_rate is None:
            update_noise_multiplier = None
        return ClippedCountEvent(self.count_noise_multiplier, max_participations, min_separation,
                                 sampling_rate, update_noise_multiplier)

    def count_noise(self, round: int) -> float:
        """The count's noise of ``round``: ``N(0, (z_b / 2)**2)`` from words ``(TAG_COUNT, round)``."""
        from fedsim.privacy.noise import TAG_COUNT

        if self.source is None or self.count_noise_multiplier is None:
            raise RuntimeError("adaptive clipping: setup() must be called before a round")
        return float(self.source.normal((TAG_COUNT, int(round)), 1)[0]) * self.count_noise_multiplier / 2.0

    def noisy_fraction(self, round: int, below: int, reports: int) -> float:
        """``beta_t``: the released centred count over the denominator, plus 1/2."""
        released = (float(below) - float(reports) / 2.0) + self.count_noise(round)
        return released / self.denominator + 0.5

    def update(self, round: int, *, below: int, reports: int) -> float:
        """Release the round's count and move the clip norm; returns the new clip norm."""
        if not 0 <= below <= reports:
            raise ValueError(f"adaptive clipping: {below} bits under the clip norm out of {reports} reports")
        beta = self.noisy_fraction(round, below, reports)
        new = self.clip_norm * math.exp(-self.clip_lr * (beta - self.target_quantile))
        self.clip_norm = min(max(new, MIN_ADAPTIVE_CLIP), self.max_clip_norm)
        return self.clip_norm

    def state_dict(self) -> dict[str, Any]:
        """The current clip norm (a Python float: a checkpoint holds it exactly)."""
        return {"clip_norm": float(self.clip_norm)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if set(state) != {"clip_norm"}:
            raise ValueError(f"adaptive clipping state needs the key 'clip_norm', got {sorted(state)}")
        value = float(state["clip_norm"])
        if not MIN_ADAPTIVE_CLIP <= value <= self.max_clip_norm:
            raise ValueError(f"adaptive clipping state: clip_norm {value!r} out of range")
        self.clip_norm = value
