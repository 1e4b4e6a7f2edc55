"""Exact worst-case sensitivity of DP-FTRL tree aggregation.

Model
-----
DP-FTRL with tree aggregation (Kairouz, McMahan, Song, Thakkar, Thakurta, Xu,
"Practical and Private (Deep) Learning without Sampling or Shuffling", ICML 2021,
arXiv:2103.00039, Section 4 and Appendix D) releases, over ``T`` rounds, noisy
sums of the dyadic intervals of rounds. In fedsim the node set for ``T`` rounds
is fixed as follows:

* leaves are the rounds ``0 .. T-1``;
* the nodes are all dyadic intervals ``[j * 2**h, (j + 1) * 2**h)`` that lie
  entirely inside ``[0, T)``; for a ``T`` that is not a power of two this is a
  forest of complete binary trees, one per set bit of ``T`` (largest first);
* each node carries independent ``N(0, (z C)**2)`` noise;
* with restarts every ``E`` rounds the rounds are split into consecutive
  segments of ``E`` rounds (the last one possibly shorter) and each segment gets
  its own forest built by the same rule, relative to the segment start.

A device contributes an update of L2 norm at most ``C`` at most ``k`` times
(``max_participations``), and between two of its contributions there are at
least ``b`` rounds strictly between them (``min_separation``: a contribution
at round ``r`` allows the next one at ``r + b + 1`` at the earliest). The
constraint spans restarts, since it is the same device.

If a device contributes at the rounds ``P``, the vector of all node sums moves
by at most ``C * sqrt(S(P))`` in L2 norm where ``S(P) = sum over nodes of
(number of rounds of P inside the node)**2``, so the release is a Gaussian
mechanism with L2 sensitivity ``C * sqrt(S)`` where ``S = max_P S(P)``; its zCDP
parameter is ``rho = S / (2 z**2)`` (Bun & Steinke 2016, arXiv:1605.02065,
Proposition 1.6). This module computes ``S`` exactly.

Algorithm
---------
A block of consecutive leaves (a complete subtree, or a forest of such) is
summarised, for every count ``c <= k`` of contributions inside it, by the best
achievable sum of squared node counts as a function of two gaps: ``x``, the
number of leaves before the first contribution, and ``y``, the number of
leaves after the last one, both capped at ``b``. Two blocks can be placed side
by side with contributions in both iff ``y_left + x_right >= b``; a parent
node adds ``c**2``. Storing the table in the "at least" form
``G_c(x, y) = max value with first gap >= x and last gap >= y`` makes it
monotone, so each attainable value ``v`` is described by a staircase frontier
``F_v[x] = max{y : G_c(x, y) >= v}``; concatenating two blocks then maps
frontiers to frontiers with a single gather (``F[x] = F_R[b - F_L[x]]``),
instead of a maximum over all gap pairs. Full subtrees of the same height are
identical, so only ``O(log T)`` distinct tables are built, and frontiers that
are dominated by a larger value are dropped. The per-round prefixes ``S_n``,
``n = 1 .. T`` are obtained with one block concatenation per round from the
prefix that ends just before the last (smallest) tree of ``n``'s forest, in the
manner of a binary counter.

This is the same quantity as the memoised recursion
``compute_zcdp_single_tree`` of TensorFlow Privacy's
``tree_aggregation_accountant`` (Appendix D.2 of arXiv:2103.00039), computed
with a different, exact and much faster dynamic programme. For the Gboard
es-ES DP-FTRL configuration (``T = 2000, k = 6, b = 313``; McMahan & Thakurta,
"Federated Learning with Formal Differential Privacy Guarantees", Google AI
blog, 2022) it gives ``S = 79``, i.e. ``rho = 79 / (2 * 7**2) = 0.806``.
"""

from __future__ import annotations

import functools
import threading
import warnings

import numpy as np

from fedsim.validation import is_int

__all__ = [
    "TreePrefixSensitivity",
    "brute_force_tree_sensitivity_sq",
    "effective_max_participations",
    "max_gaussian_participations",
    "max_tree_sensitivity_sq",
    "tree_nodes",
    "tree_sensitivity_sq_prefixes",
]

# A block's table stacks, for every count ``c = 1 .. k``, the attainable values
# together with their staircases: row ``i`` says that ``c[i]`` contributions can
# reach a value of at least ``values[i]`` with first gap ``>= x`` and last gap
# ``>= frontiers[i, x]`` for every column ``x`` (``-1``: impossible). Rows are
# sorted by ``c`` ascending, then ``values`` strictly descending, and every row's
# staircase is strictly larger somewhere than the one above it in the same
# ``c`` group (rows that add nothing are dropped). The empty pattern (``c = 0``,
# value 0) is implicit.

