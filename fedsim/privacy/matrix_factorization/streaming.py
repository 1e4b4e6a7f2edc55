"""The round bookkeeping of the correlated-noise streams (:class:`NoiseStream`).

A stream draws ``xi_t = source.normal((TAG, t), P)`` for round ``t`` from a
:class:`fedsim.privacy.noise.NoiseSource`-like object and returns ``std * (C^-1 xi)_t``, online,
with state between rounds (buffers or band history, as secret as the key). Rounds come in order; a
round replayed from the state saved before it adds the same noise, bit for bit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from fedsim.validation import int_at_least, number_at_least

__all__ = ["NoiseStream"]


class NoiseStream(ABC):
    """Shared round bookkeeping of the correlated-noise streams (subclasses set :attr:`tag`)."""

    tag: int

    def __init__(self, num_params: int, std: float, source: Any) -> None:
        self.num_params = int_at_least("num_params", num_params, 1)
        self.std = number_at_least("std", std, 0.0)
        self.source = source
        self.next_round = 0

    def draw(self, round: int) -> torch.Tensor:
        """``xi_round``: the source's standard normal vector of this stream and round."""
        z = self.source.normal((self.tag, int(round)), self.num_params)
        if tuple(z.shape) != (self.num_params,):
            raise ValueError(f"noise source returned shape {tuple(z.shape)}, expected ({self.num_params},)")
        return z

    def check_round(self, round: int) -> None:
        """``ValueError`` unless ``round`` is the one the stream expects next."""
        if round != self.next_round:
            raise ValueError(
                f"noise stream expects round {self.next_round}, got {round}; "
                "to replay a round, restore the state saved before it"
            )

    @abstractmethod
    def step(self, round: int) -> torch.Tensor:
        """The noise of ``round`` (float32, shape ``[num_params]``); rounds must come in order."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The state between rounds (as secret as the key)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
