"""A Flower job's durable server state: its noise key and a checkpoint after every round.

A deployed ServerApp can be killed or restarted at any time. If a restarted server started over,
it would release the job's rounds a second time and report only its own rho (the privacy
ledger would restart at zero), and with a fresh key its noise would differ from the first
release; with the old key and different replies, the difference of two releases would be the
difference of two exact sums. A job's server therefore keeps its state on disk and a restart
*continues* it:

=======================  =====================================================================
file                     content
=======================  =====================================================================
``job.json``             the job id (the directory name is a file-system-safe form of it) and
                         the job's public run id (128 bits from :mod:`secrets`, drawn when the
                         job starts): it enters every noise and sampling word, so two jobs never
                         share noise, even under one fixed key file
``noise.key``            the job's secret noise key (:class:`~fedsim.privacy.noise.NoiseKey`,
                         mode 0600), drawn from :mod:`secrets` when the job starts
``releases.jsonl``       the job's release record (:mod:`fedsim.engine.releases`): the key's
                         and the data's fingerprints, then one line per round that may have
                         been published, each signed under a key derived from the noise key
``checkpoints/``         ``ckpt-<round>.pt`` after every round, in the engine's authenticated
                         format (:mod:`fedsim.engine.checkpoint`: an HMAC under a key derived
                         from the job's noise key): the round owner's state (parameters,
                         mechanism state, privacy ledger, participation ledger, data
                         fingerprint), the run log's position, the round's metrics row, the
                         bridge's counts
=======================  =====================================================================

The directory (``<state-dir>/<job-id>/``) is the server's secret: it holds the key and exact,
un-noised state (DP-FTRL's prefix sums), so it is created with mode 0700. What a "job" is: one
``job-id`` in one ``state-dir`` (``docs/flower.md``). A restarted ServerApp with the same two
resumes; a new job id draws a new key.

When the state is written. The checkpoint of round ``r`` is written after the round's noisy
aggregate is computed, then round ``r`` is appended to the release record (fsynced), and only
then does anything derived from it leave the server (the metrics row, the next round's model in
train messages). A server killed before the record holds round ``r`` has published nothing of it;
its successor continues from the checkpoint (publishing round ``r``'s computed result once) or,
without it, runs round ``r`` again under the same key (the first computation was never
released). The release record is the high-water mark: a restarted server whose newest usable
checkpoint is older than the rounds the record holds refuses, naming the rounds at risk (devices
decline a round they already gave to, so a replay would add the same noise to another sum: the
difference of the two releases would be the exact sum). The operator restores the checkpoint, or
starts a new job (a new ``job-id``, so a new key) whose run config names this one in
``prior-jobs``, so its report adds this job's rho. No round is released twice, and the privacy
ledger holds each round once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedsim.atomic import atomic_write_bytes, atomic_write_text
from fedsim.engine.checkpoint import (
    CheckpointError,
    CheckpointKey,
    checkpoint_path,
    encode,
    list_checkpoints,
    metrics_position,
    scan_checkpoints,
)
from fedsim.engine.keystore import KeyStore
from fedsim.engine.releases import RELEASES_FILE
from fedsim.engine.rundir import RunDir
from fedsim.flower.device import job_dir_name
from fedsim.privacy.noise import NoiseKey, new_run_id

__all__ = ["ServerState", "job_dir_name"]


class ServerState:
    """The state directory of one Flower job.

    Parameters
    ----------
    root:
        The server's state directory (the ServerApp's ``state-dir``).
    job_id:
        The job; its state lives in ``root / job_dir_name(job_id)``.
    keep:
        Checkpoints kept (the newest ones; an unreadable newest one falls back to the previous).
    """

    def __init__(self, root: str | Path, job_id: str, *, keep: int = 2) -> None:
        if not job_id:
            raise ValueError("a server state needs a job id")
        self.root = Path(root)
        self.job_id = job_id
        self.path = self.root / job_dir_name(job_id)
        self.key_path = self.path / "noise.key"
        #: the job's key file (the engine's one key store, as ``secret/noise.key`` of a run)
        self.keys = KeyStore(self.key_path)
        self.checkpoints = self.path / "checkpoints"
        #: the job's release record (:mod:`fedsim.engine.releases`)
        self.releases_path = self.path / RELEASES_FILE
        self.keep = keep

    def exists(self) -> bool:
        """Whether this job has started before (its key, release record or a checkpoint is on disk)."""
        return self.key_path.exists() or self.releases_path.exists() or bool(list_checkpoints(self.checkpoints))

    def _check_job(self) -> None:
        job_file = self.path / "job.json"
        if not job_file.exists():
            return
        recorded = json.loads(job_file.read_text(encoding="utf-8")).get("job_id")
        if recorded != self.job_id:
            raise CheckpointError(
                f"{self.path} holds the state of job {recorded!r}, not {self.job_id!r} "
                "(job ids that differ only in characters outside [A-Za-z0-9-_.] share a directory); "
                "choose another job-id or state-dir"
            )

    def _create(self, run_id: str | None = None) -> None:
        for directory in (self.root, self.path):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.chmod(0o700)
        record = {"job_id": self.job_id, "run_id": run_id or new_run_id()}
        atomic_write_text(self.path / "job.json", json.dumps(record) + "\n")

    def run_id(self) -> str:
        """The job's public run id: read back for a started job, else drawn and recorded now."""
        self._check_job()
        job_file = self.path / "job.json"
        if job_file.exists():
            recorded = json.loads(job_file.read_text(encoding="utf-8")).get("run_id")
            if recorded:
                return str(recorded)
        run_id = new_run_id()
        self._create(run_id)
        return run_id

    def key(self) -> tuple[NoiseKey, bool]:
        """The job's noise key and whether it was drawn just now (a new job).

        A new job's key comes from :meth:`NoiseKey.generate` and is saved (mode 0600) before
        it is used; a started job's key is read back. A checkpoint without its key refuses
        (:class:`~fedsim.engine.checkpoint.CheckpointError`): rounds run again under a fresh key
        would release a second noisy view of data already released.
        """
        self._check_job()
        started = bool(list_checkpoints(self.checkpoints)) or self.releases_path.exists()
        if not started and not self.keys.exists():
            self._create()  # a new job: its directory (0700) and job.json first
        return self.keys.open_or_create(
            started=started,
            where=f"server state of job {self.job_id!r}",
            missing=(
                f"the job's noise key is missing but {self.path} holds its checkpoints or release record; "
                "cannot continue the job (restore the key file, or start a new job-id)"
            ),
        )

    def latest(self, auth: CheckpointKey | None) -> tuple[tuple[dict[str, Any], Path] | None, list[tuple[Path, str]]]:
        """The newest usable checkpoint of the job (or ``None``), and why each newer one is unusable.

        ``auth`` is the job's checkpoint key: only checkpoints authenticated under it are usable.
        Returns ``(found, failures)`` with ``failures`` as ``(path, reason)``, newest first; what
        may be done without the newer ones is the release record's to say
        (:meth:`fedsim.flower.strategy.FedsimStrategy.resume`).
        """
        self._check_job()
        for stale in self.checkpoints.glob("ckpt-*.pt.tmp") if self.checkpoints.is_dir() else []:
            stale.unlink(missing_ok=True)  # interrupted while being written
        return scan_checkpoints(self.checkpoints, auth)

    def save(
        self,
        rounds_done: int,
        state: dict[str, Any],
        *,
        run_dir: RunDir | None,
        row: dict[str, Any],
        extra: dict[str, Any],
        auth: CheckpointKey | None = None,
    ) -> Path:
        """Write the checkpoint after ``rounds_done`` rounds, before the round's row is published.

        ``state`` is the round owner's ``state_dict()`` (its ``round`` set to ``rounds_done``);
        the run log's position *before* ``row`` is appended, ``row`` itself and ``extra`` (the
        bridge's own counts) are added, authenticated with ``auth`` (the job's checkpoint key).
        The newest :attr:`keep` checkpoints are kept.
        """
        self.checkpoints.mkdir(mode=0o700, parents=True, exist_ok=True)
        payload = {
            **state,
            "round": rounds_done,
            "metrics": metrics_position(run_dir),
            "pending_row": json.dumps(row),
            "flower": extra,
        }
        path = checkpoint_path(self.checkpoints, rounds_done)
        atomic_write_bytes(path, encode(payload, auth))
        for _, old in list_checkpoints(self.checkpoints)[self.keep :]:
            old.unlink(missing_ok=True)
        return path
