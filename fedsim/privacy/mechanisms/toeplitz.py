"""The life cycle the matrix-factorization mechanisms share (:class:`ToeplitzMechanism`).

Each round ``t`` releases the increment ``x_t + z C_clip (C^-1 xi)_t`` of the noisy prefix sum
``A x + z C_clip A C^-1 xi`` (``A`` the prefix-sum matrix), for a lower-triangular Toeplitz strategy
matrix ``C`` (a :class:`~fedsim.privacy.matrix_factorization.ToeplitzFactorization`) chosen for the
run's ``(T, k, b)`` when the mechanism is set up (:mod:`fedsim.privacy.matrix_factorization`).

Guarantee (user level): the noisy prefix sums are post-processing of ``C x + z C_clip xi``, a
Gaussian mechanism whose L2 sensitivity under the participation limit ``(k, b)`` is
``C_clip sens(C)`` (exact for the factorizations optimised here, see
:func:`~fedsim.privacy.matrix_factorization.toeplitz_sensitivity_sq`), so after ``n`` rounds the
run is ``sens_n^2 / (2 z^2)``-zCDP; each round records a
:class:`~fedsim.privacy.events.MatrixFactorizationEvent` carrying the factorization, and the
accountant computes that ``rho``.

The noise of round ``t`` is drawn as ``source.normal((TAG, t), P)``: a pure function of the noise
key and the round, so a round replayed from the state saved before it adds the same noise, bit for
bit. The state (buffers or band history) is as secret as the key.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from fedsim.privacy.events import MatrixFactorizationEvent, mf_sensitivity_sq
from fedsim.privacy.mechanisms.base import Mechanism, PlanDescription, option
from fedsim.privacy.sensitivity import max_tree_sensitivity_sq
from fedsim.privacy.tree_structure import prefix_rms
from fedsim.validation import choice, int_at_least

if TYPE_CHECKING:
    import torch

    from fedsim.privacy.matrix_factorization import ToeplitzFactorization
    from fedsim.privacy.matrix_factorization.streaming import NoiseStream
    from fedsim.privacy.noise import NoiseSource

__all__ = ["FactorizationOptions", "ToeplitzMechanism"]


@dataclass(frozen=True)
class FactorizationOptions:
    """Options every matrix-factorization mechanism has (planning options: a run uses the defaults)."""

    error: Literal["max", "mean"] = option(
        "max", "prefix-sum error the factorization is optimised for (default max)", scenario=False)
    max_iterations: int = option(
        2000, "L-BFGS iterations per start when optimising a factorization (default 2000)",
        scenario=False)

    def __post_init__(self) -> None:
        choice("error", self.error, ("max", "mean"))
        int_at_least("max-iterations", self.max_iterations, 1)


class ToeplitzMechanism(Mechanism):
    """Shared life cycle: choose the factorization at ``setup``, stream its noise, record its events.

    Subclasses give :meth:`factorization_for` (deterministic and cached: a plan and a run of the
    same ``(T, k, b)`` and options get the same one) and :meth:`noise_stream`.
    """

    correlated = True
    options: FactorizationOptions

    def __init__(self, *, noise_multiplier: float, clip_norm: float,
                 max_participations: int | None = 1, min_separation: int = 0,
                 **options: Any) -> None:
        super().__init__(
            noise_multiplier=noise_multiplier,
            clip_norm=clip_norm,
            max_participations=int_at_least("max-participations", max_participations, 1),
            min_separation=min_separation,
            **options,
        )
        self.factorization: ToeplitzFactorization | None = None
        self.stream: NoiseStream | None = None

    @property
    def error(self) -> str:
        return self.options.error

    @abstractmethod
    def factorization_for(self, num_rounds: int) -> ToeplitzFactorization:
        """The factorization a run of ``num_rounds`` rounds uses (the same for a plan and a run)."""

    @abstractmethod
    def noise_stream(self, factorization: ToeplitzFactorization, source: NoiseSource) -> NoiseStream:
        """The online ``std (C^-1 xi)_t`` stream of ``factorization``."""

    def sensitivity(self, num_rounds: int) -> tuple[float, bool]:
        """``(sens^2, exact)`` (units of ``C_clip^2``) of the factorization for ``num_rounds`` rounds."""
        assert self.max_participations is not None
        f = self.factorization_for(num_rounds)
        return mf_sensitivity_sq(f.family, f.params, self.max_participations, self.min_separation,
                                 num_rounds)

    def setup(self, *, num_params: int, num_rounds: int, source: NoiseSource) -> None:
        super().setup(num_params=num_params, num_rounds=num_rounds, source=source)
        self.factorization = self.factorization_for(self.num_rounds)
        self.stream = self.noise_stream(self.factorization, source)

    def require_factorization(self) -> ToeplitzFactorization:
        """The factorization chosen at :meth:`setup`, or ``RuntimeError`` before it."""
        if self.factorization is None:
            raise RuntimeError(f"{type(self).__name__}: setup() must be called first")
        return self.factorization

    @property
    def next_round(self) -> int:
        """The round :meth:`release` expects next."""
        return 0 if self.stream is None else self.stream.next_round

    def event_for(self, factorization: ToeplitzFactorization) -> MatrixFactorizationEvent:
        """The event of a round released with ``factorization``."""
        assert self.max_participations is not None
        return MatrixFactorizationEvent(self.noise_multiplier, self.max_participations,
                                        self.min_separation, factorization.family,
                                        factorization.params)

    def privacy_event(self, round: int) -> MatrixFactorizationEvent:
        return self.event_for(self.require_factorization())

    def plan_events(self, num_rounds: int) -> list[MatrixFactorizationEvent]:
        """``num_rounds`` copies of the event of the factorization :meth:`setup` will choose."""
        return [self.event_for(self.factorization_for(num_rounds))] * num_rounds

    @classmethod
    def check_plan(cls, num_rounds: int, *, options: Any, max_participations: int | None,
                   min_separation: int) -> None:
        """An unreachable ``k`` would optimise the factorization for fewer contributions than asked."""
        k = 1 if max_participations is None else max_participations
        b = min_separation
        fit = -(-num_rounds // (b + 1))
        if k > fit:
            raise ValueError(
                f"max-participations {k} is infeasible with rounds {num_rounds} and "
                f"min-separation {b} (at most ceil({num_rounds}/{b + 1}) = {fit} contributions fit)"
            )

    def release(self, round: int, clipped_sum: torch.Tensor) -> torch.Tensor:
        """``x_t + z C_clip (C^-1 xi)_t``; rounds in order (restore a saved state to replay one)."""
        self.require_setup()
        stream = self.stream
        assert stream is not None
        return clipped_sum + stream.step(round)

    # -- the planning report --------------------------------------------------------------------
    def optimised_for(self) -> str | None:
        """What the factorization is optimised for (``None``: it was given)."""
        return f"{self.error} error"

    def factorization_rows(self, factorization: ToeplitzFactorization) -> tuple[tuple[str, str], ...]:
        """Table rows showing the factorization's parameters."""
        return ()

    def describe_plan(self, num_rounds: int, rho: float) -> PlanDescription:
        assert self.max_participations is not None
        k, b, z = self.max_participations, self.min_separation, self.noise_multiplier
        f = self.factorization_for(num_rounds)
        s, exact = mf_sensitivity_sq(f.family, f.params, k, b, num_rounds)
        variances = f.prefix_variances(num_rounds)
        tree_s = max_tree_sensitivity_sq(num_rounds, k, b)
        tree_z = math.sqrt(tree_s / (2.0 * rho))
        fields: dict[str, Any] = {
            "sensitivity_sq": s,
            "sensitivity_exact": exact,
            "prefix_rmse": z * math.sqrt(float(variances.mean())),
            "prefix_max_std": z * math.sqrt(float(variances.max())),
            "optimised_for": self.optimised_for(),
            **{key: value for key, value in f.to_dict().items() if key != "family"},
            "tree_noise_multiplier": tree_z,
            "tree_sensitivity_sq": tree_s,
            "tree_prefix_rmse": tree_z * prefix_rms(num_rounds, estimator="efficient"),
            "tree_prefix_rmse_vanilla": tree_z * prefix_rms(num_rounds, estimator="vanilla"),
        }
        optimised = self.optimised_for()
        rows = (
            ("factorization", "optimised for " + optimised if optimised else "given (decays and scales)"),
            *self.factorization_rows(f),
            ("sensitivity^2", f"{s:.6g} C^2  (" + ("exact" if exact else "upper bound") + ")"),
        )
        tail = (
            ("prefix-sum RMSE", f"{fields['prefix_rmse']:.4g} C  (worst round: std "
             f"{fields['prefix_max_std']:.4g} C)"),
            ("tree at same rho", f"noise multiplier {tree_z:.4g}, prefix-sum RMSE "
             f"{fields['tree_prefix_rmse']:.4g} C efficient, "
             f"{fields['tree_prefix_rmse_vanilla']:.4g} C vanilla"),
        )
        return PlanDescription(title=self.title(f), fields=fields, rows=rows, tail_rows=tail)

    def title(self, factorization: ToeplitzFactorization) -> str:
        """The report's name of this noise."""
        return f"{self.name} matrix factorization"

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        factorization = self.require_factorization()
        assert self.stream is not None
        return {"params": list(factorization.params), "stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        factorization = self.require_factorization()
        assert self.stream is not None
        if set(state) != {"params", "stream"}:
            raise ValueError(f"{self.name} mechanism state needs keys ['params', 'stream'], got {sorted(state)}")
        if tuple(float(v) for v in state["params"]) != factorization.params:
            raise ValueError(
                f"{self.name} mechanism state was saved with another strategy matrix than this "
                "set-up chose (different rounds, participation limit or options)"
            )
        self.stream.load_state_dict(state["stream"])

