"""Server-side validation and streaming reduction of client updates.

Every reported delta is checked before it can touch the model: right shape and dtype, all values
finite, L2 norm within the round's clip bound and within the engine's ``max-update-norm`` (the
bound that keeps huge values out of non-DP strategies), a sane example count, a known device
reporting once per round for the current round (not a replay of an earlier one), and allowed by
the server's participation ledger. A failing update is rejected and counted by reason, never
averaged in; malformed chunk contents (ids, counts, rounds of the wrong type or length) are
rejections too, never exceptions. Accepted deltas are reduced chunk by chunk into a running sum, so server memory
is O(model size) whatever the cohort size (unless the strategy asks for individual updates).

Norms that cannot be gamed. Every norm is computed in float64 from the float32 values (a float32
accumulator can be steered: a crafted 1.3M-entry delta whose float32 norm reads ``C`` has a true
norm of ``1.003 C``). A row whose float64 norm exceeds ``C (1 + NORM_TOLERANCE)`` is rejected; an
accepted row whose norm is above ``C (1 - 2**-30)`` (a client's float32 clipping lands within
rounding of ``C``) is scaled by ``C (1 - 2**-20) / norm`` on the server. The scaled row's true
norm is then below ``C``: float32 rounding of the scaled entries adds at most ``2**-24``
relatively, the float64 norm is exact to about ``1e-10`` for any model size fedsim runs, so every
accepted update has true L2 norm ``<= C``, the sensitivity the accountant uses; no slack is left
to account for.

Example counts (FedAvg's weights) must lie in ``[0, max_examples]`` (``[engine] max-examples``);
weight sums are float64. A count within that bound can still dwarf every other: at the default
bound one client reporting 1,000,000 examples beside 299 clients with 1,000 would take 77 % of
the step. So no accepted update's weight may exceed ``max_weight_share`` (``[engine]
max-weight-share``, default 0.5) of the round's total weight: the largest weights are lowered to
a common cap ``tau``, the largest value with ``tau <= share * sum_i min(w_i, tau)`` (water
filling; weights below the cap are untouched, a round without a dominant client is averaged
exactly as before). At the default no client outweighs all the others together. When fewer
than ``1 / share`` updates reported examples no cap can hold; they are then weighed equally.
Streaming keeps this O(model size): at most ``floor(1 / share)`` updates can be capped, and they
are among the ``floor(1 / share) + 1`` heaviest, which are held apart until the round ends.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter

import numpy as np
import torch

from fedsim.population import ParticipationLedger
from fedsim.privacy.clipping import below_clip, within_clip
from fedsim.types import CohortChunk, UpdateBatch

REJECTION_REASONS = (
    "wrong_shape",
    "wrong_dtype",
    "non_finite",
    "norm_exceeds_clip",
    "norm_exceeds_max",
    "bad_example_count",
    "unknown_device",
    "stale_round",
    "duplicate_device",
    "participation_limit",
)

#: Example counts at or above this are rejected whatever ``max-examples`` says: beyond it float
#: weights lose integer precision.
MAX_EXAMPLE_COUNT = 2**53
#: Default bound on a client's reported example count (``[engine] max-examples``).
DEFAULT_MAX_EXAMPLES = 1_000_000
#: Default largest share of a round's total FedAvg weight one update may take
#: (``[engine] max-weight-share``): no client outweighs all the others together.
DEFAULT_MAX_WEIGHT_SHARE = 0.5
#: Accepted rows whose float64 norm exceeds ``C (1 - SCALE_ABOVE)`` are scaled by the server ...
SCALE_ABOVE = 2.0**-30
#: ... to ``C (1 - SCALE_TARGET)``, which float32 rounding (``2**-24``) cannot push above ``C``.
SCALE_TARGET = 2.0**-20
#: float64 elements converted at a time when computing norms (a few MB of scratch).
_NORM_BLOCK = 1 << 18


def float64_norms(deltas: torch.Tensor) -> torch.Tensor:
    """L2 norm of every row of a 2-D float32 tensor, accumulated in float64.

    Works in blocks of about ``2**18`` elements, so the float64 scratch stays a few MB whatever
    the chunk and model size.
    """
    m, n = deltas.shape
    out = torch.zeros(m, dtype=torch.float64, device=deltas.device)
    if m == 0 or n == 0:
        return out
    if n <= _NORM_BLOCK:
        rows = max(1, _NORM_BLOCK // n)
        for i in range(0, m, rows):
            out[i : i + rows] = torch.linalg.vector_norm(deltas[i : i + rows].to(torch.float64), dim=1)
        return out
    for i in range(m):
        sq = 0.0
        for j in range(0, n, _NORM_BLOCK):
            part = deltas[i, j : j + _NORM_BLOCK].to(torch.float64)
            sq += float(torch.dot(part, part))
        out[i] = sq**0.5
    return out


def scale_to_bound(rows: torch.Tensor, norms: torch.Tensor, bound: float) -> torch.Tensor:
    """Rows whose float64 norm exceeds ``bound (1 - SCALE_ABOVE)`` scaled to ``bound (1 - SCALE_TARGET)``.

    Returns ``rows`` itself when no row needs scaling, else a scaled copy; after it every row's
    true norm is below ``bound`` (module docstring).
    """
    norms = norms.to(rows.device)
    over = norms > bound * (1.0 - SCALE_ABOVE)
    if not bool(over.any()):
        return rows
    out = rows.clone()
    idx = torch.nonzero(over).reshape(-1)
    factors = (bound * (1.0 - SCALE_TARGET)) / norms[idx]
    out[idx] = (out[idx].to(torch.float64) * factors[:, None]).to(torch.float32)
    return out


def weight_cap(weights: np.ndarray, share: float) -> float:
    """The cap ``tau`` under which no weight exceeds ``share`` of the capped total (``inf``: none needed).

    ``tau`` is the largest value with ``max_i min(w_i, tau) <= share * sum_i min(w_i, tau)``;
    weights at or below it keep their value. When fewer than ``1 / share`` weights are positive
    no cap satisfies this, and ``tau`` is the smallest positive weight (they all weigh the same).

    Parameters
    ----------
    weights:
        Non-negative weights (example counts).
    share:
        The largest share in ``(0, 1]``.
    """
    w = np.sort(np.asarray(weights, dtype=np.float64))[::-1]
    w = w[w > 0]
    total = float(w.sum())
    if len(w) == 0 or share >= 1.0 or w[0] <= share * total:
        return math.inf
    rest = total
    for j in range(1, len(w)):
        if share * j >= 1.0:
            break
        rest -= float(w[j - 1])  # sum of the weights below the j largest
        tau = share * rest / (1.0 - share * j)
        if w[j] <= tau:  # consistent: exactly the j largest lie above the cap
            return tau
    return float(w[-1])


def _as_1d(value: object) -> np.ndarray | None:
    """``value`` as a flat numpy array, or ``None`` when it is not array-like at all."""
    try:
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        return np.asarray(value).reshape(-1)
    except Exception:
        return None


def _as_ints(values: np.ndarray | None, m: int, *, low: int, high: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer values in ``[low, high)`` and the mask of rows that are such integers.

    Integer dtypes are taken as they are; floats only when finite and integral; anything else
    (strings, objects, booleans) is invalid. A length other than ``m`` invalidates every row.
    """
    out = np.zeros(m, dtype=np.int64)
    ok = np.zeros(m, dtype=bool)
    if values is None or len(values) != m:
        return out, ok
    kind = values.dtype.kind
    if kind in "iu":
        ok = (values >= low) & (values < high)
        out[ok] = values[ok].astype(np.int64)
    elif kind == "f":
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(values) & (np.floor(values) == values) & (values >= low) & (values < high)
        out[ok] = values[ok].astype(np.int64)
    elif kind == "O":
        for i, v in enumerate(values):
            if isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_) and low <= int(v) < high:
                out[i], ok[i] = int(v), True
    return out, ok


