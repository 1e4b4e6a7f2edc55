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

Implementation: a mechanism (``mechanism = "tree"``, the default:
:class:`fedsim.privacy.mechanisms.TreeAggregationMechanism`) releases each round's increment of
the noisy prefix sum, ``(X_t + N_t) - (X_{t-1} + N_{t-1})``; divided by ``n`` it is
``S_t - S_{t-1}``, and the server optimizer (:class:`fedsim.optim.ServerOptimizer`, heavy-ball
momentum restarted with each tree) takes the step ``theta_t = theta_{t-1} + server_lr * v_t`` of
step 4. Another registered mechanism (``fedsim.privacy.mechanisms.MECHANISMS``) gives another
DP-FTRL without a new strategy.

State for checkpoints: the mechanism's (the tree's round counter and current nodes, the previous
prefix noise) and the momentum buffer. Every node's noise is a pure function of (noise key,
node), so a round replayed from saved state adds bit-for-bit the same noise.
"""

from __future__ import annotations

from typing import Literal

from fedsim.optim import ServerOptimizer
from fedsim.privacy.mechanisms import build_mechanism, noise_or_target
from fedsim.strategy import MechanismStrategy, ParticipationLimit

__all__ = ["DPFTRL"]

_DEFAULT_OPTIONS = {"estimator": "efficient", "restart_every": None, "buffers": 3, "bands": None}


class DPFTRL(MechanismStrategy):
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
    mechanism:
        Registered correlated-noise mechanism: ``"tree"`` (the default), ``"blt"`` (a buffered
        linear Toeplitz matrix factorization) or ``"banded"`` (a banded one), see
        :mod:`fedsim.privacy.mf_mechanisms`; the matrix factorizations choose their strategy for
        the run's rounds and ``(k, b)``.
    buffers:
        ``mechanism = "blt"``: number of BLT buffers (default 3).
    bands:
        ``mechanism = "banded"``: band width, at most ``min_separation + 1`` (default that).
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
        mechanism: str = "tree",
        buffers: int = 3,
        bands: int | None = None,
    ) -> None:
        z, self.target_rho = noise_or_target(noise_multiplier, target_rho)
        self.mechanism = build_mechanism(
            mechanism,
            {"estimator": estimator, "restart_every": restart_every, "buffers": buffers,
             "bands": bands},
            _DEFAULT_OPTIONS,
            noise_multiplier=z,
            clip_norm=clip_norm,
            max_participations=max_participations,
            min_separation=min_separation,
        )
        self.optimizer = ServerOptimizer(server_lr, momentum)
        self.mechanism_name = mechanism
        self.restart_every = restart_every
        self.estimator = estimator

    def participation_limit(self) -> ParticipationLimit:
        return ParticipationLimit(max_participations=self.max_participations, min_separation=self.min_separation)
