"""The key store: where a run keeps its secret noise key on disk, and the one way it is read back.

A keyed run (a DP or audited run; :attr:`fedsim.engine.rounds.RoundOwner.keyed`) draws every
noise and sampling word from its :class:`~fedsim.privacy.noise.NoiseKey`. If the key were lost,
rounds run again (a resume, a restarted Flower server) would add fresh noise and release a second
noisy view of data already released; if it leaked, the noise could be subtracted. So the key
lives in one file, mode 0600 in a 0700 directory, and every place that keeps one uses
:class:`KeyStore`:

* an in-process run: ``RUN_DIR/secret/noise.key`` (:data:`~fedsim.privacy.noise.KEY_FILE`),
  written when a fresh keyed run starts, read back by ``--resume``;
* a Flower job: ``<state-dir>/<job>/noise.key``
  (:class:`~fedsim.flower.server_state.ServerState`), drawn when the job starts, read back by a
  restarted ServerApp;
* an earlier run or job whose release record counts toward this one (``[privacy] prior-runs``,
  ``prior-jobs``): its key authenticates that record.

A missing or malformed key file is a :class:`~fedsim.engine.checkpoint.CheckpointError` naming
the file and what cannot be done without it.
"""

from __future__ import annotations

from pathlib import Path

from fedsim.engine.checkpoint import CheckpointError
from fedsim.privacy.noise import NoiseKey, NoiseKeyError

__all__ = ["KeyStore", "load_key"]


def load_key(path: Path, where: str) -> NoiseKey:
    """The noise key in ``path``; a missing or malformed file is a :class:`CheckpointError` naming ``where``."""
    try:
        return NoiseKey.load(path)
    except NoiseKeyError as exc:
        raise CheckpointError(f"{where}: {exc}") from None


class KeyStore:
    """One secret noise key file.

    Parameters
    ----------
    path:
        The key file (its directory is created with mode 0700, the file with 0600).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def exists(self) -> bool:
        """Whether the key file is on disk."""
        return self.path.exists()

    def save(self, key: NoiseKey) -> None:
        """Write ``key`` (0600; the directory 0700, also if it existed)."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.parent.chmod(0o700)
        key.save(self.path)

    def load(self, where: str) -> NoiseKey:
        """The stored key; a missing or malformed file is a :class:`CheckpointError` naming ``where``."""
        return load_key(self.path, where)

    def reload(self, *, where: str, missing: str) -> NoiseKey:
        """The key a run that has started needs to continue; without the file, a
        :class:`CheckpointError`: ``"<path>: <missing>"`` (a malformed one: as :meth:`load`)."""
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: {missing}")
        return self.load(where)

    def open_or_create(self, *, started: bool, where: str, missing: str) -> tuple[NoiseKey, bool]:
        """The stored key, or (nothing ``started`` yet) a fresh one from :mod:`secrets`, saved
        before it is used; with whether it was drawn now. A started run without its key refuses
        (:meth:`reload`'s error, ``missing``)."""
        if self.path.exists():
            return self.load(where), False
        if started:
            raise CheckpointError(f"{self.path}: {missing}")
        key = NoiseKey.generate()
        self.save(key)
        return key, True