class UpdateAccumulator:
    """Validate and sum one round's client updates.

    Parameters
    ----------
    num_params:
        Length of the flat parameter vector.
    round:
        The round being aggregated (for the participation check).
    clip_norm:
        The round's clip bound ``C``; ``None`` skips the norm check (non-DP strategies).
    weighting:
        ``"examples"`` (weight = example count) or ``"uniform"`` (weight = 1).
    ledger:
        The server's participation ledger; ``None`` skips that check.
    num_devices:
        Population size; ids outside ``[0, num_devices)`` are rejected.
    keep_individual:
        Also keep every accepted delta (``UpdateBatch.deltas``).
    max_norm:
        Bound on every delta's L2 norm, whatever the strategy (``engine.max-update-norm``);
        ``None`` skips the check.
    max_examples:
        Largest example count a client may report (``engine.max-examples``); larger counts are
        rejected as ``bad_example_count``.
    device:
        Where the running sum lives and accepted deltas are summed (``[engine] device``): chunks
        from elsewhere are moved there; only the per-row norms come back for the checks.
    max_weight_share:
        Largest share of the round's total weight one accepted update may take with
        ``weighting="examples"`` (``engine.max-weight-share``; module docstring); ``None`` or 1:
        no cap (the plain example-weighted mean).
    """

    def __init__(
        self,
        *,
        num_params: int,
        round: int,
        clip_norm: float | None,
        weighting: str,
        ledger: ParticipationLedger | None,
        num_devices: int,
        keep_individual: bool = False,
        max_norm: float | None = None,
        max_examples: int = DEFAULT_MAX_EXAMPLES,
        device: torch.device | str = "cpu",
        max_weight_share: float | None = None,
    ) -> None:
        self.num_params = num_params
        self.device = torch.device(device)
        self.max_examples = min(int(max_examples), MAX_EXAMPLE_COUNT - 1)
        self.max_norm = max_norm
        self.round = round
        self.clip_norm = clip_norm
        self.weighting = weighting
        self.ledger = ledger
        self.num_devices = num_devices
        self.keep_individual = keep_individual
        self.delta_sum = torch.zeros(num_params, dtype=torch.float32, device=self.device)
        self.weight_sum = 0.0
        self.num_updates = 0
        self.num_examples = 0
        #: accepted updates whose clients' bits say they fit under the clip norm (adaptive clipping)
        self.num_below_clip = 0
        self.rejected: Counter[str] = Counter()
        self.accepted_ids: list[np.ndarray] = []
        self.losses: list[torch.Tensor] = []
        self._seen: set[int] = set()
        self._deltas: list[torch.Tensor] = []
        self._weights: list[torch.Tensor] = []
        share = 1.0 if max_weight_share is None else float(max_weight_share)
        if not 0.0 < share <= 1.0:
            raise ValueError(f"max_weight_share must be in (0, 1], got {max_weight_share!r}")
        self.max_weight_share = share
        #: the heaviest updates, held out of the running sum until the cap is known:
        #: (weight, arrival, row) in a min-heap of at most ``_hold`` entries
        self._hold = int(math.floor(1.0 / share)) + 1 if share < 1.0 and weighting == "examples" else 0
        self._held: list[tuple[float, int, torch.Tensor]] = []
        self._arrivals = 0
        self._counts: list[np.ndarray] = []

    def add(self, chunk: CohortChunk) -> np.ndarray:
        """Validate a chunk, add its accepted rows; return the mask of accepted rows.

        Never raises on malformed content: each of the chunk's rows (one per device id) is either
        accepted or counted under exactly one rejection reason.
        """
        deltas = chunk.deltas
        raw_ids = _as_1d(chunk.device_ids)
        if raw_ids is None:  # not even a list of ids: count the rows the deltas claim
            m = int(deltas.shape[0]) if isinstance(deltas, torch.Tensor) and deltas.dim() >= 1 else 1
            self.rejected["wrong_shape"] += m
            return np.zeros(m, dtype=bool)
        m = len(raw_ids)
        reason = np.full(m, "", dtype=object)
        if not isinstance(deltas, torch.Tensor) or deltas.dim() != 2 or tuple(deltas.shape) != (m, self.num_params):
            self.rejected["wrong_shape"] += m
            return np.zeros(m, dtype=bool)
        if deltas.dtype != torch.float32 or deltas.layout != torch.strided:
            self.rejected["wrong_dtype"] += m
            return np.zeros(m, dtype=bool)
        deltas = deltas.detach().to(self.device)  # the sum runs where [engine] device says
        ids, known = _as_ints(raw_ids, m, low=0, high=self.num_devices)
        counts, ok_count = _as_ints(_as_1d(chunk.num_examples), m, low=0, high=self.max_examples + 1)
        raw_rounds = chunk.rounds
        if raw_rounds is None:
            fresh = np.ones(m, dtype=bool)
        else:
            stated, valid = _as_ints(_as_1d(raw_rounds), m, low=0, high=2**62)
            fresh = valid & (stated == self.round)
        # float64 norms (module docstring): a finite norm implies finite entries (NaN and inf
        # propagate), so only rows whose norm is not finite are inspected entry by entry
        norms = float64_norms(deltas).cpu()  # m numbers: the decisions below are made on the CPU
        finite = np.ones(m, dtype=bool)
        suspect = torch.nonzero(~torch.isfinite(norms)).reshape(-1)
        if len(suspect):
            rows = deltas.index_select(0, suspect.to(deltas.device))
            finite[suspect.numpy()] = torch.isfinite(rows).all(dim=1).cpu().numpy()
            norms[suspect] = float64_norms(torch.nan_to_num(rows, nan=0.0, posinf=0.0, neginf=0.0)).cpu()
        allowed = np.ones(m, dtype=bool)
        if self.ledger is not None and known.any():
            allowed[known] = self.ledger.allowed(self.round, ids[known])
        in_clip = within_clip(norms, self.clip_norm).numpy() if self.clip_norm is not None else np.ones(m, bool)
        in_max = (norms <= self.max_norm).numpy() if self.max_norm is not None else np.ones(m, bool)
        for i in range(m):
            if not finite[i]:
                reason[i] = "non_finite"
            elif not in_clip[i]:
                reason[i] = "norm_exceeds_clip"
            elif not in_max[i]:
                reason[i] = "norm_exceeds_max"
            elif not ok_count[i]:
                reason[i] = "bad_example_count"
            elif not known[i]:
                reason[i] = "unknown_device"
            elif not fresh[i]:
                reason[i] = "stale_round"
            elif int(ids[i]) in self._seen:
                reason[i] = "duplicate_device"
            elif not allowed[i]:
                reason[i] = "participation_limit"
            else:
                self._seen.add(int(ids[i]))
        accepted = reason == ""
        for r in reason[~accepted]:
            self.rejected[str(r)] += 1
        if not accepted.any():
            return accepted
        idx = torch.from_numpy(np.flatnonzero(accepted))
        good = deltas if len(idx) == m else deltas.index_select(0, idx.to(deltas.device))
        if self.clip_norm is not None:  # every accepted row's true norm <= C (module docstring)
            good = scale_to_bound(good, norms.index_select(0, idx), self.clip_norm)
        accepted_counts = torch.from_numpy(counts[accepted])
        if self.weighting == "examples":
            weights = accepted_counts.to(torch.float32)  # exact: counts <= max-examples < 2**24 by default
            self.weight_sum += float(accepted_counts.sum())  # int64 sum, exact
        else:
            weights = torch.ones(len(idx), dtype=torch.float32)
            self.weight_sum += float(len(idx))
        if self._hold:
            self._counts.append(counts[accepted].copy())
            self.delta_sum += self._hold_heaviest(weights, good)
        else:
            self.delta_sum += weights.to(self.device) @ good
        self.num_updates += len(idx)
        self.num_examples += int(accepted_counts.sum())
        if self.clip_norm is not None:
            self.num_below_clip += int(self._bits(chunk, norms, m)[accepted].sum())
        self.accepted_ids.append(ids[accepted])
        losses = _as_1d(chunk.losses)
        if losses is not None and len(losses) == m and losses.dtype.kind == "f":
            with np.errstate(over="ignore", invalid="ignore"):
                kept = losses[accepted].astype(np.float32)
            kept = kept[np.isfinite(kept)]
            if len(kept):
                self.losses.append(torch.from_numpy(kept))
        if self.keep_individual:
            self._deltas.append(good.clone())
            self._weights.append(weights.to(self.device))
        return accepted

    def _bits(self, chunk: CohortChunk, norms: torch.Tensor, m: int) -> np.ndarray:
        """The rows' adaptive-clipping bits: the clients' own (a boolean or 0/1 array, one per
        row), or read off the reported norms when a chunk states none or malformed ones."""
        assert self.clip_norm is not None
        stated = _as_1d(chunk.below_clip)
        if stated is not None and len(stated) == m and (stated.dtype == bool or stated.dtype.kind in "iu"):
            values = stated.astype(np.int64)
            if ((values == 0) | (values == 1)).all():
                return values.astype(bool)
        return below_clip(norms, self.clip_norm).numpy()

    def add_secure_sum(self, device_ids: np.ndarray, delta_sum: torch.Tensor) -> bool:
        """Add the sum of ``device_ids``' updates, computed by secure aggregation; whether it was accepted.

        The server never sees the individual updates, so their norms cannot be checked here (the
        devices clip); what it knows is who took part. The sum is accepted only as a whole:
        with ``weighting="uniform"``, a finite vector of the model's length, and every device
        known, fresh in this round and allowed by the participation ledger; otherwise every one
        of its devices is counted under the first reason that applies and nothing is added.
        """
        ids = np.asarray(device_ids, dtype=np.int64).reshape(-1)
        m = len(ids)
        if m == 0:
            return True
        if self.weighting != "uniform":
            raise ValueError("a secure sum carries no example counts: it needs weighting='uniform'")
        reason = ""
        if not isinstance(delta_sum, torch.Tensor) or tuple(delta_sum.shape) != (self.num_params,):
            reason = "wrong_shape"
        elif not bool(torch.isfinite(delta_sum).all()):
            reason = "non_finite"
        elif ((ids < 0) | (ids >= self.num_devices)).any():
            reason = "unknown_device"
        elif len(set(ids.tolist())) != m or self._seen & set(ids.tolist()):
            reason = "duplicate_device"
        elif self.ledger is not None and not self.ledger.allowed(self.round, ids).all():
            reason = "participation_limit"
        if reason:
            self.rejected[reason] += m
            return False
        self._seen.update(ids.tolist())
        self.delta_sum += delta_sum.detach().to(device=self.device, dtype=torch.float32)
        self.weight_sum += float(m)
        self.num_updates += m
        self.accepted_ids.append(ids)
        return True

    def _hold_heaviest(self, weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Keep the heaviest rows seen so far apart; return the weighted sum of the others."""
        out = torch.zeros(self.num_params, dtype=torch.float32, device=self.device)
        passed = torch.ones(len(weights), dtype=torch.bool)
        for i in torch.argsort(weights, descending=True, stable=True).tolist():
            w = float(weights[i])
            if len(self._held) == self._hold and w <= self._held[0][0]:
                break  # no lighter row of this chunk can enter the held set either
            self._arrivals += 1
            entry = (w, self._arrivals, rows[i].clone())
            passed[i] = False
            if len(self._held) < self._hold:
                heapq.heappush(self._held, entry)
            else:  # the lightest held row joins the running sum
                lightest = heapq.heappushpop(self._held, entry)
                out += lightest[0] * lightest[2]
        if bool(passed.any()):
            out += weights[passed].to(self.device) @ rows[passed.to(self.device)]
        return out

    @property
    def accepted(self) -> np.ndarray:
        """Ids of all accepted devices so far."""
        return np.concatenate(self.accepted_ids) if self.accepted_ids else np.empty(0, np.int64)

    @property
    def mean_loss(self) -> float | None:
        """Mean local training loss of accepted clients."""
        if not self.losses:
            return None
        return float(torch.cat(self.losses).mean())

    def result(self) -> UpdateBatch:
        """The round's :class:`UpdateBatch`, on the CPU (the strategy's step and its noise, drawn
        by the cryptographic sampler on the CPU, work on the CPU; one ``P``-vector per round
        comes back from the device), with the weights capped at ``max_weight_share`` (module
        docstring)."""
        delta_sum, weight_sum = self.delta_sum, self.weight_sum
        weights = torch.cat(self._weights) if self.keep_individual and self._weights else None
        if self._hold:
            counts = np.concatenate(self._counts) if self._counts else np.empty(0, np.int64)
            tau = weight_cap(counts, self.max_weight_share)
            delta_sum = delta_sum.clone()
            for w, _, row in sorted(self._held, key=lambda e: e[1]):  # in arrival order
                delta_sum += float(min(w, tau)) * row
            if math.isfinite(tau):
                weight_sum = float(np.minimum(counts.astype(np.float64), tau).sum())
                if weights is not None:
                    weights = torch.clamp(weights, max=float(tau))
        return UpdateBatch(
            delta_sum=delta_sum.cpu(),
            weight_sum=weight_sum,
            num_updates=self.num_updates,
            num_examples=self.num_examples,
            rejected=dict(self.rejected),
            deltas=torch.cat(self._deltas).cpu() if self.keep_individual and self._deltas else None,
            weights=weights.cpu() if weights is not None else None,
            num_below_clip=self.num_below_clip,
        )
