"""DP-FTRL: differentially private follow-the-regularized-leader with tree aggregation.

Kairouz, McMahan, Song, Thakkar, Thakurta, Xu, "Practical and Private (Deep) Learning without
Sampling or Shuffling", ICML 2021 (arXiv:2103.00039), Algorithm 1 (DP-FTRL) and the momentum
variant DP-FTRLM of its experiments, as deployed for Gboard (McMahan & Thakurta, "Federated
Learning with Formal Differential Privacy Guarantees", Google AI blog, 2022).

Each round ``t`` of a tree segment (all rounds, or ``restart_every`` rounds each):

1. clients clip their deltas to L2 norm ``C``; the server sums the accepted ones (unweighted) into
   ``x_t`` and keeps the exact prefix sum ``X_t = x_0 + ... + x_t`` of the segment;
2. tree aggregation (:class:`fedsim.privacy.tree_noise.TreeNoise`) gives the noise ``N_t`` on that
   prefix, with per-node std ``z C`` (vanilla, or Honaker's lower-variance "efficient" estimate);
3. the noisy prefix average is ``S_t = (X_t + N_t) / n`` with the *fixed* denominator
   ``n = clients_per_round``;
4. the server update of DP-FTRLM, as in TensorFlow Federated's ``DPFTRLMServerOptimizer``
   (``dp_ftrl/optimizer_utils.py``): ``m_t = momentum * m_{t-1} + S_t`` and
   ``theta_t = theta_0 + server_lr * m_t`` where ``theta_0`` is the model at the segment start.
   (Deltas point downhill, so this is ``theta_0 - lr * m_t`` with ``m`` built from gradients.)
   Momentum on the prefix sums is heavy-ball momentum on the rounds' noisy averages:
   ``theta_t - theta_{t-1} = server_lr * v_t`` with ``v_t = momentum * v_{t-1} + (S_t - S_{t-1})``.

At a restart (rounds ``0, E, 2E, ...``) the tree, the prefix sum and the momentum buffer start
afresh and the current model becomes ``theta_0`` (TFF's ``restart_dp_tree``).

Guarantee (user level): the released prefix sums are post-processing of the noisy tree nodes, so
the run is a Gaussian mechanism with L2 sensitivity ``C sqrt(S)``, where ``S`` is the exact worst
case over participation patterns allowed by ``(k, b)`` of the sum over nodes of (contributions
under the node)^2 (``fedsim.privacy.sensitivity``); ``rho = S / (2 z**2)`` zCDP. The guarantee
needs no sampling randomness: devices may check in whenever they are available, and each round
trains whoever is eligible (the per-device limit ``(k, b)`` is enforced by devices and by the
server). The accountant uses the configured ``(k, b)``, never an observed count.

State for checkpoints: the round counter and the tree's current nodes, the exact prefix sum,
``theta_0`` and the momentum buffer. Every node's noise is a pure function of (secret seed, node),
so a round replayed from saved state adds bit-for-bit the same noise.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

import torch

from fedsim.privacy.events import TreeAggregationEvent
from fedsim.privacy.tree_noise import TreeNoise
from fedsim.strategy import ParticipationLimit, Strategy, StrategyContext
from fedsim.types import TrainConfig, UpdateBatch
from strategies.dp_fedavg import (
    calibrate_to_target,
    int_at_least,
    momentum_value,
    noise_from_target,
    noise_seed,
    positive_number,
)

__all__ = ["DPFTRL"]


class DPFTRL(Strategy):
    """DP-FTRL with tree-aggregation noise, participation limits and server momentum.

    Parameters
    ----------
    noise_multiplier:
        ``z``: every tree node carries ``N(0, (z * clip_norm)**2 I)`` noise (default 1).
    target_rho:
        Instead of ``noise_multiplier``: the run's ``rho`` (zCDP). The smallest ``z`` that reaches
        it over the run's rounds under ``(k, b)`` and ``restart_every`` is solved with
        :func:`fedsim.privacy.calibration.calibrate_noise_multiplier` before the first round, so
        the run ends at ``rho = target_rho``.
    clip_norm:
        ``C``: L2 bound every client clips its delta to.
    server_lr:
        Server learning rate applied to the (momentum of the) noisy prefix averages.
    momentum:
        DP-FTRLM momentum in ``[0, 1)`` (the paper's default 0.9; 0 is plain DP-FTRL).
    max_participations:
        ``k``: at most this many contributions per device over the run.
    min_separation:
        ``b``: rounds strictly between two contributions of one device.
    restart_every:
        Restart the tree every ``E`` rounds, or ``None`` for one tree over the whole run.
    estimator:
        ``"efficient"`` (Honaker, lower variance, same privacy) or ``"vanilla"``.
    """

    name = "dp-ftrl"
    weighting = "uniform"

    def __init__(
        self,
        noise_multiplier: float | None = None,
        clip_norm: float = 1.0,
        server_lr: float = 1.0,
        momentum: float = 0.9,
        max_participations: int = 1,
        min_separation: int = 0,
        restart_every: int | None = None,
        estimator: Literal["vanilla", "efficient"] = "efficient",
        target_rho: float | None = None,
    ) -> None:
        z, self.target_rho = noise_from_target(noise_multiplier, target_rho)
        self.noise_multiplier: float = 1.0 if z is None else z  # solved in setup() from target-rho
        self.clip_norm = positive_number("clip-norm", clip_norm)
        self.server_lr = positive_number("server-lr", server_lr)
        self.momentum = momentum_value(momentum)
        self.max_participations = int_at_least("max-participations", max_participations, 1)
        self.min_separation = int_at_least("min-separation", min_separation, 0)
        self.restart_every = int_at_least("restart-every", restart_every, 1, optional=True)
        if estimator not in ("vanilla", "efficient"):
            raise ValueError(f"estimator must be 'vanilla' or 'efficient', got {estimator!r}")
        self.estimator: Literal["vanilla", "efficient"] = estimator
        self.tree: TreeNoise | None = None
        self.prefix_sum: torch.Tensor | None = None
        self.init_params: torch.Tensor | None = None
        self.buffer: torch.Tensor | None = None

    # -- set-up ------------------------------------------------------------------------------
    def calibrated_noise_multiplier(self, *, num_rounds: int) -> float:
        """The run's noise multiplier: ``noise-multiplier``, or solved from ``target-rho``."""
        if self.target_rho is None:
            return self.noise_multiplier
        return calibrate_to_target(
            self.target_rho,
            "dp-ftrl",
            num_rounds=num_rounds,
            max_participations=self.max_participations,
            min_separation=self.min_separation,
            restart_every=self.restart_every,
        )

    def setup(self, ctx: StrategyContext) -> None:
        super().setup(ctx)
        self.noise_multiplier = self.calibrated_noise_multiplier(num_rounds=ctx.num_rounds)
        self.tree = TreeNoise(
            ctx.num_params,
            self.noise_multiplier * self.clip_norm,
            noise_seed(ctx),
            estimator=self.estimator,
            restart_every=self.restart_every,
        )
        self.prefix_sum = torch.zeros(ctx.num_params, dtype=torch.float32)
        self.buffer = torch.zeros(ctx.num_params, dtype=torch.float32)
        self.init_params = None

    def participation_limit(self) -> ParticipationLimit:
        return ParticipationLimit(max_participations=self.max_participations, min_separation=self.min_separation)

    def configure_client(self, *, round: int, base: TrainConfig) -> TrainConfig:
        return replace(base, clip_norm=self.clip_norm)

    # -- a round -----------------------------------------------------------------------------
    def aggregate(self, *, round: int, params: torch.Tensor, batch: UpdateBatch) -> torch.Tensor:
        """One DP-FTRLM step; rounds must come in order (restore state to replay one)."""
        tree = self.tree
        assert tree is not None and self.prefix_sum is not None and self.buffer is not None, (
            "setup() must be called before aggregate()"
        )
        if round != tree.next_round:
            raise ValueError(
                f"dp-ftrl expects round {tree.next_round}, got {round}; "
                "to replay a round, restore the strategy state saved before it"
            )
        if tree.is_restart(round):
            self.init_params = params.detach().clone()
            self.prefix_sum.zero_()
            self.buffer.zero_()
        assert self.init_params is not None
        # the exact prefix sum of clipped deltas plus the tree's noise-only prefix estimate
        self.prefix_sum.add_(batch.delta_sum)
        noise = tree.step(round)
        noisy_prefix = (self.prefix_sum + noise) / float(self.ctx.clients_per_round)
        self.buffer.mul_(self.momentum).add_(noisy_prefix)
        return self.init_params + self.server_lr * self.buffer

    def privacy_event(self, *, round: int) -> TreeAggregationEvent:
        return TreeAggregationEvent(
            self.noise_multiplier,
            max_participations=self.max_participations,
            min_separation=self.min_separation,
            restart_every=self.restart_every,
        )

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        assert self.tree is not None and self.prefix_sum is not None and self.buffer is not None
        return {
            "tree": self.tree.state_dict(),
            "prefix_sum": self.prefix_sum.clone(),
            "buffer": self.buffer.clone(),
            "init_params": None if self.init_params is None else self.init_params.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.tree is not None, "setup() must be called before load_state_dict()"
        expected = {"tree", "prefix_sum", "buffer", "init_params"}
        if set(state) != expected:
            raise ValueError(f"dp-ftrl state needs keys {sorted(expected)}, got {sorted(state)}")
        self.tree.load_state_dict(state["tree"])
        self.prefix_sum = torch.as_tensor(state["prefix_sum"], dtype=torch.float32).clone()
        self.buffer = torch.as_tensor(state["buffer"], dtype=torch.float32).clone()
        init = state["init_params"]
        self.init_params = None if init is None else torch.as_tensor(init, dtype=torch.float32).clone()