# Candidate pairs are processed in chunks so that the gathered staircases stay
# within a few tens of MB.
_CHUNK_CELLS = 1 << 22


class _Block:
    """Summary of ``size`` consecutive leaves; ``width`` is the number of ``x`` columns kept."""

    __slots__ = ("size", "width", "counts", "values", "frontiers")

    def __init__(self, size: int, width: int, counts: np.ndarray, values: np.ndarray,
                 frontiers: np.ndarray) -> None:
        self.size = size
        self.width = width
        self.counts = counts
        self.values = values
        self.frontiers = frontiers

    def best(self) -> int:
        return int(self.values.max()) if self.values.size else 0


def _triple_empty(width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, width), np.int64)


def _empty_block(width: int) -> _Block:
    return _Block(0, width, *_triple_empty(width))


def _canonical(counts: np.ndarray, values: np.ndarray, frontiers: np.ndarray,
               b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reduce candidate rows to the canonical "at least" form described above."""
    feasible = frontiers.max(axis=1) >= 0
    if not feasible.all():
        counts, values, frontiers = counts[feasible], values[feasible], frontiers[feasible]
    n = values.size
    if n <= 1:
        return counts, values, frontiers
    order = np.lexsort((-values, counts))
    counts, values, frontiers = counts[order], values[order], frontiers[order]
    # running max of the staircases down each c group ("value >= v" absorbs larger values);
    # the per-group offset keeps the groups from leaking into each other
    offset = (counts * (b + 2))[:, None]
    frontiers = np.maximum.accumulate(frontiers + offset, axis=0) - offset
    # one row per (c, value): the last one has absorbed the others
    last = np.empty(n, dtype=bool)
    last[:-1] = (values[1:] != values[:-1]) | (counts[1:] != counts[:-1])
    last[-1] = True
    counts, values, frontiers = counts[last], values[last], frontiers[last]
    # drop a smaller value whose staircase is no larger than the next larger value's
    keep = np.empty(values.size, dtype=bool)
    keep[0] = True
    keep[1:] = (counts[1:] != counts[:-1]) | (frontiers[1:] != frontiers[:-1]).any(axis=1)
    if not keep.all():
        counts, values, frontiers = counts[keep], values[keep], frontiers[keep]
    return counts, values, frontiers


def _concat(left: _Block, right: _Block, b: int, k: int, root: bool) -> _Block:
    """Blocks ``left`` then ``right`` side by side; ``root`` adds the node covering both.

    ``right`` must have full width ``b + 1``; the result has ``left.width``.
    """
    width = left.width
    la, lb = left.size, right.size
    cand_c = []
    cand_v = []
    cand_f = []
    # all contributions on the left: the last gap grows by the right block's size
    if left.values.size:
        fa = left.frontiers
        cand_c.append(left.counts)
        cand_v.append(left.values)
        cand_f.append(np.where(fa >= 0, np.minimum(fa + lb, b), -1))
    # all contributions on the right: the first gap grows by the left block's size
    if right.values.size:
        cand_c.append(right.counts)
        cand_v.append(right.values)
        cand_f.append(right.frontiers[:, np.maximum(np.arange(width) - la, 0)])
    # some on each side: they must be separated, y_left + x_right >= b
    if left.values.size and right.values.size:
        ok = left.counts[:, None] + right.counts[None, :] <= k
        rows_i, rows_j = np.nonzero(ok)
        step = max(1, _CHUNK_CELLS // max(width, 1))
        for lo in range(0, rows_i.size, step):
            ii = rows_i[lo : lo + step]
            jj = rows_j[lo : lo + step]
            fa = left.frontiers[ii]
            valid = fa >= 0
            fr = right.frontiers[jj[:, None], np.where(valid, b - fa, 0)]
            fr[~valid] = -1
            cc = left.counts[ii] + right.counts[jj]
            vv = left.values[ii] + right.values[jj]
            if rows_i.size > step:  # keep memory bounded: reduce chunk by chunk
                cc, vv, fr = _canonical(cc, vv, fr, b)
            cand_c.append(cc)
            cand_v.append(vv)
            cand_f.append(fr)
    if not cand_c:
        return _Block(la + lb, width, *_triple_empty(width))
    counts = np.concatenate(cand_c)
    values = np.concatenate(cand_v)
    frontiers = np.concatenate(cand_f, axis=0)
    counts, values, frontiers = _canonical(counts, values, frontiers, b)
    if root:
        values = values + counts * counts
    return _Block(la + lb, width, counts, values, frontiers)


class _Builder:
    """Memoised complete-subtree and segment tables for one ``(b, k)``."""

    def __init__(self, b: int, k: int) -> None:
        self.b = b
        self.k = k
        width = b + 1
        leaf_f = np.full((1, width), -1, dtype=np.int64)
        leaf_f[0, 0] = 0
        one = np.ones(1, dtype=np.int64)
        leaf = _Block(1, width, one, one.copy(), leaf_f)
        self._trees: list[_Block] = [leaf]
        self._segments: dict[int, _Block] = {}
        self._segment_powers: dict[tuple[int, int], _Block] = {}

    def tree(self, height: int) -> _Block:
        while len(self._trees) <= height:
            t = self._trees[-1]
            self._trees.append(_concat(t, t, self.b, self.k, root=True))
        return self._trees[height]

    def empty(self, width: int) -> _Block:
        return _empty_block(width)

    def forest(self, size: int, width: int | None = None, base: _Block | None = None) -> _Block:
        """Append the forest of ``size`` leaves (largest tree first) to ``base``."""
        block = base if base is not None else self.empty(self.b + 1 if width is None else width)
        for h in range(size.bit_length() - 1, -1, -1):
            if size >> h & 1:
                block = _concat(block, self.tree(h), self.b, self.k, root=False)
        return block

    def segment(self, size: int) -> _Block:
        if size not in self._segments:
            self._segments[size] = self.forest(size)
        return self._segments[size]

    def segment_power(self, size: int, j: int) -> _Block:
        """``2**j`` consecutive segments of ``size`` leaves, as one block."""
        key = (size, j)
        if key not in self._segment_powers:
            if j == 0:
                blk = self.segment(size)
            else:
                half = self.segment_power(size, j - 1)
                blk = _concat(half, half, self.b, self.k, root=False)
            self._segment_powers[key] = blk
        return self._segment_powers[key]


@functools.lru_cache(maxsize=64)
def _builder(b: int, k: int) -> _Builder:
    return _Builder(b, k)


_BUILDER_LOCK = threading.Lock()


def _check_args(num_rounds: int, max_participations: int, min_separation: int,
                restart_every: int | None) -> None:
    for name, value, low in (
        ("num_rounds", num_rounds, 0),
        ("max_participations", max_participations, 1),
        ("min_separation", min_separation, 0),
    ):
        if not is_int(value):
            raise TypeError(f"{name} must be an integer, got {value!r}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if restart_every is not None:
        if not is_int(restart_every):
            raise TypeError(f"restart_every must be an integer or None, got {restart_every!r}")
        if restart_every < 1:
            raise ValueError(f"restart_every must be >= 1 (or None for no restarts), got {restart_every}")


def max_gaussian_participations(num_rounds: int, max_participations: int | None,
                                min_separation: int) -> int:
    """Largest number of rounds out of ``num_rounds`` a device can contribute to.

    ``min(k, ceil(n / (b + 1)))`` with ``k = num_rounds`` when ``max_participations``
    is None: contributions at rounds ``r`` and ``r'`` need ``r' - r >= b + 1``.
    """
    if num_rounds <= 0:
        return 0
    cap = -(-num_rounds // (min_separation + 1))
    if max_participations is None:
        return min(num_rounds, cap)
    return min(max_participations, cap)


def effective_max_participations(num_rounds: int, max_participations: int,
                                 min_separation: int, *, warn: bool = False) -> int:
    """``min(k, ceil(T / (b + 1)))``: the number of contributions that is actually possible.

    With ``warn=True`` a :class:`UserWarning` naming the effective value is emitted
    when the requested ``max_participations`` cannot be reached.
    """
    eff = max_gaussian_participations(num_rounds, max_participations, min_separation)
    if warn and eff < max_participations:
        warnings.warn(
            f"max_participations={max_participations} is infeasible with rounds={num_rounds} "
            f"and min_separation={min_separation} (at most ceil({num_rounds}/{min_separation + 1}) "
            f"= {eff} contributions fit); using effective max_participations={eff}",
            UserWarning,
            stacklevel=2,
        )
    return eff


def max_tree_sensitivity_sq(num_rounds: int, max_participations: int, min_separation: int,
                            restart_every: int | None = None) -> int:
    """Exact worst-case ``S`` = max over participation patterns of sum over nodes of count**2.

    See the module docstring for the node set, the ``(k, b)`` participation rule and
    the restart convention. Returns 0 for ``num_rounds == 0``. The requested ``k``
    is capped at what fits (no warning here; planning functions warn).
    """
    _check_args(num_rounds, max_participations, min_separation, restart_every)
    if num_rounds == 0:
        return 0
    b = min(min_separation, num_rounds - 1)
    k = max_gaussian_participations(num_rounds, max_participations, b)
    seg = num_rounds if restart_every is None else min(restart_every, num_rounds)
    with _BUILDER_LOCK:
        builder = _builder(b, k)
        q, r = divmod(num_rounds, seg)
        state = builder.empty(1)
        j = 0
        while q:
            if q & 1:
                state = _concat(state, builder.segment_power(seg, j), b, k, root=False)
            q >>= 1
            j += 1
        if r:
            state = builder.forest(r, base=state)
    return state.best()


class TreePrefixSensitivity:
    """``S_n`` for ``n = 1, 2, ...`` (the first ``n`` rounds of a run), extended on demand.

    ``S_n`` is :func:`max_tree_sensitivity_sq` with ``num_rounds = n`` and the same
    ``(k, b, E)``. Each new round costs one block concatenation; only the
    ``O(log n)`` partial forests still needed are kept.
    """

    def __init__(self, max_participations: int, min_separation: int,
                 restart_every: int | None = None) -> None:
        _check_args(0, max_participations, min_separation, restart_every)
        self.max_participations = int(max_participations)
        self.min_separation = int(min_separation)
        self.restart_every = None if restart_every is None else int(restart_every)
        self._values: list[int] = [0]
        self._far: dict[int, int] = {}
        self._horizon = 0
        self._lock = threading.Lock()
        self._reset(64)

    def _reset(self, horizon: int) -> None:
        # b only matters up to the horizon: gaps of >= horizon leaves cannot occur
        self._horizon = horizon
        self._b = min(self.min_separation, horizon - 1)
        self._k = self.max_participations
        self._builder = _Builder(self._b, self._k)
        self._states: dict[int, _Block] = {0: self._builder.empty(1)}
        self._values = [0]

    def _extend(self, n: int) -> None:
        if n > self._horizon:
            need_reset = self.min_separation > self._horizon - 1
            new_horizon = max(n, 2 * self._horizon)
            if need_reset:
                self._reset(new_horizon)
            else:
                self._horizon = new_horizon
        seg = self.restart_every
        states = self._states
        for m in range(len(self._values), n + 1):
            if seg is None:
                q, r = 0, m
            else:
                q = (m - 1) // seg
                r = m - q * seg
            low = r & -r
            prev = m - low
            block = _concat(states[prev], self._builder.tree(low.bit_length() - 1),
                            self._b, self._k, root=False)
            states[m] = block
            self._values.append(block.best())
            # keep only the prefixes of m's decomposition (what later rounds build on)
            keep = set()
            p = m
            while True:
                keep.add(p)
                rr = p - q * seg if seg is not None else p
                if rr == 0:
                    break
                p -= rr & -rr
            for key in [key for key in states if key not in keep]:
                del states[key]

    def __call__(self, n: int) -> int:
        """``S_n``; ``n = 0`` gives 0.

        A value far beyond the rounds known so far (a planned run's ``S_T``, or a resumed
        run's first report) is computed in one pass by :func:`max_tree_sensitivity_sq` instead of
        through every prefix before it (the same exact value, tens of times faster).
        """
        if n < 0:
            raise ValueError(f"number of rounds must be >= 0, got {n}")
        with self._lock:
            if n >= len(self._values):
                if n - len(self._values) > _JUMP:
                    value = self._far.get(n)
                    if value is None:
                        value = max_tree_sensitivity_sq(n, self.max_participations,
                                                        self.min_separation, self.restart_every)
                        self._far[n] = value
                    return value
                self._extend(n)
            return self._values[n]

    def prefixes(self, num_rounds: int) -> list[int]:
        """``[S_1, ..., S_num_rounds]``."""
        if num_rounds < 0:
            raise ValueError(f"number of rounds must be >= 0, got {num_rounds}")
        with self._lock:
            if num_rounds >= len(self._values):
                self._extend(num_rounds)
            return list(self._values[1 : num_rounds + 1])


#: How far beyond its known prefixes a :class:`TreePrefixSensitivity` extends them round by round.
_JUMP = 64


@functools.lru_cache(maxsize=32)
def prefix_cache(max_participations: int, min_separation: int,
                  restart_every: int | None) -> TreePrefixSensitivity:
    return TreePrefixSensitivity(max_participations, min_separation, restart_every)


def tree_sensitivity_sq_prefixes(num_rounds: int, max_participations: int, min_separation: int,
                                 restart_every: int | None = None) -> list[int]:
    """``[S_1, ..., S_T]``: the exact sensitivity after every round of a ``T``-round run, in one pass."""
    _check_args(num_rounds, max_participations, min_separation, restart_every)
    return prefix_cache(int(max_participations), int(min_separation),
                         None if restart_every is None else int(restart_every)).prefixes(num_rounds)


def tree_nodes(num_rounds: int, restart_every: int | None = None) -> list[tuple[int, int]]:
    """All nodes as half-open round intervals ``(start, end)``, per the module's node rule."""
    if num_rounds <= 0:
        return []
    seg = num_rounds if restart_every is None else restart_every
    nodes = []
    for base in range(0, num_rounds, seg):
        length = min(seg, num_rounds - base)
        h = 0
        while (1 << h) <= length:
            width = 1 << h
            for j in range(length // width):
                nodes.append((base + j * width, base + (j + 1) * width))
            h += 1
    return nodes


@functools.lru_cache(maxsize=512)
def _brute_force_by_count(num_rounds: int, min_separation: int,
                          restart_every: int | None) -> tuple[int, ...]:
    """Best ``S(P)`` over all valid patterns ``P`` with exactly ``c`` contributions, for each c."""
    n = num_rounds
    masks = np.arange(1 << n, dtype=np.int64)
    valid = np.ones(masks.size, dtype=bool)
    for d in range(1, min(min_separation, n - 1) + 1):
        valid &= (masks & (masks >> d)) == 0
    masks = masks[valid]
    counts = np.zeros(masks.size, dtype=np.int64)
    for i in range(n):
        counts += (masks >> i) & 1
    total = np.zeros(masks.size, dtype=np.int64)
    for start, end in tree_nodes(n, restart_every):
        node_mask = ((1 << (end - start)) - 1) << start
        inside = np.zeros(masks.size, dtype=np.int64)
        sub = masks & node_mask
        for i in range(start, end):
            inside += (sub >> i) & 1
        total += inside * inside
    best = np.full(n + 1, -1, dtype=np.int64)
    np.maximum.at(best, counts, total)
    return tuple(int(v) for v in best)


def brute_force_tree_sensitivity_sq(num_rounds: int, max_participations: int, min_separation: int,
                                    restart_every: int | None = None) -> int:
    """Reference ``S`` by enumerating every participation pattern (``num_rounds <= 20``).

    Exponential; used to validate :func:`max_tree_sensitivity_sq` in the tests.
    """
    _check_args(num_rounds, max_participations, min_separation, restart_every)
    if num_rounds > 20:
        raise ValueError(f"brute force is limited to num_rounds <= 20, got {num_rounds}")
    if num_rounds == 0:
        return 0
    by_count = _brute_force_by_count(num_rounds, min_separation,
                                     None if restart_every is None else int(restart_every))
    return max(v for c, v in enumerate(by_count) if c <= max_participations)


def exact_gaussian_weight_sum(weights: np.ndarray, max_participations: int | None,
                               min_separation: int) -> float:
    """Max of ``sum(weights[P])`` over patterns ``P`` allowed by ``(k, b)`` (positions = indices)."""
    n = int(weights.size)
    if n == 0:
        return 0.0
    k = max_gaussian_participations(n, max_participations, min_separation)
    gap = min_separation + 1
    prev = np.zeros(n, dtype=np.float64)  # best with j-1 contributions among the first i+1 rounds
    best = 0.0
    for _ in range(k):
        shifted = np.zeros(n, dtype=np.float64)
        if n > gap:
            shifted[gap:] = prev[: n - gap]
        cur = np.maximum.accumulate(weights + shifted)
        best = max(best, float(cur[-1]))
        prev = cur
    return best



def clear_caches() -> None:
    """Empty this module's memo caches (benchmarks time cold computations with it)."""
    _builder.cache_clear()
    prefix_cache.cache_clear()
    _brute_force_by_count.cache_clear()
