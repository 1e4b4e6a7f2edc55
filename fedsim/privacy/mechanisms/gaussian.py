"""``"gaussian"``: the Gaussian mechanism on each round's sum, fresh noise every round.

``x_t + N(0, (z C)^2 I)`` (the Gaussian mechanism, Dwork & Roth, "The Algorithmic Foundations of
Differential Privacy", 2014, Thm. A.1; zCDP ``rho = 1/(2 z^2)`` per contribution, Bun & Steinke
2016, Prop. 1.6). With Poisson sampling of devices at rate ``q`` it is the sampled Gaussian
mechanism (Mironov, Talwar, Zhang 2019), as in DP-FedAvg (McMahan, Ramage, Talwar, Zhang, ICLR
2018).

Guarantee: per round, a Gaussian mechanism with L2 sensitivity ``C``; with Poisson sampling, the
sampled Gaussian mechanism, which needs the sampling to be random and hidden. User level, under
the participation limit ``(k, b)``, provided the clip bound is enforced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedsim.privacy.events import GaussianEvent, SampledGaussianEvent
from fedsim.privacy.mechanisms.base import Mechanism, PlanDescription, register_mechanism
from fedsim.privacy.sensitivity import max_gaussian_participations
from fedsim.validation import number_in

if TYPE_CHECKING:
    import torch

__all__ = ["GaussianSumMechanism"]


class GaussianSumMechanism(Mechanism):
    """``x_t + N(0, (z C)^2 I)``, fresh noise each round (a pure function of the key and ``t``).

    Parameters
    ----------
    sampling_rate:
        ``q`` when devices are Poisson-sampled at that rate (the event is then a
        :class:`~fedsim.privacy.events.SampledGaussianEvent`); ``None``: a fixed cohort, no
        amplification claimed (:class:`~fedsim.privacy.events.GaussianEvent`). Set by the
        strategy that samples, not an option of the mechanism.
    """

    name = "gaussian"
    accounts_for_sampling = True

    def __init__(
        self,
        *,
        noise_multiplier: float,
        clip_norm: float,
        max_participations: int | None = None,
        min_separation: int = 0,
        sampling_rate: float | None = None,
    ) -> None:
        super().__init__(
            noise_multiplier=noise_multiplier,
            clip_norm=clip_norm,
            max_participations=max_participations,
            min_separation=min_separation,
        )
        self.sampling_rate = (
            None if sampling_rate is None else number_in("sampling-rate", sampling_rate, 0.0, 1.0, low_open=True)
        )

    def privacy_event(self, round: int) -> GaussianEvent | SampledGaussianEvent:
        if self.sampling_rate is not None:
            return SampledGaussianEvent(
                self.noise_multiplier,
                self.sampling_rate,
                max_participations=self.max_participations,
                min_separation=self.min_separation,
            )
        return GaussianEvent(
            self.noise_multiplier, max_participations=self.max_participations, min_separation=self.min_separation
        )

    def noise(self, round: int) -> torch.Tensor:
        """The noise of ``round``: ``N(0, (z C)^2 I)`` from words ``(TAG_ROUND, round)``."""
        from fedsim.privacy.noise import TAG_ROUND

        source = self.require_setup()
        if round < 0:
            raise ValueError(f"round must be >= 0, got {round}")
        out = source.normal((TAG_ROUND, int(round)), self.num_params)
        std = self.std
        return out.mul_(std) if std != 1.0 else out

    def plan_events(self, num_rounds: int) -> list[GaussianEvent | SampledGaussianEvent]:
        """Every round records the same event."""
        return [self.privacy_event(0)] * num_rounds

    def release(self, round: int, clipped_sum: torch.Tensor) -> torch.Tensor:
        return clipped_sum + self.noise(round)

    def describe_plan(self, num_rounds: int, rho: float) -> PlanDescription:
        m = max_gaussian_participations(num_rounds, self.max_participations, self.min_separation)
        return PlanDescription(
            title="Poisson sampling" if self.sampling_rate is not None else "Gaussian, no sampling",
            fields={"sensitivity_sq": m},
            rows=(("contributions (m)", f"{m} (rho bound, unamplified)"),),
        )


register_mechanism("gaussian", GaussianSumMechanism)
