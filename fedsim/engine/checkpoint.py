"""Checkpoints of a running simulation, and resuming from them with exactly-once privacy.

This module only serialises: the state is the run's own ``RoundOwner.state_dict()``
(:mod:`fedsim.engine.rounds`), restored with ``load_state_dict()``; here it is encoded, written
atomically, found again and checked for integrity, and the run log is cut back on resume.

Every ``[checkpoint] every`` rounds the engine writes ``RUN_DIR/checkpoints/ckpt-<round>.pt``
atomically (temporary file, fsync, rename, fsync of the directory) and keeps the newest
``keep`` of them. A checkpoint holds everything a round depends on that is not a pure function of
the scenario:

================  ===========================================================================
key               content
================  ===========================================================================
``round``         rounds completed (the next round to run, 0-based)
``scenario``      the resolved scenario (``Scenario.to_dict`` minus keys that cannot change
                  results), to refuse resuming under a different scenario
``params``        the global flat parameter vector
``strategy``      ``Strategy.state_dict()`` (momentum buffers, tree-aggregation state, ...)
``trainer``       the trainer's ``state_dict()`` when it defines one
``population``    device memory and the server's participation ledger
``ledger``        the privacy ledger (``PrivacyLedger.to_json()``), or ``None``
``rejected``      rejected updates so far, by reason
``metrics``       the run-log position: byte length of ``metrics.jsonl`` and its last line
``rng``           the state of torch's global generator (fedsim's own randomness is derived from
                  ``(seed, stream, round)``, so the round number *is* its RNG state; the global
                  state only matters for user plug-ins, e.g. dropout)
================  ===========================================================================

Exactly-once privacy. Rounds executed after the last checkpoint and before a crash are executed
again on resume; every random choice in them (availability, cohort, client shuffles, and the DP
noise, a pure function of the seed and the tree node) is the same, so the replay releases the
very same aggregates and costs no extra privacy. The ledger is restored to the checkpoint's
round, so each round's event is recorded exactly once.

File format. A keyed run (a DP run, or an audited one: its releases depend on its noise key)
writes ``MAGIC_MAC``, the fingerprint of its noise key (16 bytes,
:meth:`~fedsim.privacy.csprng.NoiseKey.fingerprint`), an HMAC-SHA256 (32 bytes) under a key
derived from the noise key (:meth:`~fedsim.privacy.csprng.NoiseKey.derive`,
``"checkpoint-mac"``; never the noise key itself) over everything before and after it, the
payload length (8 bytes, big-endian), then the payload. Without the key nobody can write a
checkpoint such a run accepts (a forged one with a shorter privacy ledger, say); a checkpoint of
another key is recognised by its fingerprint. Other runs write ``MAGIC``, the payload's SHA-256
(32 bytes), the length and the payload. The payload is ``torch.save`` of the state, read back with
``weights_only=True``: a checkpoint cannot execute code. A truncated, corrupted, forged or
foreign file is unusable; the loader warns, naming the cause, and falls back to the previous
checkpoint (what a run may then re-execute is bounded by its release record,
:mod:`fedsim.engine.releases`).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsim.atomic import atomic_write_bytes
from fedsim.engine.rundir import RunDir
from fedsim.errors import FedsimError

MAGIC = b"FEDSIM-CHECKPOINT-1\n"
#: Header of an authenticated checkpoint (a keyed run's).
MAGIC_MAC = b"FEDSIM-CHECKPOINT-2\n"
CHECKPOINT_DIR = "checkpoints"
#: Scenario keys that do not change a run's results and may differ on resume (where the run
#: directory is, how often it is checkpointed, which trackers it logs its public metrics to).
NEUTRAL_KEYS = ("output-dir", "checkpoint", "log")

_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")
_NDARRAY = "__ndarray__"
_BYTES = "__bytes__"
_FINGERPRINT_BYTES = 16


class CheckpointError(FedsimError):
    """A run cannot be resumed (not a run directory, changed scenario, inconsistent run log)."""


class CheckpointWarning(UserWarning):
    """A checkpoint was unusable and an older one (or a fresh start) is used instead."""


class CorruptCheckpoint(Exception):
    """A checkpoint file failed its integrity checks (internal: turned into a warning)."""


class CheckpointKey:
    """How a keyed run authenticates its checkpoints: a MAC key derived from its noise key, and
    the key's fingerprint.

    Make one with :meth:`of`; the MAC key never appears in ``repr`` and cannot be pickled.
    """

    __slots__ = ("_mac_key", "fingerprint")

    def __init__(self, mac_key: bytes, fingerprint: str) -> None:
        if len(mac_key) < 16 or len(bytes.fromhex(fingerprint)) != _FINGERPRINT_BYTES:
            raise ValueError("a checkpoint key needs a MAC key of >= 16 bytes and a 16-byte fingerprint")
        self._mac_key = bytes(mac_key)
        #: the noise key's fingerprint (32 hex digits)
        self.fingerprint = fingerprint

    @classmethod
    def of(cls, key: Any) -> CheckpointKey:
        """The checkpoint key of a :class:`~fedsim.privacy.csprng.NoiseKey`."""
        return cls(key.derive("checkpoint-mac"), key.fingerprint())

    def mac(self, data: bytes) -> bytes:
        """HMAC-SHA256 of ``data`` under the derived key."""
        return hmac.new(self._mac_key, data, hashlib.sha256).digest()

    def __repr__(self) -> str:
        return f"CheckpointKey(<secret>, fingerprint={self.fingerprint})"

    def __reduce__(self) -> tuple:
        raise TypeError("a CheckpointKey holds a secret and cannot be pickled")


# ------------------------------------------------------------------------------------------
# encoding


def _pack(value: Any, where: str) -> Any:
    """Convert to what ``torch.load(weights_only=True)`` reads back; reject anything else."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray):
        # torch.load(weights_only=True) refuses b"" (pickled as a call of bytes()): stored as hex
        return {_BYTES: bytes(value).hex()}
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"checkpoint state {where}: numpy arrays of dtype {value.dtype} are not supported")
        return {_NDARRAY: torch.from_numpy(np.ascontiguousarray(value).copy())}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str | int):
                raise TypeError(f"checkpoint state {where}: keys must be str or int, got {k!r}")
            out[k] = _pack(v, f"{where}.{k}")
        return out
    if isinstance(value, list | tuple):
        packed = [_pack(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return packed if isinstance(value, list) else tuple(packed)
    raise TypeError(
        f"checkpoint state {where}: cannot store {type(value).__name__} "
        "(use tensors, numpy arrays, numbers, strings, lists and dicts)"
    )


def _unpack(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_NDARRAY}:
            return value[_NDARRAY].numpy().copy()
        if set(value) == {_BYTES} and isinstance(value[_BYTES], str):
            return bytes.fromhex(value[_BYTES])
        return {k: _unpack(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unpack(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_unpack(v) for v in value)
    return value


def encode(state: dict[str, Any], auth: CheckpointKey | None = None) -> bytes:
    """Serialise a checkpoint state: header (authenticated with ``auth``, else a SHA-256), then the payload."""
    buf = io.BytesIO()
    torch.save(_pack(state, "state"), buf)
    payload = buf.getvalue()
    length = len(payload).to_bytes(8, "big")
    if auth is None:
        return MAGIC + hashlib.sha256(payload).digest() + length + payload
    fingerprint = bytes.fromhex(auth.fingerprint)
    mac = auth.mac(MAGIC_MAC + fingerprint + length + payload)
    return MAGIC_MAC + fingerprint + mac + length + payload


def _payload(data: bytes, auth: CheckpointKey | None) -> bytes:
    """The payload of an encoded checkpoint whose header checks out (:class:`CorruptCheckpoint` otherwise)."""
    if data.startswith(MAGIC_MAC):
        head = len(MAGIC_MAC) + _FINGERPRINT_BYTES + 32 + 8
        if len(data) < head:
            raise CorruptCheckpoint("truncated header")
        fingerprint = data[len(MAGIC_MAC) : len(MAGIC_MAC) + _FINGERPRINT_BYTES]
        mac = data[len(MAGIC_MAC) + _FINGERPRINT_BYTES : head - 8]
        length = data[head - 8 : head]
        payload = data[head:]
        if len(payload) != int.from_bytes(length, "big"):
            raise CorruptCheckpoint(f"truncated: {len(payload)} of {int.from_bytes(length, 'big')} payload bytes")
        if auth is None:
            raise CorruptCheckpoint("authenticated under a noise key, and this run has no key to check it with")
        if not hmac.compare_digest(fingerprint, bytes.fromhex(auth.fingerprint)):
            raise CorruptCheckpoint("written under another noise key (its key fingerprint differs from the run's)")
        if not hmac.compare_digest(mac, auth.mac(MAGIC_MAC + fingerprint + length + payload)):
            raise CorruptCheckpoint("authentication failed (MAC mismatch: damaged, or forged without the run's key)")
        return payload
    head = len(MAGIC) + 32 + 8
    if len(data) < head or not data.startswith(MAGIC):
        raise CorruptCheckpoint("not a fedsim checkpoint or truncated header")
    if auth is not None:
        raise CorruptCheckpoint(
            "not authenticated (an unkeyed checksum, where this run's checkpoints carry a MAC under "
            "its key: forged, or written by an older fedsim)"
        )
    digest = data[len(MAGIC) : len(MAGIC) + 32]
    length = int.from_bytes(data[len(MAGIC) + 32 : head], "big")
    payload = data[head:]
    if len(payload) != length:
        raise CorruptCheckpoint(f"truncated: {len(payload)} of {length} payload bytes")
    if hashlib.sha256(payload).digest() != digest:
        raise CorruptCheckpoint("checksum mismatch")
    return payload


def decode(data: bytes, auth: CheckpointKey | None = None) -> dict[str, Any]:
    """Inverse of :func:`encode`; raises :class:`CorruptCheckpoint` on any integrity failure.

    With ``auth`` (a keyed run) only a checkpoint authenticated under that key is accepted;
    without it only an unkeyed one.
    """
    payload = _payload(data, auth)
    try:
        state = torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as exc:  # integrity fine but unreadable: written by an incompatible version
        raise CorruptCheckpoint(f"unreadable payload ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(state, dict) or "round" not in state:
        raise CorruptCheckpoint("payload is not a checkpoint state")
    return _unpack(state)


# ------------------------------------------------------------------------------------------
# scenario comparison


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def comparable(scenario_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A resolved scenario dict without the keys in :data:`NEUTRAL_KEYS`."""
    return {k: v for k, v in scenario_dict.items() if k not in NEUTRAL_KEYS}


def scenario_diff(
    a: Mapping[str, Any], b: Mapping[str, Any], *, defaults: Mapping[str, Any] | None = None
) -> list[str]:
    """Dotted keys whose values differ between two scenario dicts (neutral keys ignored).

    With ``defaults`` (a resolved scenario dict of default values), a key that one side lacks
    counts as having its default: a checkpoint written before a key was added to the scenario
    format still matches a scenario that leaves the new key at its default.
    """
    fa, fb = _flatten(comparable(a)), _flatten(comparable(b))
    fd = _flatten(comparable(defaults)) if defaults is not None else {}
    missing = object()

    def value(side: dict[str, Any], key: str) -> Any:
        return side.get(key, fd.get(key, missing))

    return sorted(k for k in fa.keys() | fb.keys() if value(fa, k) is missing or value(fa, k) != value(fb, k))


def default_scenario_dict() -> dict[str, Any]:
    """The resolved dict of a scenario with every key at its default."""
    from fedsim.scenario import Scenario

    return Scenario(name="defaults").to_dict()


# ------------------------------------------------------------------------------------------
# the checkpoint directory


def checkpoint_path(directory: Path, round: int) -> Path:
    """``directory/ckpt-<round, 8 digits>.pt``."""
    return directory / f"ckpt-{round:08d}.pt"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """``(round, path)`` of every checkpoint file, newest first (temporary files ignored)."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        m = _NAME.match(path.name)
        if m and path.is_file():
            found.append((int(m.group(1)), path))
    return sorted(found, reverse=True)


def scan_checkpoints(
    directory: Path, auth: CheckpointKey | None = None
) -> tuple[tuple[dict[str, Any], Path] | None, list[tuple[Path, str]]]:
    """The newest checkpoint that passes its integrity checks, and why each newer one failed.

    Returns ``(found, failures)``: ``found`` is ``(state, path)`` or ``None``; ``failures`` lists
    ``(path, reason)`` of every unusable checkpoint newer than it, newest first.
    """
    failures: list[tuple[Path, str]] = []
    for round, path in list_checkpoints(directory):
        try:
            state = decode(path.read_bytes(), auth)
            if int(state["round"]) != round:
                raise CorruptCheckpoint(f"holds round {state['round']}, its name says {round}")
            return (state, path), failures
        except (CorruptCheckpoint, OSError) as exc:
            failures.append((path, str(exc) or type(exc).__name__))
    return None, failures


def load_latest(directory: Path, auth: CheckpointKey | None = None) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that passes its integrity checks.

    Each unusable newer one is reported with a :class:`CheckpointWarning` naming the cause.
    Returns ``None`` when there is no usable checkpoint.
    """
    found, failures = scan_checkpoints(directory, auth)
    for path, reason in failures:
        warnings.warn(
            f"checkpoint {path} is unusable ({reason}); falling back to the previous one",
            CheckpointWarning,
            stacklevel=2,
        )
    return found


@dataclass
class Checkpointer:
    """Writes a run's checkpoints every ``every`` rounds, keeping the newest ``keep``."""

    directory: Path
    every: int
    keep: int = 2
    #: a keyed run's checkpoint key (authenticated checkpoints), else ``None`` (a checksum)
    auth: CheckpointKey | None = None

    def due(self, rounds_done: int) -> bool:
        """Whether a checkpoint is due after ``rounds_done`` completed rounds."""
        return self.every > 0 and rounds_done > 0 and rounds_done % self.every == 0

    def save(self, rounds_done: int, state: dict[str, Any], run_dir: RunDir | None) -> Path:
        """Write ``state`` (a run's ``state_dict()``) as the checkpoint after ``rounds_done`` rounds.

        The run log's position (``metrics``: byte length of ``metrics.jsonl`` and its last line)
        is added, so a resume can cut the log back to it.
        """
        # a checkpoint holds exact (un-noised) server state: DP-FTRL's prefix sum, the tree's
        # node noise. It is as secret as the noise key: owner-only directory
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        path = checkpoint_path(self.directory, rounds_done)
        atomic_write_bytes(path, encode({**state, "metrics": metrics_position(run_dir)}, self.auth))
        for _, old in list_checkpoints(self.directory)[self.keep :]:
            old.unlink(missing_ok=True)
        return path


# ------------------------------------------------------------------------------------------
# the run log and resuming


def metrics_position(run_dir: RunDir | None) -> dict[str, Any]:
    """Byte length of ``metrics.jsonl`` (fsynced first) and its last line."""
    if run_dir is None or not run_dir.metrics_path.exists():
        return {"offset": 0, "last_line": b""}
    path = run_dir.metrics_path
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - 65536))
        tail = fh.read()
    lines = tail.splitlines(keepends=True)
    return {"offset": size, "last_line": lines[-1] if lines else b""}


def restore_metrics_log(run_dir: RunDir, position: dict[str, Any], ckpt: Path) -> None:
    """Cut ``metrics.jsonl`` back to the checkpoint's position (rows of replayed rounds go)."""
    path = run_dir.metrics_path
    offset, last = int(position["offset"]), bytes(position["last_line"])
    size = path.stat().st_size if path.exists() else 0
    ok = size >= offset
    if ok and last:
        with open(path, "rb") as fh:
            fh.seek(offset - len(last))
            ok = fh.read(len(last)) == last
    if not ok:
        raise CheckpointError(
            f"{path} does not extend the run log recorded in {ckpt} (expected {offset} bytes ending "
            "with that checkpoint's last row); it was modified or truncated, cannot resume"
        )
    with open(path, "r+b") as fh:
        fh.truncate(offset)
        fh.flush()
        os.fsync(fh.fileno())


def latest_for_resume(
    run_dir: RunDir, auth: CheckpointKey | None = None, *, start_over: str = "starting over from round 1"
) -> tuple[dict[str, Any], Path] | None:
    """The newest usable checkpoint of the run in ``run_dir``, or ``None`` (start over).

    Removes checkpoints interrupted while being written and warns (:class:`CheckpointWarning`)
    about each unusable one and when there is no usable one (``start_over`` says what happens
    then). Starting over is safe: every round's noise is a pure function of the noise key and the
    round, and a keyed run's re-executed rounds must reproduce what they released
    (:mod:`fedsim.engine.releases`).
    """
    directory = run_dir.path / CHECKPOINT_DIR
    for stale in directory.glob("ckpt-*.pt.tmp") if directory.is_dir() else []:
        stale.unlink(missing_ok=True)  # a checkpoint interrupted while being written
    found = load_latest(directory, auth)
    if found is None:
        if list_checkpoints(directory):
            warnings.warn(f"no usable checkpoint in {directory}; {start_over}", CheckpointWarning, stacklevel=3)
        else:
            warnings.warn(f"no checkpoint in {directory}; {start_over}", CheckpointWarning, stacklevel=3)
    return found
