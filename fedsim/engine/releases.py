"""The release record: a durable high-water mark of the rounds a run has published.

The rule it enforces: **a round that may have been published is never released again with
different inputs.** Noise is a pure function of the run's secret key and the round, so a round
released twice under one key with different inputs (changed data, devices that decline a round
they already gave to, a lost checkpoint that rewinds the server's state) adds the same noise to
two different sums, and the difference of the two releases is the exact difference of the sums.

Every keyed run (a DP run, or an audited one) keeps one record, ``releases.jsonl``, in a private
place: ``RUN_DIR/private/`` for the in-process engine, the job's state directory for a Flower
ServerApp (``fedsim.flower.server_state``). Line 1 is the header; then one line per released
round, appended and fsynced *before* anything of the round is published (its ``metrics.jsonl``
row, the model that leaves the server):

==========  ==================================================================================
header      ``format``, ``key`` (the noise key's fingerprint, :meth:`NoiseKey.fingerprint`),
            ``data`` (:func:`fedsim.data.fingerprint.data_fingerprint`), ``run`` (what the run
            is: scenario name, run id or job id)
round line  ``round`` (1-based), ``digest`` (:func:`release_digest`: SHA-256 of the round's
            public row and the parameters it released), ``event`` (the round's privacy event,
            or ``null``)
every line  ``mac``: HMAC-SHA256 under a key derived from the noise key
            (:meth:`NoiseKey.derive`, ``"release-record-mac"``) of the previous line's MAC and
            this line's content, so a line cannot be changed, forged or reordered without the
            key (removing the last lines is possible; see ``docs/threat-model.md``)
==========  ==================================================================================

A line cut short by a crash (no final newline) is a round whose record was never durable, so
nothing of it was published: it is ignored and overwritten by the next append.

How the two servers use it:

* in-process (:class:`~fedsim.engine.simulation.Simulation`): replays are deterministic (every
  random choice, and every device's memory, is restored from the checkpoint), so a resume may
  re-execute rounds at or below the mark, *provided each reproduces its recorded digest*, which
  :meth:`ReleaseRecord.release` checks before the round's row is written: a mismatch stops the
  run with one line, and nothing of the round is published again;
* Flower (:class:`~fedsim.flower.strategy.FedsimStrategy`): a replay is not deterministic
  (devices that trained for a round decline it), so a restarted server whose newest usable
  checkpoint is older than the mark refuses, naming the rounds at risk.

The record's events also let a new run report the privacy of an abandoned one
(:func:`prior_report`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedsim.atomic import fsync_dir
from fedsim.data.fingerprint import fingerprint_diff
from fedsim.engine.checkpoint import CheckpointError
from fedsim.privacy.csprng import NoiseKey

__all__ = [
    "RELEASES_FILE",
    "PriorReport",
    "Release",
    "ReleaseError",
    "ReleaseRecord",
    "prior_report",
    "release_digest",
]

#: The record's file name (in ``RUN_DIR/private/``, or a Flower job's state directory).
RELEASES_FILE = "releases.jsonl"
#: Format name in the header.
FORMAT = "fedsim-releases-1"
_MAC_PURPOSE = "release-record-mac"
_DIGEST_DOMAIN = b"fedsim-release-v1\x00"


class ReleaseError(CheckpointError):
    """The release record refuses: a changed replay, another key, other data, a damaged record."""


def release_digest(row_line: str, params: torch.Tensor) -> str:
    """SHA-256 of what a round publishes: its public row (as written to ``metrics.jsonl``) and
    the parameters it released (dtype, shape and bytes)."""
    h = hashlib.sha256(_DIGEST_DOMAIN)
    h.update(row_line.encode("utf-8"))
    flat = params.detach().cpu().contiguous()
    h.update(f"{flat.dtype}{tuple(flat.shape)}".encode("ascii"))
    h.update(flat.numpy().tobytes())
    return h.hexdigest()


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so recorded and fresh values compare."""
    return json.loads(json.dumps(value))


@dataclass(frozen=True)
class Release:
    """One released round as the record holds it."""

    round: int
    digest: str
    #: the round's privacy event, a list of them when it recorded several (adaptive clipping)
    event: dict[str, Any] | list[dict[str, Any]] | None

    @property
    def events(self) -> list[dict[str, Any]]:
        """The round's privacy events, in order."""
        if self.event is None:
            return []
        return list(self.event) if isinstance(self.event, list) else [self.event]


def _span(rounds: Sequence[int]) -> str:
    """``"round 3"`` or ``"rounds 3-7"``."""
    return f"round {rounds[0]}" if len(rounds) == 1 else f"rounds {rounds[0]}-{rounds[-1]}"


