"""Matrix-factorization mechanisms for DP-FTRL: ``"blt"`` and ``"banded"``.

Both release, each round ``t``, the increment ``x_t + z C_clip (C^-1 xi)_t`` of the noisy prefix
sum ``A x + z C_clip A C^-1 xi`` (``A`` the prefix-sum matrix), for a lower-triangular Toeplitz
strategy ``C`` chosen for the run's ``(T, k, b)`` when the mechanism is set up
(:mod:`fedsim.privacy.matrix_factorization`):

* :class:`BLTMechanism` -- a buffered linear Toeplitz strategy (Dvijotham et al.,
  arXiv:2404.16706; McMahan, Xu et al., arXiv:2408.08868), ``buffers`` float64 model-sized
  buffers whatever ``T``;
* :class:`BandedMechanism` -- a banded Toeplitz strategy (Choquette-Choo et al.,
  arXiv:2306.08153) with ``bands <= b + 1``, ``bands - 1`` float32 model-sized vectors.

Guarantee (user level): the noisy prefix sums are post-processing of ``C x + z C_clip xi``, a
Gaussian mechanism whose L2 sensitivity under the participation limit ``(k, b)`` is
``C_clip sens(C)`` (exact for the strategies optimised here, see
:func:`~fedsim.privacy.matrix_factorization.toeplitz_sensitivity_sq`), so after ``n`` rounds the
run is ``sens_n^2 / (2 z^2)``-zCDP; each round records a
:class:`~fedsim.privacy.events.MatrixFactorizationEvent` carrying the strategy, and the accountant
computes that ``rho``.

The noise of round ``t`` is drawn as ``source.normal((TAG, t), P)``: a pure function of the noise
key and the round, so a round replayed from the state saved before it adds the same noise, bit for
bit. The state (buffers or band history) is as secret as the key.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from fedsim.privacy.accountant import mf_sensitivity_sq
from fedsim.privacy.calibration import calibrate_mf_noise_multiplier
from fedsim.privacy.events import MatrixFactorizationEvent
from fedsim.privacy.matrix_factorization import (
    BLT,
    BandedNoise,
    BLTNoise,
    ErrorKind,
    MFStrategy,
    banded_strategy,
    blt_strategy,
)
from fedsim.privacy.mechanisms import Mechanism, register_mechanism
from fedsim.privacy.noise import NoiseSource
from fedsim.validation import choice, int_at_least

__all__ = ["BLTMechanism", "BandedMFMechanism", "BandedMechanism"]


class _MatrixFactorizationMechanism(Mechanism):
    """Shared life cycle: choose the strategy at ``setup``, stream its noise, record its events."""

    family: ClassVar[str] = ""

    def __init__(self, *, noise_multiplier: float, clip_norm: float,
                 max_participations: int | None = 1, min_separation: int = 0,
                 error: ErrorKind = "max") -> None:
        super().__init__(
            noise_multiplier=noise_multiplier,
            clip_norm=clip_norm,
            max_participations=int_at_least("max-participations", max_participations, 1),
            min_separation=min_separation,
        )
        self.error: ErrorKind = choice("error", error, ("max", "mean"))  # type: ignore[assignment]
        self.strategy: MFStrategy | None = None
        self.stream: BLTNoise | BandedNoise | None = None

    def _strategy(self, num_rounds: int) -> MFStrategy:
        raise NotImplementedError

    def _stream(self, strategy: MFStrategy, source: NoiseSource) -> BLTNoise | BandedNoise:
        raise NotImplementedError

    def sensitivity_sq(self, num_rounds: int) -> float:
        """Worst-case ``sens^2`` (units of ``C_clip^2``) of the strategy for ``num_rounds`` rounds."""
        assert self.max_participations is not None
        strategy = self._strategy(num_rounds)
        value, _ = mf_sensitivity_sq(strategy.family, strategy.params, self.max_participations,
                                     self.min_separation, num_rounds)
        return value

    def calibrate(self, target_rho: float, *, num_rounds: int) -> float:
        """Smallest ``z`` whose ``num_rounds``-round run reaches ``target_rho`` (the planning code).

        The strategy is the one :meth:`setup` will choose for ``num_rounds`` (deterministic and
        cached), so ``fedsim privacy dp-ftrl --mechanism ... --target-rho`` gives the same ``z``.
        """
        return calibrate_mf_noise_multiplier(target_rho, self.sensitivity_sq(num_rounds))

    def setup(self, *, num_params: int, num_rounds: int, source: NoiseSource) -> None:
        super().setup(num_params=num_params, num_rounds=num_rounds, source=source)
        self.strategy = self._strategy(self.num_rounds)
        self.stream = self._stream(self.strategy, source)

    def _require_strategy(self) -> MFStrategy:
        if self.strategy is None:
            raise RuntimeError(f"{type(self).__name__}: setup() must be called first")
        return self.strategy

    @property
    def next_round(self) -> int:
        """The round :meth:`release` expects next."""
        return 0 if self.stream is None else self.stream.next_round

    def privacy_event(self, round: int) -> MatrixFactorizationEvent:
        strategy = self._require_strategy()
        assert self.max_participations is not None
        return MatrixFactorizationEvent(self.noise_multiplier, self.max_participations,
                                        self.min_separation, strategy.family, strategy.params)

    def release(self, round: int, clipped_sum: torch.Tensor) -> torch.Tensor:
        """``x_t + z C_clip (C^-1 xi)_t``; rounds in order (restore a saved state to replay one)."""
        self._require_setup()
        stream = self.stream
        assert stream is not None
        return clipped_sum + stream.step(round)

    def state_dict(self) -> dict[str, Any]:
        strategy = self._require_strategy()
        assert self.stream is not None
        return {"params": list(strategy.params), "stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        strategy = self._require_strategy()
        assert self.stream is not None
        if set(state) != {"params", "stream"}:
            raise ValueError(f"{self.name} mechanism state needs keys ['params', 'stream'], got {sorted(state)}")
        if tuple(float(v) for v in state["params"]) != strategy.params:
            raise ValueError(
                f"{self.name} mechanism state was saved with another strategy than this set-up "
                "chose (different rounds, participation limit or strategy options)"
            )
        self.stream.load_state_dict(state["stream"])


class BLTMechanism(_MatrixFactorizationMechanism):
    """DP-FTRL noise from a buffered linear Toeplitz (BLT) strategy.

    Parameters
    ----------
    buffers:
        Number of BLT buffers to optimise for (3 by default; 3-7 are usually best).
    decays, scales:
        A given BLT (both or neither; decays in ``(0, 1)``, scales ``> 0`` summing to ``< 1``, so
        that its sensitivity is exact) instead of the one optimised for the run's ``(T, k, b)``.
    error:
        ``"max"`` (default) or ``"mean"`` squared prefix-sum error, the optimisation target.
    """

    name = "blt"
    family = "blt"

    def __init__(self, *, noise_multiplier: float, clip_norm: float,
                 max_participations: int | None = 1, min_separation: int = 0,
                 buffers: int = 3, decays: list[float] | None = None,
                 scales: list[float] | None = None, error: ErrorKind = "max") -> None:
        super().__init__(noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                         max_participations=max_participations, min_separation=min_separation,
                         error=error)
        self.buffers = int_at_least("buffers", buffers, 1)
        if self.buffers > 12:
            raise ValueError(f"buffers must be <= 12, got {self.buffers}")
        if (decays is None) != (scales is None):
            raise ValueError("decays and scales must be given together")
        self.given = None if decays is None else BLT(tuple(decays), tuple(scales)).check_strategy()
        if self.given is not None and sum(self.given.scales) >= 1.0:
            # c_1 = sum(scales) > c_0 = 1: only an upper bound on the sensitivity is known, and
            # it costs O(T^2) per round to account; the optimised strategies always qualify
            raise ValueError(
                f"scales must sum to < 1 (non-increasing Toeplitz coefficients, exact "
                f"sensitivity), got {sum(self.given.scales):.6g}"
            )

    def _strategy(self, num_rounds: int) -> MFStrategy:
        assert self.max_participations is not None
        return blt_strategy(num_rounds, self.max_participations, self.min_separation,
                            num_buffers=self.buffers, error=self.error, blt=self.given)

    def _stream(self, strategy: MFStrategy, source: NoiseSource) -> BLTNoise:
        return BLTNoise(strategy.blt, self.num_params, self.std, source)


class BandedMechanism(_MatrixFactorizationMechanism):
    """DP-FTRL noise from a banded Toeplitz strategy with ``bands <= b + 1``.

    Parameters
    ----------
    bands:
        Band width (default ``min(b + 1, T)``, the largest with an exact sensitivity).
    error:
        ``"max"`` (default) or ``"mean"`` squared prefix-sum error, the optimisation target.
    """

    name = "banded"
    family = "banded"

    def __init__(self, *, noise_multiplier: float, clip_norm: float,
                 max_participations: int | None = 1, min_separation: int = 0,
                 bands: int | None = None, error: ErrorKind = "max") -> None:
        super().__init__(noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                         max_participations=max_participations, min_separation=min_separation,
                         error=error)
        self.bands = int_at_least("bands", bands, 1, optional=True)
        if self.bands is not None and self.bands > self.min_separation + 1:
            raise ValueError(
                f"bands must be <= min-separation + 1 = {self.min_separation + 1}, got {self.bands}"
            )

    def _strategy(self, num_rounds: int) -> MFStrategy:
        assert self.max_participations is not None
        bands = None if self.bands is None else min(self.bands, num_rounds)
        if num_rounds == 1:
            return MFStrategy("banded", (1.0,))
        return banded_strategy(num_rounds, self.max_participations, self.min_separation,
                               bands=bands, error=self.error)

    def _stream(self, strategy: MFStrategy, source: NoiseSource) -> BandedNoise:
        return BandedNoise(strategy.params, self.num_params, self.std, source)


#: The name of issue #14 for the banded mechanism.
BandedMFMechanism = BandedMechanism

register_mechanism("blt", BLTMechanism)
register_mechanism("banded", BandedMechanism)
