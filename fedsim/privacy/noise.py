"""Privacy noise: a secret :class:`NoiseKey` and the :class:`NoiseSource` that expands it.

Every piece of privacy noise a run adds (a round's Gaussian noise, a tree node's noise, ...) and
every privacy-relevant random choice (Poisson sampling of the cohort) is a pure function of
``(key, words)``: ``source.normal(words, n)`` returns ``n`` float32 standard normals (callers scale
them), ``source.uniform(words, n)`` ``n`` 53-bit uniforms on ``(0, 1)``. ``words`` is a tuple of
non-negative integers that starts with a tag naming the use (:data:`TAG_ROUND`, :data:`TAG_TREE`,
:data:`TAG_SAMPLE`, ...), so two uses never share numbers. A round re-executed after a crash
therefore adds exactly the noise it added the first time: fresh noise on a replay would publish a
second noisy view of the same data and double its privacy cost.

Runs under one key never share noise: a run's source carries its public **run id** (128 random
bits, :func:`new_run_id`), and every word tuple is prefixed with ``(TAG_RUN, id_hi, id_lo)``
(:meth:`NoiseSource.words`). Two runs with the same fixed key file (a reproducible sweep, two
Flower jobs) therefore draw independent noise and cohorts; an exact replay needs the key *and*
the run id. A source without a run id (``run_id=None``: tests, standalone library use) draws from
the unprefixed words.

Anyone who knows the key can subtract the noise, so the key is secret: 256 bits from the
operating system's secure source (:meth:`NoiseKey.generate`), never derived from the public
scenario seed, never shown by ``repr``/``str``, not picklable, and saved readable by its owner
only (mode 0600, :meth:`NoiseKey.save`). In simulation the engine keeps a DP run's key in the run
directory as ``secret/noise.key`` (so ``--resume`` replays the same noise) unless the scenario
names a fixed key file (``[privacy] noise-key-file``, for reproducible research); a Flower
ServerApp draws a fresh key per job.

Expansion (:mod:`fedsim.privacy.csprng`): AES-128-CTR under the sub-key
``HMAC-SHA256(key, "fedsim-noise-v2" || words)``; normals are the sum of four polar-method draws
from 53-bit uniforms, halved (no truncation at 5.77 sigma; a defence against floating-point attacks).
:meth:`NoiseKey.from_seed` makes a key from an integer for tests and reproducible examples: such
a key is *public* and gives no privacy against anyone who knows the integer.
"""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

import numpy as np
import torch

from fedsim.privacy import csprng
from fedsim.privacy.csprng import NoiseKeyError
from fedsim.validation import RUN_ID_HEX, is_int
from fedsim.validation import run_id as _valid_run_id

__all__ = [
    "KEY_FILE",
    "RUN_ID_HEX",
    "TAG_CLIENT",
    "TAG_COUNT",
    "TAG_ROUND",
    "TAG_RUN",
    "TAG_SAMPLE",
    "TAG_SELECT",
    "TAG_TREE",
    "NoiseKey",
    "NoiseKeyError",
    "NoiseSource",
    "check_run_id",
    "new_run_id",
]

#: Tag word of DP-FedAvg's per-round Gaussian noise: words ``(TAG_ROUND, round)``.
TAG_ROUND = 0x524F554E  # "ROUN"
#: Tag word of a tree-aggregation node's noise: words ``(TAG_TREE, start, end)``.
TAG_TREE = 0x54524545  # "TREE"
#: Tag word of Poisson sampling: words ``(TAG_SAMPLE, round)``, one uniform per eligible device.
TAG_SAMPLE = 0x53414D50  # "SAMP"
#: Tag word of the cohort-selection generator of a DP run: words ``(TAG_SELECT, round)``.
TAG_SELECT = 0x53454C45  # "SELE"
#: Tag word of adaptive clipping's clipped-count noise: words ``(TAG_COUNT, round)``, one normal.
TAG_COUNT = 0x434F554E  # "COUN"
#: Tag word of a simulated device's private randomness (example-level DP-SGD): ``(TAG_CLIENT, round, device)``.
TAG_CLIENT = 0x434C4945  # "CLIE"

#: Tag word that prefixes every word tuple of a source with a run id: ``(TAG_RUN, id_hi, id_lo, ...)``.
TAG_RUN = 0x52554E49  # "RUNI"
#: Where a simulated DP run keeps its key, relative to the run directory (mode 0600, dir 0700).
KEY_FILE = Path("secret") / "noise.key"


