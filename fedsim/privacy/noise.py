"""Privacy noise: a secret :class:`NoiseKey` and the :class:`NoiseSource` that expands it.

Every piece of privacy noise a run adds (a round's Gaussian noise, a tree node's noise, ...) is a
pure function of ``(key, words)``: ``source.normal(words, n)`` returns ``n`` float32 standard
normals, and callers scale them. ``words`` is a tuple of non-negative integers that starts with a
tag naming the use (:data:`TAG_ROUND`, :data:`TAG_TREE`, ...), so two uses never share numbers.
A round re-executed after a crash therefore adds exactly the noise it added the first time: fresh
noise on a replay would publish a second noisy view of the same data and double its privacy cost
(see :mod:`fedsim.privacy.tree_noise`).

Anyone who knows the key can subtract the noise, so the key must stay secret: its ``repr`` and
``str`` never show it, and :meth:`NoiseKey.save` writes it readable by its owner only (mode 0600).

Expansion: ``SeedSequence([key, *words])`` (NumPy's hash-based seed mixing) seeds a
``torch.Generator`` whose ``randn`` draws the normals. :meth:`NoiseKey.from_seed` keys a simulated
run by an integer derived from its seed, so simulations are reproducible from their scenario.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np
import torch

__all__ = ["TAG_ROUND", "TAG_TREE", "NoiseKey", "NoiseSource"]

#: Tag word of DP-FedAvg's per-round Gaussian noise: words ``(TAG_ROUND, round)``.
TAG_ROUND = 0x524F554E  # "ROUN"
#: Tag word of a tree-aggregation node's noise: words ``(TAG_TREE, start, end)``.
TAG_TREE = 0x54524545  # "TREE"

_KEY_BITS = 128


class NoiseKey:
    """The secret that all of a run's privacy noise is derived from.

    Create one with :meth:`generate` (128 bits from :mod:`secrets`), :meth:`load` or, for a
    reproducible simulation, :meth:`from_seed`. The value never appears in ``repr``/``str``.
    """

    __slots__ = ("_value",)

    def __init__(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError("a noise key is a non-negative integer")
        self._value = int(value)

    @classmethod
    def generate(cls) -> NoiseKey:
        """A fresh key of 128 bits from the operating system's secure random source."""
        return cls(secrets.randbits(_KEY_BITS))

    @classmethod
    def from_seed(cls, seed: int) -> NoiseKey:
        """The key of a simulated run, given as an integer (reproducible, hence not secret)."""
        return cls(seed)

    @classmethod
    def load(cls, path: str | Path) -> NoiseKey:
        """Read a key written by :meth:`save`."""
        text = Path(path).read_text(encoding="ascii").strip()
        try:
            return cls(int(text, 16))
        except ValueError:
            raise ValueError(f"{path}: not a noise key file") from None

    def save(self, path: str | Path) -> None:
        """Write the key as hex to ``path``, readable and writable by its owner only (0600)."""
        path = Path(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, f"{self._value:x}\n".encode("ascii"))
        finally:
            os.close(fd)

    def words(self) -> list[int]:
        """The key as entropy words for the expansion (used by :class:`NoiseSource` only)."""
        return [self._value]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NoiseKey) and secrets.compare_digest(
            self._value.to_bytes(64, "big"), other._value.to_bytes(64, "big")
        )

    def __hash__(self) -> int:
        return hash((NoiseKey, self._value))

    def __repr__(self) -> str:
        return "NoiseKey(<secret>)"

    __str__ = __repr__

    def __reduce__(self):  # pickling (Ray, multiprocessing) keeps the value, printing never does
        return (NoiseKey, (self._value,))


class NoiseSource:
    """Standard normal noise as a pure function of ``(key, words)``.

    Parameters
    ----------
    key:
        The run's :class:`NoiseKey`.
    """

    def __init__(self, key: NoiseKey) -> None:
        if not isinstance(key, NoiseKey):
            raise TypeError(f"NoiseSource needs a NoiseKey, got {type(key).__name__}")
        self.key = key

    @classmethod
    def from_seed(cls, seed: int) -> NoiseSource:
        """Shorthand for ``NoiseSource(NoiseKey.from_seed(seed))``."""
        return cls(NoiseKey.from_seed(seed))

    def normal(self, words: tuple[int, ...], n: int) -> torch.Tensor:
        """``n`` float32 standard normals determined by the key and ``words`` alone.

        Parameters
        ----------
        words:
            Non-negative integers, a tag word first (domain separation between uses).
        n:
            Number of values (>= 1).
        """
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        entropy = [*self.key.words(), *(int(w) for w in words)]
        state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)
        gen = torch.Generator().manual_seed(int(state[0]))
        return torch.randn(int(n), generator=gen, dtype=torch.float32)

    def __repr__(self) -> str:
        return "NoiseSource(NoiseKey(<secret>))"
