"""The shape of DP-FTRL's aggregation tree: which nodes make up a prefix, and their variances.

Pure arithmetic on round indices (numpy only, no torch), shared by the noise generator
(:mod:`fedsim.privacy.tree_noise`, which re-exports these names) and the planning CLI
(``fedsim privacy dp-ftrl`` reports the prefix noise without importing torch).

Tree aggregation (Dwork et al. 2010; Chan, Shi & Song 2011; used by DP-FTRL, Kairouz et al. 2021):
the prefix sum up to round ``t`` is the sum of one node per set bit of ``t + 1`` (relative to the
start of ``t``'s restart segment). Honaker's efficient estimator (Honaker 2015) weights a node of
height ``h`` by ``1 / (2 - 2**-h)`` against its children's estimate, which gives that node the
variance ``2**h / (2**(h+1) - 1)`` in units of the per-node noise variance.
"""

from __future__ import annotations

import math
from typing import Literal

from fedsim.validation import is_int

Estimator = Literal["vanilla", "efficient"]
#: A dyadic interval of rounds ``[start, end)``.
Node = tuple[int, int]


def check_restart(restart_every: int | None) -> None:
    if restart_every is not None and (not is_int(restart_every) or restart_every < 1):
        raise ValueError(f"restart_every must be a positive integer or None, got {restart_every!r}")


def decomposition(round: int, restart_every: int | None = None) -> list[Node]:
    """Nodes whose noise makes up the prefix ending at ``round`` (inclusive), largest first.

    The prefix starts at the beginning of ``round``'s segment (round 0 without restarts) and is
    decomposed into dyadic intervals relative to that start, one per set bit of its length.
    """
    check_restart(restart_every)
    if round < 0:
        raise ValueError(f"round must be >= 0, got {round}")
    base = 0 if restart_every is None else (round // restart_every) * restart_every
    length = round - base + 1
    nodes: list[Node] = []
    start = base
    for h in range(length.bit_length() - 1, -1, -1):
        if length >> h & 1:
            nodes.append((start, start + (1 << h)))
            start += 1 << h
    return nodes


def node_height(node: Node) -> int:
    return (node[1] - node[0]).bit_length() - 1


def honaker_weight(height: int) -> float:
    """Weight of a node's own value in the efficient estimate, ``1 / (2 - 2**-h)``."""
    return 1.0 / (2.0 - 0.5**height)


def efficient_node_variance(height: int) -> float:
    """Variance (in units of ``sigma**2``) of the efficient estimate of a node of this height."""
    return 2.0**height / (2.0 ** (height + 1) - 1.0)


def prefix_variance(round: int, *, estimator: Estimator = "vanilla", restart_every: int | None = None) -> float:
    """Per-coordinate variance, in units of ``sigma**2``, of the noise on the prefix at ``round``.

    Vanilla: the number of nodes in the decomposition; efficient: the sum of
    :func:`efficient_node_variance` over them.
    """
    nodes = decomposition(round, restart_every)
    if estimator == "vanilla":
        return float(len(nodes))
    if estimator == "efficient":
        return float(sum(efficient_node_variance(node_height(n)) for n in nodes))
    raise ValueError(f"estimator must be 'vanilla' or 'efficient', got {estimator!r}")


def prefix_rms(num_rounds: int, *, estimator: Estimator = "efficient",
               restart_every: int | None = None) -> float:
    """``sqrt`` of the mean over rounds ``0 .. num_rounds - 1`` of :func:`prefix_variance`: the
    root-mean-square noise on the released prefix sums, in units of ``sigma``."""
    total = sum(prefix_variance(t, estimator=estimator, restart_every=restart_every)
                for t in range(num_rounds))
    return math.sqrt(total / num_rounds)
