"""Value types passed between the engine, strategies and client trainers.

Parameters travel as one flat ``float32`` tensor per model (see ``fedsim.models``); a client's
report is a *delta* (local model minus the global model it started from) and its example count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedsim.validation import int_at_least, positive_number


@dataclass(frozen=True)
class TrainConfig:
    """What a client is told to do in one round (the Flower bridge sends it as a ConfigRecord).

    Attributes
    ----------
    round:
        0-based round index.
    lr:
        Local SGD learning rate.
    local_epochs:
        Passes over the local data.
    batch_size:
        Local minibatch size.
    clip_norm:
        L2 bound ``C`` the client clips its delta to before reporting; ``None`` means no clipping.
    """

    round: int
    lr: float
    local_epochs: int
    batch_size: int
    clip_norm: float | None = None

    def to_dict(self) -> dict[str, float | int]:
        """Plain dict (``clip_norm`` omitted when ``None``), e.g. for a Flower ConfigRecord."""
        out: dict[str, float | int] = {
            "round": self.round,
            "lr": self.lr,
            "local_epochs": self.local_epochs,
            "batch_size": self.batch_size,
        }
        if self.clip_norm is not None:
            out["clip_norm"] = self.clip_norm
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`, strict: it reads what a device receives over the network.

        Keys other than :meth:`to_dict`'s are ignored (a Flower ConfigRecord carries more). A
        missing key, a mistyped value (``"zero"``, ``true``, ``1.5`` for an integer) or one out of
        range raises ``ValueError`` naming the key.
        """
        for key in ("round", "lr", "local_epochs", "batch_size"):
            if key not in data:
                raise ValueError(f"train config lacks {key!r}")
        clip = data.get("clip_norm")
        return cls(
            round=_int(data, "round", 0),
            lr=positive_number("train config 'lr'", data["lr"]),
            local_epochs=_int(data, "local_epochs", 1),
            batch_size=_int(data, "batch_size", 1),
            clip_norm=None if clip is None else positive_number("train config 'clip_norm'", clip),
        )


def _int(data: Mapping[str, Any], key: str, low: int) -> int:
    return int_at_least(f"train config {key!r}", data[key], low)


@dataclass(frozen=True)
class ClientTask:
    """One device's work in one round: its local data and a seed for its local randomness."""

    device_id: int
    x: torch.Tensor
    y: torch.Tensor
    seed: int

    @property
    def num_examples(self) -> int:
        return int(self.y.shape[0])


@dataclass
class CohortChunk:
    """Reports of several clients, as produced by :meth:`ClientTrainer.train_cohort`.

    ``deltas[i]`` is the (already clipped) delta of ``device_ids[i]``, trained for round
    ``rounds[i]`` (the ``TrainConfig.round`` the client was given). The server rejects a report
    whose round is not the current one (``"stale_round"``: a replay of an earlier round);
    ``rounds=None`` states no round and skips that check.

    ``below_clip[i]`` (adaptive clipping) is the client's bit: its delta's norm *before* clipping
    was at most the round's clip norm. ``None``: the server reads the bit off the reported
    (clipped) delta (:func:`fedsim.privacy.clipping.below_clip`).
    """

    device_ids: np.ndarray
    deltas: torch.Tensor
    num_examples: torch.Tensor
    losses: torch.Tensor
    rounds: np.ndarray | None = None
    below_clip: np.ndarray | None = None


@dataclass
class UpdateBatch:
    """The server's view of one round's accepted client updates (streamed, so O(model size)).

    Attributes
    ----------
    delta_sum:
        Sum over accepted clients of ``weight_i * delta_i`` (weights per the strategy's
        ``weighting``: example counts or 1).
    weight_sum:
        Sum of the weights.
    num_updates:
        Number of accepted updates.
    num_examples:
        Total local examples behind the accepted updates.
    rejected:
        Rejected updates by reason (``"non_finite"``, ``"norm_exceeds_clip"``, ...).
    deltas, weights:
        Individual accepted deltas ``[n, P]`` and weights ``[n]``, only when the strategy sets
        ``needs_individual_updates``.
    num_below_clip:
        Accepted updates whose norm before clipping was at most the round's clip norm (their
        bits, :class:`CohortChunk`); adaptive clipping's clipped count. 0 without a clip norm.
    """

    delta_sum: torch.Tensor
    weight_sum: float
    num_updates: int
    num_examples: int
    rejected: dict[str, int] = field(default_factory=dict)
    deltas: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    num_below_clip: int = 0

    @property
    def num_rejected(self) -> int:
        return sum(self.rejected.values())
