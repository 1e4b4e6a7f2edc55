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
:class:`fedsim.privacy.mechanisms.tree.TreeAggregationMechanism`) releases each round's increment of
the noisy prefix sum, ``(X_t + N_t) - (X_{t-1} + N_{t-1})``; divided by ``n`` it is
``S_t - S_{t-1}``, and the server optimizer (:class:`fedsim.optim.ServerOptimizer`, heavy-ball
momentum restarted with each tree) takes the step ``theta_t = theta_{t-1} + server_lr * v_t`` of
step 4. Another registered mechanism (``fedsim.privacy.mechanisms.MECHANISMS``) gives another
DP-FTRL without a new strategy.

Adaptive server optimizers (``server-optimizer = "adam" | "yogi" | "adagrad"``) are allowed with
every mechanism: they take their step with the same per-round increment ``S_t - S_{t-1}``, a
function of the released noisy prefix sums and the public denominator only, so the run is
post-processing of the mechanism's release and its ``rho`` is unchanged. It is no longer FTRL,
though: with SGD the model is ``theta_0 + server_lr * (momentum-filtered) S_t``, a linear
function of the noisy *prefix sum*, whose noise the tree (or matrix factorization) keeps small;
an adaptive step rescales each increment per coordinate by the optimizer's state, so the noise of
successive increments (larger than the prefix sum's, and correlated between rounds) no longer
telescopes into the prefix sum's. It is an adaptive optimizer fed with correlated-noise
releases (docs/privacy.md, "Server optimizers"). At a restart (``restart-every``) every
optimizer's state starts afresh with the tree.

State for checkpoints: the mechanism's (the tree's round counter and current nodes, the previous
prefix noise) and the server optimizer's (momentum buffer, or Adam / Yogi / Adagrad moments). Every node's noise is a pure function of (noise key,
node), so a round replayed from saved state adds bit-for-bit the same noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from fedsim.registry import resolve_params
from fedsim.strategy import MechanismParams, MechanismStrategy, ParticipationLimit

__all__ = ["DPFTRL", "DPFTRLParams"]


@dataclass(frozen=True)
class DPFTRLParams(MechanismParams):
    """``[strategy] name = "dp-ftrl"`` parameters (kebab-case in a scenario).

    The mechanism's and optimizer's fields are :class:`~fedsim.strategy.MechanismParams`
    (``noise_multiplier`` or ``target_rho`` (solved under ``(k, b)`` and the mechanism's options),
    ``clip_norm``, ``max_participations`` (``k``, default 1), ``min_separation`` (``b``); the
    server optimizer's ``server_lr``, ``server_optimizer``, ``momentum`` (SGD only, default 0.9
    here: DP-FTRLM; 0 is plain DP-FTRL), ``beta1``, ``beta2``, ``tau``), and:

    Attributes
    ----------
    mechanism:
        Any registered mechanism (``fedsim.privacy.mechanisms.MECHANISMS``): ``"tree"`` (the
        default: tree aggregation; options ``estimator``, ``restart-every``), ``"blt"`` (a
        buffered linear Toeplitz matrix factorization; option ``buffers``), ``"banded"`` (a banded
        one; option ``bands``), ``"gaussian"`` (fresh noise each round), or one named by import
        path. The mechanism's options are keys of the same section; the matrix factorizations
        choose their strategy matrix for the run's rounds and ``(k, b)``.
    """

    #: DP-FTRLM: server momentum 0.9 unless ``momentum`` is given (``server-optimizer = "sgd"``)
    default_momentum: ClassVar[float] = 0.9

    max_participations: int = 1
    mechanism: str = "tree"

    strategy_name: ClassVar[str] = "dp-ftrl"


class DPFTRL(MechanismStrategy):
    """DP-FTRL with tree-aggregation (or another mechanism's) noise, participation limits and
    server momentum.

    Built from a :class:`DPFTRLParams` or its fields (and the mechanism's options) as keywords
    (``DPFTRL(noise_multiplier=7.0, max_participations=6, min_separation=313)``).
    """

    name = "dp-ftrl"
    weighting = "uniform"
    Params = DPFTRLParams

    def __init__(self, params: DPFTRLParams | None = None, /, **kwargs: Any) -> None:
        p = resolve_params(DPFTRLParams, params, kwargs)
        self.compose(p, p.build_mechanism())
        self.mechanism_name = p.mechanism

    def participation_limit(self) -> ParticipationLimit:
        return ParticipationLimit(max_participations=self.max_participations, min_separation=self.min_separation)
