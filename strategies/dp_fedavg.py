"""DP-FedAvg: user-level differentially private Federated Averaging.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models",
ICLR 2018 (arXiv:1710.06963), Algorithm 1 with the fixed-denominator estimator ``f_f``:

* every client clips its model delta to L2 norm ``C`` (``clip_norm``), and the server re-checks the
  bound, so one device changes the round's *sum* of deltas by at most ``C``;
* the server adds Gaussian noise ``N(0, (z C)**2 I)`` to the unweighted sum and divides by a
  *fixed* denominator: the expected cohort size ``q N`` with Poisson sampling, the cohort size
  with fixed-size cohorts. (Dividing by the realised cohort size would make the sensitivity
  depend on who was sampled.)
* the noisy average is applied as a server step: SGD, optionally with heavy-ball server momentum
  (``m <- momentum * m + avg``, ``theta <- theta + server_lr * m``), or an adaptive server
  optimizer (``server-optimizer = "adam" | "yogi" | "adagrad"``: DP-FedAdam and its siblings, the
  server optimizers of Reddi et al., "Adaptive Federated Optimization", ICLR 2021;
  :mod:`fedsim.optim`). The server step and its state are post-processing of the noisy averages
  and do not change the guarantee.

Guarantee (user level: adding or removing all of one device's data):

* ``sampling = "poisson"``: every eligible device joins each round independently with
  probability ``q``: the round is the sampled Gaussian mechanism (Mironov, Talwar, Zhang,
  "Renyi Differential Privacy of the Sampled Gaussian Mechanism", 2019); the ledger records a
  ``SampledGaussianEvent(z, q)``. Devices that are not available or not eligible join with a
  smaller probability, which only strengthens the amplification for them, provided availability
  does not depend on the data. The amplification argument needs the sampling to be genuinely
  random and hidden from the adversary; where the cohort is not hidden (on Flower every sampled
  device gets its own message) the round owner records the round unamplified
  (``RoundOwner(secret_cohort=False)``, :meth:`SampledGaussianEvent.unamplified`).
* ``sampling = "fixed"``: ``clients_per_round`` devices among the eligible ones; no amplification
  is claimed. Each round is a Gaussian mechanism with sensitivity ``C``: ``rho = 1 / (2 z**2)``
  per contribution, so ``rho = c / (2 z**2)`` for ``c`` contributions per device (at most the
  number of rounds, or ``max_participations``).

The strategy is the Gaussian sum mechanism (``mechanism = "gaussian"``, the default:
:class:`fedsim.privacy.mechanisms.gaussian.GaussianSumMechanism`) composed with the server optimizer
(:class:`fedsim.optim.ServerOptimizer`). Another registered mechanism whose releases are independent
noisy sums (``correlated = False``) gives another DP-FedAvg without a new strategy; Poisson sampling
needs one that accounts for it (the sampled Gaussian mechanism's amplification is claimed only
there). The noise of round ``r`` is a pure function of the run's noise key and ``r``, so a
replayed round adds the same noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from fedsim.privacy.events import PrivacyEvent
from fedsim.privacy.mechanisms import Mechanism, mechanism_class
from fedsim.privacy.noise import TAG_SAMPLE
from fedsim.registry import resolve_params
from fedsim.strategy import MechanismParams, MechanismStrategy, ParticipationLimit, StrategyContext
from fedsim.validation import choice, number_in

__all__ = ["DPFedAvg", "DPFedAvgParams"]


@dataclass(frozen=True)
class DPFedAvgParams(MechanismParams):
    """``[strategy] name = "dp-fedavg"`` parameters (kebab-case in a scenario).

    The mechanism's and optimizer's fields are :class:`~fedsim.strategy.MechanismParams`'
    (``noise_multiplier`` or ``target_rho``, ``clip_norm``, ``max_participations`` (default
    ``None``: no limit), ``min_separation``; the server optimizer's ``server_lr``,
    ``server_optimizer`` (``"sgd"``, ``"adam"``, ``"yogi"``, ``"adagrad"``), ``momentum`` (SGD,
    default 0), ``beta1``, ``beta2``, ``tau``), and:

    Attributes
    ----------
    sampling:
        ``"fixed"`` (default): ``clients_per_round`` eligible devices, no amplification claimed;
        ``"poisson"``: each eligible device independently with probability ``sampling_rate``.
    sampling_rate:
        ``q`` for Poisson sampling; default ``clients_per_round / num_devices``.
    mechanism:
        ``"gaussian"`` (default) or another mechanism with independent noise each round
        (``correlated = False``); Poisson sampling needs one that accounts for sampling.
    """

    max_participations: int | None = None
    sampling: Literal["poisson", "fixed"] = "fixed"
    sampling_rate: float | None = None
    mechanism: str = "gaussian"

    strategy_name: ClassVar[str] = "dp-fedavg"

    def __post_init__(self) -> None:
        super().__post_init__()
        choice("sampling", self.sampling, ("poisson", "fixed"))
        if self.sampling_rate is not None:
            if self.sampling != "poisson":
                raise ValueError("sampling-rate applies only to sampling = \"poisson\"")
            number_in("sampling-rate", self.sampling_rate, 0.0, 1.0, low_open=True)
        if self.sampling == "poisson" and not mechanism_class(self.mechanism).accounts_for_sampling:
            raise ValueError(f"sampling = \"poisson\" needs a mechanism that accounts for sampling "
                             f"(\"gaussian\"), not mechanism = {self.mechanism!r}")

    @classmethod
    def takes(cls, mechanism: type[Mechanism]) -> bool:
        """Mechanisms whose every release is an independent noisy sum (not a correlated prefix)."""
        return not mechanism.correlated


class DPFedAvg(MechanismStrategy):
    """DP-FedAvg with fixed clipping, Gaussian noise on the sum and a fixed denominator.

    Built from a :class:`DPFedAvgParams` or its fields as keywords
    (``DPFedAvg(noise_multiplier=1.1, clip_norm=0.5)``).
    """

    name = "dp-fedavg"
    weighting = "uniform"
    Params = DPFedAvgParams

    def __init__(self, params: DPFedAvgParams | None = None, /, **kwargs: Any) -> None:
        p = resolve_params(DPFedAvgParams, params, kwargs)
        sampled = {"sampling_rate": p.sampling_rate} if p.sampling == "poisson" else {}
        self.compose(p, p.build_mechanism(**sampled))
        self.sampling: Literal["poisson", "fixed"] = p.sampling
        self.requested_rate: float | None = p.sampling_rate

    @property
    def sampling_rate(self) -> float | None:
        """``q`` of Poisson sampling (known after :meth:`setup` when not given), else ``None``."""
        return self.mechanism.sampling_rate

    # -- set-up ------------------------------------------------------------------------------
    def setup(self, ctx: StrategyContext) -> None:
        # the rate first: the fixed denominator (adaptive clipping's, a deployment-equivalent noise's) depends on it
        if self.sampling == "poisson" and self.requested_rate is None:
            self.mechanism.sampling_rate = min(1.0, ctx.clients_per_round / ctx.num_devices)
        super().setup(ctx)

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
        if len(eligible) == 0:
            return np.asarray(eligible)
        # the amplification argument needs sampling the adversary cannot predict: uniforms from
        # the run's secret key (cryptographic stream), never from the public seed or ``rng``
        u = self.ctx.noise_source().uniform((TAG_SAMPLE, round), len(eligible))
        return np.sort(np.asarray(eligible)[u < self.sampling_rate])

    def privacy_event(self, *, round: int) -> PrivacyEvent:
        if self.sampling == "poisson" and self.sampling_rate is None:
            # before setup: the rate is clients_per_round / num_devices
            raise RuntimeError("dp-fedavg: the Poisson sampling rate is known after setup()")
        return self.mechanism.privacy_event(round)
