"""A device's own participation ledger, kept on the SuperNode's disk.

Participation limits are enforced twice (see ``fedsim/population.py``): the server keeps a ledger
of accepted contributions, and every device keeps its own memory and declines a round the limit
forbids. On a real SuperNode each message runs in a fresh ClientApp process, so the device's
memory must live on disk: one small JSON file per (device, job) under the node's state directory,
written atomically (temporary file, fsync, rename) *before* the device trains, so that a crash
between training and replying can never let a device contribute more often than allowed. The
directories on the way are durable too: the state directory and the device's directory are
fsynced in their parents on every claim (:func:`durable_dirs`), so a power loss cannot take the
ledger away with a directory entry that never reached the disk. A SuperNode restarted with the
same ``state-dir`` therefore still honours the limit, and so does a device asked again by a
restarted server for the same job.

The rule is the simulator's :class:`~fedsim.population.ParticipationLedger` for one device: at most
``max_participations`` contributions, ``min_separation`` rounds strictly between two of them, so
never two in one round. Every reply counts, including a second train message for a round the
device already answered (a server that lost its state, or replays a round): the device cannot know
whether the server would add fresh noise to a repeated update, so it declines.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import numpy as np

from fedsim.atomic import atomic_write_text, fsync_dir
from fedsim.population import ParticipationLedger
from fedsim.strategy import ParticipationLimit


def default_state_dir() -> Path:
    """``$FEDSIM_STATE_DIR``, else ``$FLWR_HOME/fedsim``, else ``~/.flwr/fedsim``."""
    explicit = os.environ.get("FEDSIM_STATE_DIR")
    if explicit:
        return Path(explicit)
    home = os.environ.get("FLWR_HOME")
    return (Path(home) if home else Path.home() / ".flwr") / "fedsim"


def job_dir_name(job_id: str) -> str:
    """A file-system-safe name for ``job_id``: a device's ledger file, the server's job directory."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in job_id)
    return cleaned.strip(".") or "job"


def durable_dirs(path: Path, *, top: Path) -> None:
    """Create directory ``path`` (with missing parents) so that it survives a power loss.

    A new directory is only durable once its parent is fsynced. The parents of ``path``, of
    ``top`` and of every directory between them are fsynced on every call, whether the
    directory is created now or existed: one left by a process that crashed between ``mkdir``
    and the fsync exists but may still vanish, and a file fsynced into it would vanish with it.
    Directories created above ``top`` are fsynced in their parents too. ``top`` is ``path`` or
    one of its ancestors.
    """
    path, top = Path(path), Path(top)
    if path != top and top not in path.parents:
        raise ValueError(f"{top} is not {path} or one of its parents")
    chain = [path, *path.parents[: len(path.parts) - len(top.parts)]]  # path, ..., top
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    for parent in sorted({p.parent for p in (*chain, *missing)}, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(parent)


class DeviceLedger:
    """The contribution rounds of one device in one job, persisted under ``state_dir``.

    Parameters
    ----------
    state_dir:
        The node's state directory (``--node-config 'state-dir="..."'``).
    device_id:
        The device (the node's ``partition-id``).
    job_id:
        The training job; contributions of different jobs are counted separately.
    """

    def __init__(self, state_dir: str | Path, device_id: int, job_id: str) -> None:
        self.device_id = int(device_id)
        self.job_id = job_id
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / f"device-{self.device_id}" / f"{job_dir_name(job_id)}.json"

    def rounds(self) -> list[int]:
        """Rounds (0-based) this device contributed to in this job, ascending."""
        if not self.path.exists():
            return []
        data = json.loads(self.path.read_text(encoding="utf-8"))
        return sorted(int(r) for r in data["rounds"])

    @staticmethod
    def _allowed(rounds: list[int], round: int, limit: ParticipationLimit | None) -> bool:
        if round in rounds:  # never twice in one round, whatever the limit
            return False
        ledger = ParticipationLedger(1, limit)
        if rounds:
            ledger.count[0] = len(rounds)
            ledger.last[0] = max(rounds)
        return bool(ledger.allowed(round, np.zeros(1, dtype=np.int64))[0])

    def allowed(self, round: int, limit: ParticipationLimit | None) -> bool:
        """May this device contribute in ``round`` under ``limit``?"""
        return self._allowed(self.rounds(), round, limit)

    def claim(self, round: int, limit: ParticipationLimit | None) -> bool:
        """Record a contribution in ``round`` if the limit allows it; return whether it does.

        Atomic with respect to other processes of the same node (file lock), durable before it
        returns ``True``: the record (temporary file, fsync, rename, fsync) and the directories
        holding it (:func:`durable_dirs`: ``state_dir`` and ``device-N/`` in their parents).
        """
        durable_dirs(self.path.parent, top=self.state_dir)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a", encoding="utf-8") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                rounds = self.rounds()
                if not self._allowed(rounds, round, limit):
                    return False
                record = {"device": self.device_id, "job": self.job_id, "rounds": sorted([*rounds, round])}
                atomic_write_text(self.path, json.dumps(record) + "\n")
                return True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