def new_run_id() -> str:
    """A fresh public run id: 128 bits from :mod:`secrets`, as 32 lowercase hex digits."""
    return secrets.token_hex(RUN_ID_HEX // 2)


def check_run_id(value: str, where: str = "run id") -> str:
    """``value`` if it is 32 hex digits (lower-cased); else ``ValueError`` naming ``where``."""
    return _valid_run_id(where, value)


class NoiseKey(csprng.NoiseKey):
    """The secret that all of a run's privacy noise and sampling is derived from.

    Create one with :meth:`generate` (256 bits from :mod:`secrets`) or :meth:`load`; save it
    with :meth:`save` (mode 0600). The bytes never appear in ``repr``/``str`` and cannot be
    pickled. :meth:`from_seed` is for tests and examples only (a public key).
    """

    __slots__ = ()

    @classmethod
    def from_seed(cls, seed: int) -> NoiseKey:
        """A *public* key determined by an integer (tests, examples): no privacy against its holder."""
        if not is_int(seed) or seed < 0:
            raise ValueError(f"a noise seed is a non-negative integer, got {seed!r}")
        material = hashlib.sha256(b"fedsim-public-noise-key-v1" + int(seed).to_bytes(32, "little")).digest()
        return cls(material)

    def __reduce__(self) -> tuple:
        raise TypeError("a NoiseKey cannot be pickled; save it with key.save(path) (mode 0600)")


class NoiseSource:
    """Standard normals and uniforms as a pure function of ``(key, words)``.

    Parameters
    ----------
    key:
        The run's :class:`NoiseKey`.
    run_id:
        The run's public id (:func:`new_run_id`, 32 hex digits): it prefixes every word tuple, so
        runs under one key draw independent noise. ``None``: unprefixed words (tests, library use).
    """

    __slots__ = ("_prefix", "key", "run_id")

    def __init__(self, key: csprng.NoiseKey, run_id: str | None = None) -> None:
        if not isinstance(key, csprng.NoiseKey):
            raise TypeError(f"NoiseSource needs a NoiseKey, got {type(key).__name__}")
        self.key = key
        self.run_id = None if run_id is None else check_run_id(run_id)
        if self.run_id is None:
            self._prefix: tuple[int, ...] = ()
        else:
            value = int(self.run_id, 16)
            self._prefix = (TAG_RUN, value >> 64, value & (2**64 - 1))

    @classmethod
    def from_seed(cls, seed: int, run_id: str | None = None) -> NoiseSource:
        """Shorthand for ``NoiseSource(NoiseKey.from_seed(seed), run_id)`` (a public key: tests only)."""
        return cls(NoiseKey.from_seed(seed), run_id)

    def words(self, words: tuple[int, ...]) -> tuple[int, ...]:
        """The full word tuple of a draw: the run id's prefix, then ``words``."""
        return self._prefix + tuple(words)

    @staticmethod
    def _check(n: int) -> int:
        if not is_int(n) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        return int(n)

    def normal(self, words: tuple[int, ...], n: int) -> torch.Tensor:
        """``n`` float32 standard normals determined by the key and ``words`` alone.

        Parameters
        ----------
        words:
            Non-negative integers below ``2**64``, a tag word first (domain separation).
        n:
            Number of values (>= 1).
        """
        return csprng.standard_normal(self.key, self.words(words), self._check(n))

    def uniform(self, words: tuple[int, ...], n: int) -> np.ndarray:
        """``n`` float64 uniforms on ``(0, 1)`` (53 bits each), determined by the key and ``words``."""
        return csprng.uniform(self.key, self.words(words), self._check(n))

    def generator(self, words: tuple[int, ...]) -> np.random.Generator:
        """A NumPy generator seeded with 256 secret bits of the stream of ``words``.

        For choices that go through APIs expecting a ``numpy.random.Generator`` (a strategy's
        ``select``). Its seed is unpredictable without the key; draws that a privacy guarantee
        rests on directly (Poisson sampling) use :meth:`uniform` instead.
        """
        entropy = np.frombuffer(csprng.keystream(self.key, self.words(words), 32), dtype=np.uint32)
        return np.random.default_rng(np.random.SeedSequence(entropy.tolist()))

    def __reduce__(self) -> tuple:
        raise TypeError("a NoiseSource holds a secret key and cannot be pickled")

    def __repr__(self) -> str:
        run = "" if self.run_id is None else f", run_id={self.run_id!r}"
        return f"NoiseSource(NoiseKey(<secret>){run})"
