"""``"banded"``: DP-FTRL noise from a banded Toeplitz factorization with ``bands <= b + 1``.

Choquette-Choo et al., arXiv:2306.08153: ``bands - 1`` float32 model-sized vectors. The
factorization is optimised for the run's ``(T, k, b)`` when the mechanism is set up
(:func:`fedsim.privacy.matrix_factorization.optimal_banded`); the life cycle and the guarantee are
:class:`.ToeplitzMechanism`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedsim.privacy import matrix_factorization as mf
from fedsim.privacy.mechanisms.base import PlanDescription, option, register_mechanism
from fedsim.privacy.mechanisms.toeplitz import FactorizationOptions, ToeplitzMechanism
from fedsim.validation import int_at_least

if TYPE_CHECKING:
    from fedsim.privacy.matrix_factorization import ToeplitzFactorization
    from fedsim.privacy.matrix_factorization.banded import BandedNoise
    from fedsim.privacy.noise import NoiseSource

__all__ = ["BandedMechanism", "BandedOptions"]


@dataclass(frozen=True)
class BandedOptions(FactorizationOptions):
    """Options of ``mechanism = "banded"``."""

    bands: int | None = option(
        None, "bands of the banded factorization (1..min-separation + 1, default the maximum)")

    def __post_init__(self) -> None:
        super().__post_init__()
        int_at_least("bands", self.bands, 1, optional=True)


class BandedMechanism(ToeplitzMechanism):
    """DP-FTRL noise from a banded Toeplitz factorization with ``bands <= b + 1``.

    Options (:class:`BandedOptions`): ``bands`` (default ``min(b + 1, T)``, the largest with an
    exact sensitivity); ``error`` (``"max"``, default, or ``"mean"`` squared prefix-sum error, the
    optimisation target) and ``max_iterations`` of the optimiser.
    """

    name = "banded"
    Options = BandedOptions
    options: BandedOptions

    def __init__(self, *, noise_multiplier: float, clip_norm: float,
                 max_participations: int | None = 1, min_separation: int = 0,
                 **options: Any) -> None:
        super().__init__(noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                         max_participations=max_participations, min_separation=min_separation,
                         **options)
        if self.bands is not None and self.bands > self.min_separation + 1:
            raise ValueError(
                f"bands must be <= min-separation + 1 = {self.min_separation + 1}, got {self.bands}"
            )

    @property
    def bands(self) -> int | None:
        return self.options.bands

    def factorization_for(self, num_rounds: int) -> ToeplitzFactorization:
        assert self.max_participations is not None
        bands = None if self.bands is None else min(self.bands, num_rounds)
        if num_rounds == 1:
            return mf.ToeplitzFactorization("banded", (1.0,))
        return mf.optimal_banded(num_rounds, self.max_participations, self.min_separation,
                                 bands=bands, error=self.error,  # type: ignore[arg-type]
                                 max_iter=self.options.max_iterations)

    def noise_stream(self, factorization: ToeplitzFactorization, source: NoiseSource) -> BandedNoise:
        return mf.BandedNoise(factorization.params, self.num_params, self.std, source)

    @classmethod
    def check_plan(cls, num_rounds: int, *, options: Any, max_participations: int | None,
                   min_separation: int) -> None:
        super().check_plan(num_rounds, options=options, max_participations=max_participations,
                           min_separation=min_separation)
        if num_rounds < 2:
            raise ValueError(f"rounds must be an integer >= 2 to optimise a banded factorization, got {num_rounds}")
        top = min(min_separation + 1, num_rounds)
        if options.bands is not None and options.bands > top:
            raise ValueError(f"bands must be an integer in 1..min(min-separation + 1, rounds) = 1..{top}, "
                             f"got {options.bands}")

    def title(self, factorization: ToeplitzFactorization) -> str:
        return f"banded matrix factorization, {len(factorization.params)} bands"

    def factorization_rows(self, factorization: ToeplitzFactorization) -> tuple[tuple[str, str], ...]:
        coefs = factorization.params
        shown = ", ".join(f"{c:.6g}" for c in coefs[:6]) + (", ..." if len(coefs) > 6 else "")
        return (("band coefficients", shown + "  (all: --json --coefficients)"),)

    def describe_plan(self, num_rounds: int, rho: float) -> PlanDescription:
        """The coefficients (one per band: 314 at the Gboard setting) are a long field."""
        plan = super().describe_plan(num_rounds, rho)
        fields = {k: v for k, v in plan.fields.items() if k != "coefs"}
        fields["num_coefs"] = len(plan.fields["coefs"])
        return PlanDescription(plan.title, fields, plan.rows, plan.tail_rows,
                               long_fields={"coefs": plan.fields["coefs"]})


register_mechanism("banded", BandedMechanism)
