"""DP-FedAvg: user-level differentially private Federated Averaging.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models",
ICLR 2018 (arXiv:1710.06963), Algorithm 1 with the fixed-denominator estimator ``f_f``:

* every client clips its model delta to L2 norm ``C`` (``clip_norm``), and the server re-checks the
  bound, so one device changes the round's *sum* of deltas by at most ``C``;
* the server adds Gaussian noise ``N(0, (z C)**2 I)`` to the unweighted sum and divides by a
  *fixed* denominator: the expected cohort size ``q N`` with Poisson sampling, the cohort size
  with fixed-size cohorts. (Dividing by the realised cohort size would make the sensitivity
  depend on who was sampled.)
* the noisy average is applied as a server step, optionally with heavy-ball server momentum
  (``m <- momentum * m + avg``, ``theta <- theta + server_lr * m``; a server optimizer in the sense
  of Reddi et al., "Adaptive Federated Optimization", ICLR 2021). The server step is
  post-processing of the noisy average and does not change the guarantee.

Guarantee (user level: adding or removing all of one device's data):

* ``sampling = "poisson"``: every eligible device joins each round independently with
  probability ``q``: the round is the sampled Gaussian mechanism (Mironov, Talwar, Zhang,
  "Renyi Differential Privacy of the Sampled Gaussian Mechanism", 2019); the ledger records a
  ``SampledGaussianEvent(z, q)``. Devices that are not available or not eligible join with a
  smaller probability, which only strengthens the amplification for them, provided availability
  does not depend on the data. The amplification argument needs the sampling to be genuinely
  random and hidden from the adversary.
* ``sampling = "fixed"``: ``clients_per_round`` devices among the eligible ones; no amplification
  is claimed. Each round is a Gaussian mechanism with sensitivity ``C``: ``rho = 1 / (2 z**2)``
  per contribution, so ``rho = c / (2 z**2)`` for ``c`` contributions per device (at most the
  number of rounds, or ``max_participations``).

The noise of round ``r`` is a pure function of ``(secret seed, r)``
(:func:`fedsim.privacy.tree_noise.gaussian_noise`), so a replayed round adds the same noise.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from fedsim.engine import seeds
from fedsim.privacy.events import GaussianEvent, SampledGaussianEvent, check_noise_multiplier
from fedsim.privacy.tree_noise import gaussian_noise
from fedsim.strategy import ParticipationLimit, Strategy, StrategyContext
from fedsim.types import TrainConfig, UpdateBatch

__all__ = ["DPFedAvg"]


# ----------------------------------------------------------------------------------------------
# validation helpers shared with DP-FTRL: every message names the scenario key (kebab-case)


def positive_number(key: str, value: Any) -> float:
    """``value`` as a float that must be finite and > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{key} must be a number > 0, got {value!r}")
    return float(value)


