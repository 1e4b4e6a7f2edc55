"""Gaussian noise for DP aggregation: plain per-round noise and tree-aggregation prefix noise.

Tree aggregation
----------------
DP-FTRL (Kairouz, McMahan, Song, Thakkar, Thakurta, Xu, "Practical and Private (Deep) Learning
without Sampling or Shuffling", ICML 2021, arXiv:2103.00039, Section 3 and Algorithm 1) releases
noisy *prefix sums* of the per-round sums of clipped updates with the tree-aggregation mechanism
(Dwork, Naor, Pitassi, Rothblum 2010; Chan, Shi, Song 2011):

* the leaves are the rounds ``0, 1, 2, ...``; the nodes are the dyadic intervals
  ``[j 2**h, (j + 1) 2**h)`` of rounds (with restarts every ``E`` rounds: dyadic relative to the
  start of each segment of ``E`` rounds, and never crossing a segment boundary);
* every node carries independent noise ``N(0, sigma**2 I)`` with ``sigma = z C``;
* the noise on the prefix ending at round ``t`` (inclusive) is the sum of the noise of the nodes of
  the dyadic decomposition of ``[segment start, t + 1)``: one node per set bit of the number of
  rounds so far in the segment, largest first.

Every node that appears in some prefix lies inside ``[0, T)`` for any horizon ``T > t``, so this
is exactly the node set of ``fedsim.privacy.sensitivity`` (which computes the mechanism's exact
sensitivity): the released prefix sums are post-processing of the noisy node sums, and a device
with contributions at rounds ``P`` has sensitivity ``C sqrt(S(P))``, ``rho = S / (2 z**2)`` zCDP.

The *efficient* estimator (Honaker, "Efficient Use of Differentially Private Binary Trees", 2015;
the ``EfficientTreeAggregator`` of TensorFlow Privacy, used by DP-FTRL) replaces each node's noisy
value by the inverse-variance weighted combination of its own value and the sum of its children's
estimates, computed bottom-up over the node's completed subtree: for a node of height ``h``
(leaves have ``h = 0``)::

    est(node) = a_h * value(node) + (1 - a_h) * (est(left) + est(right)),  a_h = 1 / (2 - 2**-h)

with variance ``sigma**2 * 2**h / (2**(h + 1) - 1)`` per coordinate (vanilla: ``sigma**2``). The
estimator is linear and exact on noiseless inputs, so the estimate of a prefix sum equals the true
prefix sum plus the same linear function of the node noises: it is post-processing of the same
noisy tree and has *identical* privacy, with lower variance. This module therefore returns
noise-only prefix estimates; the strategy adds them to the exact prefix sum of clipped updates.

Reproducible noise
------------------
Each node's noise is a pure function of ``(secret key, node)`` (its interval of rounds), and the
plain per-round noise of DP-FedAvg of ``(secret key, round)``, drawn by
:class:`fedsim.privacy.noise.NoiseSource` (AES-128-CTR and a full-precision Gaussian sampler,
:mod:`fedsim.privacy.csprng`). A round re-executed after a crash therefore adds *the same* noise:
fresh noise on a replay would release a second noisy view of the same data and silently double
the privacy cost. The engines key every DP run with a fresh 256-bit key from :mod:`secrets`
(``secret/noise.key`` in simulation, never derived from the run seed, never logged), since anyone
who knows it can subtract the noise. An integer ``seed`` argument here is shorthand for the
*public* key :meth:`NoiseSource.from_seed` (tests and examples).

State
-----
:class:`TreeNoise` keeps only the nodes of the current decomposition (at most
``log2(T) + 1`` vectors), as in a binary counter; vanilla draws one new node per round, the
efficient estimator two on average.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedsim.privacy.noise import TAG_ROUND, TAG_TREE, NoiseSource
from fedsim.privacy.tree_structure import (  # the tree's shape and variances (no torch needed)
    Estimator,
    Node,
    check_restart,
    decomposition,
    efficient_node_variance,
    honaker_weight,
    node_height,
    prefix_variance,
)
from fedsim.validation import is_int, is_number

__all__ = [
    "Source",
    "TreeNoise",
    "as_source",
    "decomposition",
    "efficient_node_variance",
    "gaussian_noise",
    "node_noise",
    "prefix_noise",
    "prefix_variance",
]

#: Where the noise comes from: a :class:`~fedsim.privacy.noise.NoiseSource`, or an integer seed
#: (shorthand for ``NoiseSource.from_seed(seed)``).
Source = NoiseSource | int


def as_source(seed: Source) -> NoiseSource:
    """``seed`` as a :class:`~fedsim.privacy.noise.NoiseSource`."""
    if isinstance(seed, NoiseSource):
        return seed
    if not is_int(seed) or seed < 0:
        raise ValueError(f"a noise seed is a NoiseSource or a non-negative integer, got {seed!r}")
    return NoiseSource.from_seed(int(seed))


def _check_common(num_params: int, std: float) -> None:
    if not is_int(num_params) or num_params < 1:
        raise ValueError(f"num_params must be a positive integer, got {num_params!r}")
    if not (is_number(std) and np.isfinite(std) and std >= 0):
        raise ValueError(f"noise std must be a finite number >= 0, got {std!r}")


def _normal(source: NoiseSource, words: tuple[int, ...], num_params: int, std: float) -> torch.Tensor:
    out = source.normal(words, num_params)
    return out.mul_(std) if std != 1.0 else out


def gaussian_noise(seed: Source, round: int, num_params: int, std: float) -> torch.Tensor:
    """``N(0, std**2 I)`` noise of one round: a pure function of ``(seed, round)``.

    Parameters
    ----------
    seed:
        The noise source (or an integer seed for it).
    round:
        0-based round index.
    num_params:
        Length of the flat noise vector.
    std:
        Standard deviation per coordinate (``z * C`` for noise on a sum of clipped updates).
    """
    _check_common(num_params, std)
    if round < 0:
        raise ValueError(f"round must be >= 0, got {round}")
    return _normal(as_source(seed), (TAG_ROUND, int(round)), int(num_params), float(std))


def node_noise(seed: Source, node: Node, num_params: int, std: float) -> torch.Tensor:
    """``N(0, std**2 I)`` noise of one tree node ``(start, end)``: a pure function of both."""
    _check_common(num_params, std)
    start, end = int(node[0]), int(node[1])
    if not 0 <= start < end:
        raise ValueError(f"a tree node is a non-empty round interval [start, end), got {node!r}")
    return _normal(as_source(seed), (TAG_TREE, start, end), int(num_params), float(std))


def _efficient_estimate(seed: Source, node: Node, num_params: int, std: float) -> torch.Tensor:
    """Bottom-up efficient estimate of one node from its whole subtree (recomputed from scratch)."""
    own = node_noise(seed, node, num_params, std)
    h = node_height(node)
    if h == 0:
        return own
    mid = node[0] + (1 << (h - 1))
    children = _efficient_estimate(seed, (node[0], mid), num_params, std)
    children = children + _efficient_estimate(seed, (mid, node[1]), num_params, std)
    a = honaker_weight(h)
    return own.mul_(a).add_(children, alpha=1.0 - a)


def prefix_noise(
    seed: Source,
    round: int,
    num_params: int,
    std: float,
    *,
    estimator: Estimator = "vanilla",
    restart_every: int | None = None,
) -> torch.Tensor:
    """Noise on the prefix ending at ``round``, computed from scratch (no state).

    Gives bit-for-bit the value :meth:`TreeNoise.step` returns for that round: the online
    computation is an optimisation of this pure function of ``(seed, round)``.
    """
    nodes = decomposition(round, restart_every)
    seed = as_source(seed)
    if estimator == "vanilla":
        values = [node_noise(seed, n, num_params, std) for n in nodes]
    elif estimator == "efficient":
        values = [_efficient_estimate(seed, n, num_params, std) for n in nodes]
    else:
        raise ValueError(f"estimator must be 'vanilla' or 'efficient', got {estimator!r}")
    return _sum(values)


def _sum(values: list[torch.Tensor]) -> torch.Tensor:
    out = values[0].clone()
    for v in values[1:]:
        out.add_(v)
    return out


class TreeNoise:
    """Online tree-aggregation noise for the prefix sums of one run (O(log T) state).

    Parameters
    ----------
    num_params:
        Length of the flat vectors.
    std:
        Noise standard deviation per node and coordinate, ``z * C`` (noise on sums).
    seed:
        The noise source (or an integer seed for it); every node's noise is a pure function of
        the source's key and the node.
    estimator:
        ``"vanilla"``: sum of the decomposition's node noises; ``"efficient"``: Honaker's
        lower-variance estimate of each node (same privacy, see the module docstring).
    restart_every:
        Restart the tree every ``E`` rounds (rounds ``0, E, 2E, ...`` start a new tree), or ``None``.

    Call :meth:`step` once per round, in order; it returns the noise on the prefix (since the
    segment start) ending at that round.
    """

    def __init__(
        self,
        num_params: int,
        std: float,
        seed: Source,
        *,
        estimator: Estimator = "vanilla",
        restart_every: int | None = None,
    ) -> None:
        _check_common(num_params, std)
        check_restart(restart_every)
        if estimator not in ("vanilla", "efficient"):
            raise ValueError(f"estimator must be 'vanilla' or 'efficient', got {estimator!r}")
        self.num_params = int(num_params)
        self.std = float(std)
        self.source = as_source(seed)
        self.estimator: Estimator = estimator
        self.restart_every = None if restart_every is None else int(restart_every)
        self.next_round = 0
        self._nodes: list[Node] = []
        self._values: list[torch.Tensor] = []

    def is_restart(self, round: int) -> bool:
        """Does ``round`` start a new tree (round 0, or a multiple of ``restart_every``)?"""
        return round == 0 or (self.restart_every is not None and round % self.restart_every == 0)

    def nodes(self) -> list[Node]:
        """The nodes currently held: the decomposition of the last prefix returned."""
        return list(self._nodes)

    def step(self, round: int) -> torch.Tensor:
        """Noise on the prefix ending at ``round``; ``round`` must be the next round in order.

        Raises
        ------
        ValueError
            If ``round`` is not :attr:`next_round` (restore the saved state to replay a round).
        """
        if round != self.next_round:
            raise ValueError(
                f"tree noise expects round {self.next_round}, got {round}; "
                "to replay a round, restore the state saved before it"
            )
        if self.is_restart(round):
            self._nodes, self._values = [], []
        if self.estimator == "vanilla":
            self._step_vanilla(round)
        else:
            self._step_efficient(round)
        self.next_round = round + 1
        return _sum(self._values)

    def _step_vanilla(self, round: int) -> None:
        # the decomposition of the new prefix ends with the node of size lowbit(length) ending at
        # round + 1; the nodes before it are shared with the previous prefix
        new = decomposition(round, self.restart_every)[-1]
        while self._nodes and self._nodes[-1][0] >= new[0]:
            self._nodes.pop()
            self._values.pop()
        self._nodes.append(new)
        self._values.append(node_noise(self.source, new, self.num_params, self.std))

    def _step_efficient(self, round: int) -> None:
        node: Node = (round, round + 1)
        value = node_noise(self.source, node, self.num_params, self.std)
        while self._nodes and node_height(self._nodes[-1]) == node_height(node):
            left, left_value = self._nodes.pop(), self._values.pop()
            parent = (left[0], node[1])
            a = honaker_weight(node_height(parent))
            children = left_value.add_(value)
            value = node_noise(self.source, parent, self.num_params, self.std).mul_(a).add_(children, alpha=1.0 - a)
            node = parent
        self._nodes.append(node)
        self._values.append(value)

    def state_dict(self) -> dict[str, Any]:
        """Round counter and the current nodes' values (the seed is *not* included)."""
        return {
            "next_round": self.next_round,
            "estimator": self.estimator,
            "restart_every": self.restart_every,
            "std": self.std,
            "num_params": self.num_params,
            "nodes": [list(n) for n in self._nodes],
            "values": [v.clone() for v in self._values],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; refuses state from a differently configured tree."""
        for key in ("estimator", "restart_every", "std", "num_params"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"tree noise state has {key}={state.get(key)!r}, this tree has {getattr(self, key)!r}"
                )
        nodes = [(int(a), int(b)) for a, b in state["nodes"]]
        values = [torch.as_tensor(v, dtype=torch.float32).clone() for v in state["values"]]
        if len(nodes) != len(values) or any(v.shape != (self.num_params,) for v in values):
            raise ValueError("tree noise state is malformed: nodes and values do not match")
        self.next_round = int(state["next_round"])
        self._nodes, self._values = nodes, values
