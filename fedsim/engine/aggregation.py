"""Server-side validation and streaming reduction of client updates.

Every reported delta is checked before it can touch the model: right shape and dtype, all values
finite, L2 norm within the round's clip bound, a known device reporting once per round, and
allowed by the server's participation ledger. A failing update is rejected and counted by reason,
never averaged in. Accepted deltas are reduced chunk by chunk into a running sum, so server memory
is O(model size) whatever the cohort size (unless the strategy asks for individual updates).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from fedsim.population import ParticipationLedger
from fedsim.privacy.clipping import within_clip
from fedsim.types import CohortChunk, UpdateBatch

REJECTION_REASONS = (
    "wrong_shape",
    "wrong_dtype",
    "non_finite",
    "norm_exceeds_clip",
    "bad_example_count",
    "unknown_device",
    "duplicate_device",
    "participation_limit",
)


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
    ) -> None:
        self.num_params = num_params
        self.round = round
        self.clip_norm = clip_norm
        self.weighting = weighting
        self.ledger = ledger
        self.num_devices = num_devices
        self.keep_individual = keep_individual
        self.delta_sum = torch.zeros(num_params, dtype=torch.float32)
        self.weight_sum = 0.0
        self.num_updates = 0
        self.num_examples = 0
        self.rejected: Counter[str] = Counter()
        self.accepted_ids: list[np.ndarray] = []
        self.losses: list[torch.Tensor] = []
        self._seen: set[int] = set()
        self._deltas: list[torch.Tensor] = []
        self._weights: list[torch.Tensor] = []

    def add(self, chunk: CohortChunk) -> np.ndarray:
        """Validate a chunk, add its accepted rows; return the mask of accepted rows."""
        ids = np.asarray(chunk.device_ids, dtype=np.int64).reshape(-1)
        m = len(ids)
        deltas = chunk.deltas
        reason = np.full(m, "", dtype=object)
        if not isinstance(deltas, torch.Tensor) or deltas.dim() != 2 or deltas.shape != (m, self.num_params):
            self.rejected["wrong_shape"] += m
            return np.zeros(m, dtype=bool)
        if deltas.dtype != torch.float32:
            self.rejected["wrong_dtype"] += m
            return np.zeros(m, dtype=bool)
        counts = torch.as_tensor(chunk.num_examples).reshape(-1)
        ok_counts = counts.numel() == m
        finite = torch.isfinite(deltas).all(dim=1).numpy()
        norms = torch.linalg.vector_norm(torch.nan_to_num(deltas, nan=0.0, posinf=0.0, neginf=0.0), dim=1)
        in_clip = within_clip(norms, self.clip_norm).numpy() if self.clip_norm is not None else np.ones(m, bool)
        known = (ids >= 0) & (ids < self.num_devices)
        for i in range(m):
            if not finite[i]:
                reason[i] = "non_finite"
            elif not in_clip[i]:
                reason[i] = "norm_exceeds_clip"
            elif not ok_counts or int(counts[i]) < 0:
                reason[i] = "bad_example_count"
            elif not known[i]:
                reason[i] = "unknown_device"
            elif int(ids[i]) in self._seen:
                reason[i] = "duplicate_device"
            elif self.ledger is not None and not bool(self.ledger.allowed(self.round, ids[i : i + 1])[0]):
                reason[i] = "participation_limit"
            else:
                self._seen.add(int(ids[i]))
        accepted = reason == ""
        for r in reason[~accepted]:
            self.rejected[str(r)] += 1
        if not accepted.any():
            return accepted
        idx = torch.from_numpy(np.flatnonzero(accepted))
        good = deltas.index_select(0, idx)
        if self.weighting == "examples":
            weights = counts.index_select(0, idx).to(torch.float32)
        else:
            weights = torch.ones(len(idx), dtype=torch.float32)
        self.delta_sum += weights @ good
        self.weight_sum += float(weights.sum())
        self.num_updates += len(idx)
        self.num_examples += int(counts.index_select(0, idx).sum()) if ok_counts else 0
        self.accepted_ids.append(ids[accepted])
        if chunk.losses is not None and len(chunk.losses) == m:
            self.losses.append(torch.as_tensor(chunk.losses).reshape(-1)[idx])
        if self.keep_individual:
            self._deltas.append(good.clone())
            self._weights.append(weights)
        return accepted

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
        """The round's :class:`UpdateBatch`."""
        return UpdateBatch(
            delta_sum=self.delta_sum,
            weight_sum=self.weight_sum,
            num_updates=self.num_updates,
            num_examples=self.num_examples,
            rejected=dict(self.rejected),
            deltas=torch.cat(self._deltas) if self.keep_individual and self._deltas else None,
            weights=torch.cat(self._weights) if self.keep_individual and self._weights else None,
        )
