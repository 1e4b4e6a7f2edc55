"""``"tree"``: tree aggregation of the prefix sums, as in DP-FTRL.

Tree aggregation of the prefix sums ``X_t = x_0 + ... + x_t`` (Dwork, Naor, Pitassi, Rothblum
2010; Chan, Shi, Song 2011), as in DP-FTRL (Kairouz et al., ICML 2021): the noisy prefix is
``X_t + N_t`` with ``N_t`` from :class:`~fedsim.privacy.tree_noise.TreeNoise`, and
:meth:`TreeAggregationMechanism.release` returns the per-round increment
``(X_t + N_t) - (X_{t-1} + N_{t-1}) = x_t + N_t - N_{t-1}`` (the previous prefix is zero at a tree
restart), so that the increments' running sum is exactly the noisy prefix.

Guarantee: the run is a Gaussian mechanism with sensitivity ``C sqrt(S)`` (``S`` the exact
worst case under the participation limit ``(k, b)``, :mod:`fedsim.privacy.sensitivity`); each
round records a :class:`~fedsim.privacy.events.TreeAggregationEvent`. User level, provided the
clip bound is enforced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from fedsim.privacy.events import TreeAggregationEvent
from fedsim.privacy.mechanisms.base import Mechanism, PlanDescription, option, register_mechanism
from fedsim.privacy.sensitivity import max_tree_sensitivity_sq
from fedsim.privacy.tree_structure import prefix_rms
from fedsim.validation import choice, int_at_least

if TYPE_CHECKING:
    import torch

    from fedsim.privacy.noise import NoiseSource
    from fedsim.privacy.tree_noise import TreeNoise

__all__ = ["TreeAggregationMechanism", "TreeOptions"]


@dataclass(frozen=True)
class TreeOptions:
    """Options of ``mechanism = "tree"``."""

    estimator: Literal["vanilla", "efficient"] = option(
        "efficient", "tree estimator: efficient (Honaker, lower variance, same privacy) or vanilla")
    restart_every: int | None = option(
        None, "start a new tree every N rounds (>= 1; default: never)")

    def __post_init__(self) -> None:
        choice("estimator", self.estimator, ("vanilla", "efficient"))
        int_at_least("restart-every", self.restart_every, 1, optional=True)


class TreeAggregationMechanism(Mechanism):
    """Tree-aggregation noise on the prefix sums; releases the per-round increments.

    Options (:class:`TreeOptions`): ``estimator`` (``"efficient"``: Honaker's lower-variance
    estimate, same privacy; or ``"vanilla"``) and ``restart_every`` (restart the tree every ``E``
    rounds, rounds ``0, E, 2E, ...``, or ``None``).

    ``max_participations`` must be given (the tree's sensitivity depends on ``k``).
    Rounds must be released in order; restore a saved state to replay one (a replayed round adds
    bit-for-bit the same noise, as every node's noise is a pure function of the key and node).
    """

    name = "tree"
    Options = TreeOptions
    correlated = True

    options: TreeOptions

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
        self.tree: TreeNoise | None = None
        self.prev_noise: torch.Tensor | None = None

    @property
    def estimator(self) -> Literal["vanilla", "efficient"]:
        return self.options.estimator

    @property
    def restart_every(self) -> int | None:
        return self.options.restart_every

    def setup(self, *, num_params: int, num_rounds: int, source: NoiseSource) -> None:
        import torch

        from fedsim.privacy.tree_noise import TreeNoise

        super().setup(num_params=num_params, num_rounds=num_rounds, source=source)
        self.tree = TreeNoise(
            self.num_params, self.std, source, estimator=self.estimator, restart_every=self.restart_every
        )
        self.prev_noise = torch.zeros(self.num_params, dtype=torch.float32)

    @property
    def next_round(self) -> int:
        """The round :meth:`release` expects next."""
        return 0 if self.tree is None else self.tree.next_round

    def restarts_at(self, round: int) -> bool:
        """Does ``round`` start a new tree (round 0 or a multiple of ``restart_every``)?"""
        return round == 0 or (self.restart_every is not None and round % self.restart_every == 0)

    def privacy_event(self, round: int) -> TreeAggregationEvent:
        assert self.max_participations is not None
        return TreeAggregationEvent(
            self.noise_multiplier,
            max_participations=self.max_participations,
            min_separation=self.min_separation,
            restart_every=self.restart_every,
        )

    def plan_events(self, num_rounds: int) -> list[TreeAggregationEvent]:
        """Every round records the same event."""
        return [self.privacy_event(0)] * num_rounds

    def release(self, round: int, clipped_sum: torch.Tensor) -> torch.Tensor:
        """``x_t + N_t - N_{t-1}``: the increment of the noisy prefix sum of the segment."""
        self.require_setup()
        tree, prev = self.tree, self.prev_noise
        assert tree is not None and prev is not None
        if round != tree.next_round:
            raise ValueError(
                f"the tree mechanism expects round {tree.next_round}, got {round}; "
                "to replay a round, restore the strategy state saved before it"
            )
        if tree.is_restart(round):
            prev.zero_()
        noise = tree.step(round)
        out = clipped_sum + (noise - prev)
        self.prev_noise = noise.clone()
        return out

    def describe_plan(self, num_rounds: int, rho: float) -> PlanDescription:
        assert self.max_participations is not None
        s = max_tree_sensitivity_sq(num_rounds, self.max_participations, self.min_separation,
                                    self.restart_every)
        rms = prefix_rms(num_rounds, estimator=self.estimator, restart_every=self.restart_every)
        return PlanDescription(
            title="tree aggregation",
            fields={
                "sensitivity_sq": s,
                "restart_every": self.restart_every,
                "estimator": self.estimator,
                "prefix_rmse": self.noise_multiplier * rms,
            },
            rows=(
                ("restart every", "never" if self.restart_every is None else f"{self.restart_every} rounds"),
                ("sensitivity^2 (S)", f"{s} C^2"),
            ),
        )

    def state_dict(self) -> dict[str, Any]:
        assert self.tree is not None and self.prev_noise is not None, "setup() must be called first"
        return {"tree": self.tree.state_dict(), "prev_noise": self.prev_noise.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import torch

        if self.tree is None:
            raise RuntimeError("setup() must be called before load_state_dict()")
        if set(state) != {"tree", "prev_noise"}:
            raise ValueError(f"tree mechanism state needs keys ['prev_noise', 'tree'], got {sorted(state)}")
        self.tree.load_state_dict(state["tree"])
        prev = torch.as_tensor(state["prev_noise"], dtype=torch.float32).clone()
        if prev.shape != (self.num_params,):
            raise ValueError("tree mechanism state is malformed: prev_noise has the wrong shape")
        self.prev_noise = prev


register_mechanism("tree", TreeAggregationMechanism)
