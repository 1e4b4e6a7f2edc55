"""``"blt"``: DP-FTRL noise from a buffered linear Toeplitz (BLT) factorization.

Dvijotham et al., arXiv:2404.16706; McMahan, Xu et al., arXiv:2408.08868: ``buffers`` float64
model-sized buffers whatever ``T``. The factorization is optimised for the run's ``(T, k, b)`` when
the mechanism is set up (:func:`fedsim.privacy.matrix_factorization.optimal_blt`), or given
(``decays`` and ``scales``); the life cycle and the guarantee are :class:`.ToeplitzMechanism`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedsim.privacy import matrix_factorization as mf
from fedsim.privacy.mechanisms.base import PlanDescription, option, register_mechanism
from fedsim.privacy.mechanisms.toeplitz import FactorizationOptions, ToeplitzMechanism
from fedsim.validation import is_int

if TYPE_CHECKING:
    from fedsim.privacy.matrix_factorization import BLT, ToeplitzFactorization
    from fedsim.privacy.matrix_factorization.blt import BLTNoise
    from fedsim.privacy.noise import NoiseSource

__all__ = ["BLTMechanism", "BLTOptions"]

#: More buffers than this measurably add nothing (3-7 are usually best).
MAX_BUFFERS = 12


@dataclass(frozen=True)
class BLTOptions(FactorizationOptions):
    """Options of ``mechanism = "blt"``.

    ``decays`` and ``scales`` (both or neither; decays in ``(0, 1)``, scales ``> 0`` summing to
    ``< 1``, so that the sensitivity is exact) give the BLT instead of the one optimised for the
    run's ``(T, k, b)``.
    """

    buffers: int = option(3, f"BLT buffers to optimise (1..{MAX_BUFFERS}, default 3)")
    decays: tuple[float, ...] | None = option(
        None, "decays of a given BLT", scenario=False, file="blt-params", file_extra=("family",))
    scales: tuple[float, ...] | None = option(
        None, "scales of a given BLT", scenario=False, file="blt-params", file_extra=("family",))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not is_int(self.buffers) or self.buffers < 1:
            raise ValueError(f"buffers must be an integer in 1..{MAX_BUFFERS}, got {self.buffers!r}")
        if self.buffers > MAX_BUFFERS:
            raise ValueError(f"buffers must be <= {MAX_BUFFERS}, got {self.buffers!r}")
        if (self.decays is None) != (self.scales is None):
            raise ValueError("decays and scales must be given together")
        if self.decays is not None and self.scales is not None:
            given = mf.BLT(tuple(self.decays), tuple(self.scales)).check_strategy()
            object.__setattr__(self, "decays", given.decays)
            object.__setattr__(self, "scales", given.scales)
            if sum(given.scales) >= 1.0:
                # c_1 = sum(scales) > c_0 = 1: only an upper bound on the sensitivity is known, and
                # it costs O(T^2) per round to account; the optimised BLTs always qualify
                raise ValueError(
                    f"scales must sum to < 1 (non-increasing Toeplitz coefficients, exact "
                    f"sensitivity), got {sum(given.scales):.6g}"
                )

    def given(self) -> BLT | None:
        """The BLT given by ``decays`` and ``scales``, if any."""
        if self.decays is None or self.scales is None:
            return None
        return mf.BLT(self.decays, self.scales)


class BLTMechanism(ToeplitzMechanism):
    """DP-FTRL noise from a buffered linear Toeplitz (BLT) factorization.

    Options (:class:`BLTOptions`): ``buffers`` (to optimise for, 3 by default), or a given BLT
    (``decays`` and ``scales``); ``error`` (``"max"``, default, or ``"mean"`` squared prefix-sum
    error, the optimisation target) and ``max_iterations`` of the optimiser.
    """

    name = "blt"
    Options = BLTOptions
    options: BLTOptions

    @property
    def buffers(self) -> int:
        return self.options.buffers

    @property
    def given(self) -> BLT | None:
        return self.options.given()

    def factorization_for(self, num_rounds: int) -> ToeplitzFactorization:
        assert self.max_participations is not None
        return mf.optimal_blt(num_rounds, self.max_participations, self.min_separation,
                              num_buffers=self.buffers, error=self.error,  # type: ignore[arg-type]
                              max_iter=self.options.max_iterations, blt=self.given)

    def noise_stream(self, factorization: ToeplitzFactorization, source: NoiseSource) -> BLTNoise:
        return mf.BLTNoise(factorization.blt, self.num_params, self.std, source)

    @classmethod
    def check_plan(cls, num_rounds: int, *, options: Any, max_participations: int | None,
                   min_separation: int) -> None:
        super().check_plan(num_rounds, options=options, max_participations=max_participations,
                           min_separation=min_separation)
        if num_rounds < 2 and options.given() is None:
            raise ValueError(f"rounds must be an integer >= 2 to optimise a blt factorization, got {num_rounds}")

    def optimised_for(self) -> str | None:
        return None if self.given is not None else super().optimised_for()

    def title(self, factorization: ToeplitzFactorization) -> str:
        return f"BLT matrix factorization, {factorization.blt.num_buffers} buffers"

    def factorization_rows(self, factorization: ToeplitzFactorization) -> tuple[tuple[str, str], ...]:
        blt = factorization.blt
        return (("BLT decays", ", ".join(f"{d:.17g}" for d in blt.decays)),
                ("BLT scales", ", ".join(f"{v:.17g}" for v in blt.scales)))

    def describe_plan(self, num_rounds: int, rho: float) -> PlanDescription:
        plan = super().describe_plan(num_rounds, rho)
        fields: dict[str, Any] = {**plan.fields, "num_buffers": len(plan.fields["decays"])}
        return PlanDescription(plan.title, fields, plan.rows, plan.tail_rows)


register_mechanism("blt", BLTMechanism)