class ReleaseRecord:
    """A run's release record (see the module docstring); open one with :meth:`create` or :meth:`open`.

    Parameters
    ----------
    path:
        The record file.
    key:
        The run's noise key (its derived MAC key signs every line).
    header:
        The header's content (without its MAC).
    releases:
        The released rounds read from the file, in order.
    last_mac:
        The MAC of the last complete line (the next line's chain value).
    size:
        Byte length of the complete lines (a torn tail beyond it is overwritten).
    """

    def __init__(
        self, path: Path, key: NoiseKey, header: dict[str, Any], releases: list[Release], last_mac: bytes, size: int
    ) -> None:
        self.path = Path(path)
        self._mac_key = key.derive(_MAC_PURPOSE)
        self.header = header
        self._releases = releases
        self._released = len(releases)
        self._last_mac = last_mac
        self._size = size
        #: the refusals' advice on starting anew (a Flower job names its run-config key instead)
        self.restart = "start a new run (a new key) and count this run's rho with it (privacy.prior-runs)"

    def __repr__(self) -> str:
        return f"ReleaseRecord({self.path}, {self._released} rounds released)"

    # -- reading and writing ------------------------------------------------------------------
    def _sign(self, body: dict[str, Any]) -> bytes:
        return hmac.new(self._mac_key, self._last_mac + _canonical(body), hashlib.sha256).digest()

    @classmethod
    def create(cls, path: str | Path, key: NoiseKey, *, data: dict[str, Any], run: dict[str, Any]) -> ReleaseRecord:
        """Start the record of a new run (replacing any file at ``path``): its header, durable.

        ``data`` is the run's data fingerprint, ``run`` what identifies the run (scenario name,
        run id or job id). The file has mode 0600 in a 0700 directory.
        """
        path = Path(path)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        record = cls(path, key, {}, [], b"", 0)
        header = {"format": FORMAT, "key": key.fingerprint(), "data": data, "run": run}
        line = json.dumps({**header, "mac": record._sign(header).hex()}, sort_keys=True) + "\n"
        tmp = path.with_name(path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        record.header = header
        record._last_mac = bytes.fromhex(json.loads(line)["mac"])
        record._size = len(line.encode("utf-8"))
        return record

    @classmethod
    def open(cls, path: str | Path, key: NoiseKey, *, key_file: str = "the noise key") -> ReleaseRecord:
        """Read and authenticate an existing record with the run's ``key``.

        Raises :class:`ReleaseError` (one line) when the file is missing or unreadable, when
        ``key`` is not the key the run was started with (``key_file`` names it in the message),
        or when a line fails its MAC (changed, forged, reordered).
        """
        path = Path(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise ReleaseError(f"{path}: the run's release record is missing") from None
        except OSError as exc:
            raise ReleaseError(f"{path}: cannot read the run's release record ({type(exc).__name__})") from None
        complete = raw[: raw.rfind(b"\n") + 1]  # a torn last line was never durable: ignored
        lines = complete.decode("utf-8", errors="replace").splitlines()
        record = cls(path, key, {}, [], b"", len(complete))
        bodies = []
        for number, line in enumerate(lines, 1):
            try:
                body = json.loads(line)
                mac = bytes.fromhex(body.pop("mac"))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ReleaseError(f"{path}: line {number} is not a release record line") from None
            if number == 1:
                if body.get("format") != FORMAT:
                    raise ReleaseError(f"{path}: not a fedsim release record (format {body.get('format')!r})")
                if body.get("key") != key.fingerprint():
                    raise ReleaseError(
                        f"{key_file} is not the key this run was started with (its fingerprint differs "
                        f"from the one in {path}): rounds run under it would add other noise to rounds "
                        "already released; restore the run's key file"
                    )
            if not hmac.compare_digest(mac, record._sign(body)):
                raise ReleaseError(
                    f"{path}: line {number} fails its authentication (changed or forged; "
                    "the record is signed under the run's key)"
                )
            record._last_mac = mac
            bodies.append(body)
        if not bodies:
            raise ReleaseError(f"{path}: the release record is empty (its header is missing)")
        record.header = bodies[0]
        for expected, body in enumerate(bodies[1:], 1):
            if body.get("round") != expected:
                raise ReleaseError(f"{path}: holds round {body.get('round')!r} where round {expected} belongs")
            record._releases.append(Release(expected, str(body["digest"]), body.get("event")))
        record._released = len(record._releases)
        return record

    # -- what it says --------------------------------------------------------------------------
    @property
    def released(self) -> int:
        """The high-water mark: rounds ``1 .. released`` may have been published."""
        return self._released

    def recorded(self, round: int) -> Release | None:
        """The record of (1-based) ``round``, or ``None`` when it was not released."""
        return self._releases[round - 1] if 1 <= round <= len(self._releases) else None

    def events(self) -> list[tuple[int, dict[str, Any]]]:
        """``(0-based round, event dict)`` of the released rounds that recorded a privacy event."""
        return [(r.round - 1, e) for r in self._releases for e in r.events]

    def check_data(self, current: dict[str, Any], *, where: str) -> None:
        """Refuse (:class:`ReleaseError`) data whose fingerprint differs from the recorded one."""
        diff = fingerprint_diff(self.header.get("data") or {}, current)
        if diff:
            rounds = list(range(1, self._released + 1))
            at_risk = f"{_span(rounds)} released under this key" if rounds else "no round released yet"
            raise ReleaseError(
                f"{where}: the data differ from those the run started on ({', '.join(diff)}; {at_risk}): "
                f"re-executed rounds would add the same noise to other sums; restore the data, or {self.restart}"
            )

    def check_ledger(self, ledger: list[dict[str, Any]] | None, rounds_done: int, *, source: str) -> None:
        """Refuse a checkpoint whose privacy ledger does not hold one event per released round.

        ``ledger`` is the checkpoint's ``PrivacyLedger.to_json()`` (or ``None``), ``rounds_done``
        its round count: for the rounds up to it that the record holds, the ledger must hold
        exactly the recorded events (a forged ledger, shorter or otherwise, is refused).
        """
        upto = min(rounds_done, self._released)
        expected = [{"round": r.round - 1, "event": e} for r in self._releases[:upto] for e in r.events]
        entries = _as_json(ledger) if isinstance(ledger, list | tuple) else []
        well_formed = all(isinstance(e, dict) and isinstance(e.get("round"), int) for e in entries)
        if not well_formed or [e for e in entries if e["round"] < upto] != expected:
            raise ReleaseError(
                f"{source}: its privacy ledger does not hold the {len(expected)} events of the rounds "
                f"{self.path.name} records as released (it holds {len(entries)} events for {rounds_done} "
                "rounds; one event per released round is required); refusing it"
            )

    # -- recording ------------------------------------------------------------------------------
    def release(self, round: int, digest: str, event: dict[str, Any] | list[dict[str, Any]] | None) -> bool:
        """Before anything of (1-based) ``round`` is published: record it, or check a replay.

        A round above the mark is appended and fsynced (returns ``True``). A round at or below it
        (a re-execution after a resume) must reproduce the recorded digest and event (returns
        ``False``); otherwise :class:`ReleaseError`, and the caller publishes nothing of it.
        """
        event = _as_json(event)
        if round <= self._released:
            recorded = self._releases[round - 1]
            if recorded.digest != digest or recorded.event != event:
                raise ReleaseError(
                    f"round {round} was re-executed on resume and does not reproduce what it released "
                    f"before (its digest or privacy event in {self.path} differs): its inputs changed (data, code, "
                    f"device state); nothing of it was published again. Restore what changed, or {self.restart}"
                )
            return False
        if round != self._released + 1:
            raise ReleaseError(f"{self.path}: round {round} follows round {self._released}; a round is missing")
        body = {"round": round, "digest": digest, "event": event}
        mac = self._sign(body)
        line = (json.dumps({**body, "mac": mac.hex()}, sort_keys=True) + "\n").encode("utf-8")
        with open(self.path, "r+b") as fh:
            fh.truncate(self._size)  # a torn line from an earlier crash
            fh.seek(self._size)
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        self._size += len(line)
        self._last_mac = mac
        self._releases.append(Release(round, digest, event))
        self._released = round
        return True


@dataclass(frozen=True)
class PriorReport:
    """The privacy an earlier run (or job) spent on the same people, to add to a new run's."""

    names: list[str]
    rounds: int
    rho: float


def prior_report(records: list[tuple[str, ReleaseRecord]], *, delta: float) -> PriorReport | None:
    """The rho released by earlier runs' recorded rounds (``None`` without any).

    Each run's events are accounted on their own (one accountant per run, as that run reported
    them) and the runs' rho are added: zCDP composes additively over independent releases of the
    same people, whatever the mechanisms.
    """
    if not records:
        return None
    from fedsim.privacy.accountant import Accountant
    from fedsim.privacy.events import PrivacyLedger

    total, rounds = 0.0, 0
    for _name, record in records:
        ledger = PrivacyLedger.from_json([{"round": r, "event": e} for r, e in record.events()])
        report = Accountant(delta=delta).report(ledger)
        total += float(report.rho or 0.0)
        rounds += record.released
    return PriorReport([name for name, _ in records], rounds, total)