def momentum_value(value: Any) -> float:
    """Momentum coefficient in ``[0, 1)``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ValueError(f"momentum must be a number in [0, 1), got {value!r}")
    return float(value)


def int_at_least(key: str, value: Any, low: int, *, optional: bool = False) -> int | None:
    """An integer ``>= low`` (or ``None`` when ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        extra = " (or omit it)" if optional else ""
        raise ValueError(f"{key} must be an integer >= {low}{extra}, got {value!r}")
    return int(value)


def noise_from_target(noise_multiplier: Any, target_rho: Any) -> tuple[float | None, float | None]:
    """Validate ``noise-multiplier`` / ``target-rho`` (at most one; neither: ``z = 1``)."""
    if target_rho is None:
        z = 1.0 if noise_multiplier is None else noise_multiplier
        return check_noise_multiplier(z, "noise-multiplier"), None
    if noise_multiplier is not None:
        raise ValueError("give noise-multiplier or target-rho, not both")
    if isinstance(target_rho, bool) or not isinstance(target_rho, int | float) or not np.isfinite(target_rho) or target_rho <= 0:
        raise ValueError(f"target-rho must be a finite number > 0, got {target_rho!r}")
    return None, float(target_rho)


def calibrate_to_target(
    target_rho: float,
    mechanism: str,
    *,
    num_rounds: int,
    max_participations: int | None,
    min_separation: int,
    restart_every: int | None = None,
) -> float:
    """The smallest noise multiplier whose run reaches at most ``target_rho`` (planning code).

    :func:`fedsim.privacy.calibration.calibrate_noise_multiplier` with the run's parameters: the
    accountant then reports ``rho = target_rho`` (to its relative tolerance, 1e-6) at the end of a
    run of ``num_rounds`` rounds. ``ValueError`` (naming ``target-rho``) when no noise multiplier
    reaches the target.
    """
    import warnings

    from fedsim.privacy.calibration import calibrate_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unreachable k is reported by the accountant's users
        try:
            return calibrate_noise_multiplier(
                target_rho,
                mechanism,
                rounds=num_rounds,
                max_participations=max_participations,
                min_separation=min_separation,
                restart_every=restart_every,
            )
        except ValueError as exc:
            raise ValueError(f"target-rho = {target_rho:g} over {num_rounds} rounds: {exc}") from None


def noise_seed(ctx: StrategyContext) -> int:
    """The secret noise seed of a simulated run, derived from the run seed.

    A deployment draws it from the OS's secure source instead (``secrets.randbits(63)``), keeps it
    only in the server's checkpoints, and never logs it.
    """
    return seeds.derived_seed(ctx.seed, seeds.STREAM_NOISE)


# ----------------------------------------------------------------------------------------------


class DPFedAvg(Strategy):
    """DP-FedAvg with fixed clipping, Gaussian noise on the sum and a fixed denominator.

    Parameters
    ----------
    noise_multiplier:
        ``z``: the noise standard deviation on the sum is ``z * clip_norm`` (default 1).
    target_rho:
        Instead of ``noise_multiplier``: the run's ``rho`` (zCDP). The smallest ``z`` that reaches
        it over the run's rounds (with ``max_participations``, ``min_separation``) is solved with
        :func:`fedsim.privacy.calibration.calibrate_noise_multiplier` before the first round.
    clip_norm:
        ``C``: L2 bound every client clips its delta to (sent in the round's ``TrainConfig``).
    server_lr:
        Server step size applied to the noisy average delta.
    momentum:
        Server heavy-ball momentum in ``[0, 1)`` (0: none).
    sampling:
        ``"fixed"`` (default): ``clients_per_round`` eligible devices, no amplification claimed;
        ``"poisson"``: each eligible device independently with probability ``sampling_rate``.
    sampling_rate:
        ``q`` for Poisson sampling; default ``clients_per_round / num_devices``.
    max_participations, min_separation:
        Optional per-device limit ``(k, b)``: at most ``k`` contributions, ``b`` rounds strictly
        between two of them; enforced by devices and the server, and used by the accountant.
    """

    name = "dp-fedavg"
    weighting = "uniform"

    def __init__(
        self,
        noise_multiplier: float | None = None,
        clip_norm: float = 1.0,
        server_lr: float = 1.0,
        momentum: float = 0.0,
        sampling: Literal["poisson", "fixed"] = "fixed",
        sampling_rate: float | None = None,
        max_participations: int | None = None,
        min_separation: int = 0,
        target_rho: float | None = None,
    ) -> None:
        z, self.target_rho = noise_from_target(noise_multiplier, target_rho)
        self.noise_multiplier: float = 1.0 if z is None else z  # solved in setup() from target-rho
        self.clip_norm = positive_number("clip-norm", clip_norm)
        self.server_lr = positive_number("server-lr", server_lr)
        self.momentum = momentum_value(momentum)
        if sampling not in ("poisson", "fixed"):
            raise ValueError(f"sampling must be 'poisson' or 'fixed', got {sampling!r}")
        self.sampling: Literal["poisson", "fixed"] = sampling
        if sampling_rate is not None:
            if sampling != "poisson":
                raise ValueError("sampling-rate applies only to sampling = \"poisson\"")
            if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, int | float) or not 0.0 < sampling_rate <= 1.0:
                raise ValueError(f"sampling-rate must be a number in (0, 1], got {sampling_rate!r}")
            sampling_rate = float(sampling_rate)
        self._requested_rate: float | None = sampling_rate
        self.sampling_rate: float | None = sampling_rate
        self.max_participations = int_at_least("max-participations", max_participations, 1, optional=True)
        self.min_separation = int_at_least("min-separation", min_separation, 0)
        self.buffer: torch.Tensor | None = None
        self._seed: int | None = None

    # -- set-up ------------------------------------------------------------------------------
    def calibrated_noise_multiplier(self, *, num_rounds: int) -> float:
        """The run's noise multiplier: ``noise-multiplier``, or solved from ``target-rho``."""
        if self.target_rho is None:
            return self.noise_multiplier
        return calibrate_to_target(
            self.target_rho,
            "dp-fedavg",
            num_rounds=num_rounds,
            max_participations=self.max_participations,
            min_separation=self.min_separation,
        )

    def setup(self, ctx: StrategyContext) -> None:
        super().setup(ctx)
        self.noise_multiplier = self.calibrated_noise_multiplier(num_rounds=ctx.num_rounds)
        self._seed = noise_seed(ctx)
        self.buffer = None
        if self.sampling == "poisson" and self._requested_rate is None:
            self.sampling_rate = min(1.0, ctx.clients_per_round / ctx.num_devices)

    @property
    def denominator(self) -> float:
        """The fixed denominator: expected cohort size ``q N`` (Poisson) or ``clients_per_round``."""
        if self.sampling == "poisson":
            assert self.sampling_rate is not None
            return self.sampling_rate * self.ctx.num_devices
        return float(self.ctx.clients_per_round)

    def participation_limit(self) -> ParticipationLimit | None:
        if self.max_participations is None and self.min_separation == 0:
            return None
        return ParticipationLimit(self.max_participations, self.min_separation)

    # -- a round -----------------------------------------------------------------------------
    def select(self, *, round: int, eligible: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Poisson: each eligible device independently with probability ``q``; else uniform."""
        if self.sampling == "fixed":
            return super().select(round=round, eligible=eligible, rng=rng)
        assert self.sampling_rate is not None
        mask = rng.random(len(eligible)) < self.sampling_rate
        return np.sort(np.asarray(eligible)[mask])

    def configure_client(self, *, round: int, base: TrainConfig) -> TrainConfig:
        from dataclasses import replace

        return replace(base, clip_norm=self.clip_norm)

    def noisy_average(self, round: int, batch: UpdateBatch) -> torch.Tensor:
        """``(sum of clipped deltas + N(0, (zC)^2 I)) / denominator`` for this round."""
        assert self._seed is not None, "setup() must be called before aggregate()"
        std = self.noise_multiplier * self.clip_norm
        noise = gaussian_noise(self._seed, round, batch.delta_sum.numel(), std)
        return (batch.delta_sum + noise) / self.denominator

    def aggregate(self, *, round: int, params: torch.Tensor, batch: UpdateBatch) -> torch.Tensor:
        # every round releases a noisy sum, even one without accepted updates
        avg = self.noisy_average(round, batch)
        if self.momentum > 0:
            self.buffer = avg if self.buffer is None else self.buffer.mul(self.momentum).add_(avg)
            step = self.buffer
        else:
            step = avg
        return params + self.server_lr * step

    def privacy_event(self, *, round: int) -> GaussianEvent | SampledGaussianEvent:
        if self.sampling == "poisson":
            rate = self.sampling_rate
            if rate is None:  # before setup: the rate is clients_per_round / num_devices
                raise RuntimeError("dp-fedavg: the Poisson sampling rate is known after setup()")
            return SampledGaussianEvent(
                self.noise_multiplier, rate, max_participations=self.max_participations, min_separation=self.min_separation
            )
        return GaussianEvent(
            self.noise_multiplier, max_participations=self.max_participations, min_separation=self.min_separation
        )

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"buffer": None if self.buffer is None else self.buffer.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"buffer"}
        if unknown:
            raise ValueError(f"dp-fedavg state has unknown keys {sorted(unknown)}")
        buf = state.get("buffer")
        self.buffer = None if buf is None else torch.as_tensor(buf, dtype=torch.float32).clone()
