"""The run recorder: every file a run writes into its run directory, public and private.

The round owner (:class:`~fedsim.engine.rounds.RoundOwner`) decides what a round publishes; the
:class:`RunRecorder` is the one place that writes it, over a :class:`~fedsim.engine.rundir.RunDir`:

=================================  ===================================================================
file                               written by
=================================  ===================================================================
``config.toml``                    :meth:`RunRecorder.start` (the resolved scenario)
``metrics.jsonl``                  :meth:`RunRecorder.start` (emptied for a new run),
                                   :meth:`RunRecorder.append_row` (one line per committed round)
``private/diagnostics.jsonl``      :meth:`RunRecorder.write_diagnostics` (a DP run's exact per-round
                                   values), :meth:`RunRecorder.cut_diagnostics` (a resume)
``summary.json``,                  :meth:`RunRecorder.finish`, **once**, after every summary hook
``private/summary.json``           (:meth:`RunRecorder.add_summary_hook`) has added its part
``ledger.json``, ``model.pt``,     :meth:`RunRecorder.finish`
``metrics.png``
other ``private/*`` files          :meth:`RunRecorder.append_private` / :meth:`RunRecorder.write_json`
                                   (a backend's own records, e.g. Flower's withheld device events)
=================================  ===================================================================

A backend that publishes more than the engine (the Flower bridge: its roster counts, the
participation ledger) registers a summary hook instead of rewriting ``summary.json`` after the
engine wrote it. Without a run directory (tests, benchmarks) nothing is written, but the
diagnostics are still kept in memory (:attr:`RunRecorder.diagnostics`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedsim.atomic import atomic_write_text
from fedsim.engine.rundir import RunDir

__all__ = ["DIAGNOSTICS_FILE", "PRIVATE_DIR", "SummaryHook", "RunFiles", "RunRecorder"]

#: Where a DP run keeps exact values it does not publish (mode 0700).
PRIVATE_DIR = "private"
#: A DP run's exact per-round values, in :data:`PRIVATE_DIR`.
DIAGNOSTICS_FILE = "diagnostics.jsonl"

#: ``hook(summary, private, files)``: add to the public ``summary.json`` dict and the
#: ``private/summary.json`` dict (both written after every hook ran) and name further files in
#: ``files`` (:class:`RunFiles`), before anything is written.
SummaryHook = Callable[[dict[str, Any], dict[str, Any], "RunFiles"], None]


class RunFiles:
    """Further JSON files a summary hook asks :meth:`RunRecorder.finish` to write.

    ``public[name]`` goes to ``RUN_DIR/name``; ``private[name]`` to ``RUN_DIR/private/name``.
    """

    def __init__(self) -> None:
        self.public: dict[str, Any] = {}
        self.private: dict[str, Any] = {}


class RunRecorder:
    """Writes one run's files (see the module docstring).

    Parameters
    ----------
    run_dir:
        The run directory, or ``None``: nothing is written.
    """

    def __init__(self, run_dir: RunDir | None) -> None:
        self.run_dir = run_dir
        #: the exact per-round values a DP run withholds (``private/diagnostics.jsonl``), this run's
        self.diagnostics: list[dict[str, Any]] = []
        self._hooks: list[SummaryHook] = []

    # -- paths --------------------------------------------------------------------------------
    @property
    def path(self) -> Path | None:
        """The run directory's path, or ``None``."""
        return self.run_dir.path if self.run_dir is not None else None

    @property
    def diagnostics_path(self) -> Path | None:
        """``private/diagnostics.jsonl``: exact per-round values a DP run does not publish."""
        return self.run_dir.path / PRIVATE_DIR / DIAGNOSTICS_FILE if self.run_dir is not None else None

    def private_dir(self) -> Path | None:
        """``private/`` (created with mode 0700), or ``None`` without a run directory."""
        if self.run_dir is None:
            return None
        directory = self.run_dir.path / PRIVATE_DIR
        directory.mkdir(mode=0o700, exist_ok=True)
        return directory

    # -- the run's log --------------------------------------------------------------------------
    def start(self, config: dict[str, Any], *, fresh: bool) -> None:
        """Write ``config.toml``; for a run starting at round 0 (``fresh``) empty the run log and
        drop earlier diagnostics."""
        if self.run_dir is None:
            return
        self.run_dir.write_config(config)
        if fresh:
            self.run_dir.reset_metrics()
            path = self.diagnostics_path
            if path is not None and path.exists():
                path.unlink()

    def append_row(self, row: dict[str, Any]) -> None:
        """Append a committed round's public row to ``metrics.jsonl``."""
        if self.run_dir is not None:
            self.run_dir.append_metrics(row)

    def read_rows(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.jsonl`` (``[]`` without a run directory)."""
        return self.run_dir.read_metrics() if self.run_dir is not None else []

    def logged_rows(self) -> int:
        """How many rounds ``metrics.jsonl`` holds (its lines)."""
        if self.run_dir is None or not self.run_dir.metrics_path.exists():
            return 0
        return self.run_dir.metrics_path.read_bytes().count(b"\n")

    def write_diagnostics(self, row: dict[str, Any]) -> None:
        """Keep one round's exact values; append them to ``private/diagnostics.jsonl``."""
        self.diagnostics.append(row)
        if self.private_dir() is None:
            return
        self.append_private(DIAGNOSTICS_FILE, [row])

    def cut_diagnostics(self, rounds_done: int) -> None:
        """Drop the diagnostics of rounds that a resume replays (after ``rounds_done``)."""
        path = self.diagnostics_path
        if path is None or not path.exists():
            return
        keep = [line for line in path.read_text(encoding="utf-8").splitlines() if line and json.loads(line)["round"] <= rounds_done]
        atomic_write_text(path, "".join(line + "\n" for line in keep))
        self.diagnostics = [json.loads(line) for line in keep]

    def append_private(self, name: str, records: list[dict[str, Any]]) -> None:
        """Append ``records`` (one JSON line each) to ``private/name``."""
        directory = self.private_dir()
        if directory is None or not records:
            return
        with open(directory / name, "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in records))

    def write_json(self, name: str, data: Any) -> None:
        """Write ``name`` (relative to the run directory; ``private/...`` creates ``private/`` 0700)."""
        if self.run_dir is None:
            return
        if name.startswith(PRIVATE_DIR + "/"):
            self.private_dir()
        self.run_dir.write_json(name, data)

    # -- the end of the run -----------------------------------------------------------------------
    def add_summary_hook(self, hook: SummaryHook) -> None:
        """Have ``hook`` add its part to the summaries before :meth:`finish` writes them."""
        self._hooks.append(hook)

    def complete_summary(self, summary: dict[str, Any], private: dict[str, Any] | None) -> RunFiles:
        """Run the summary hooks over ``summary`` and ``private`` (``None``: a run without DP,
        whose hooks get a scratch dict); the further files they asked for."""
        files = RunFiles()
        scratch = private if private is not None else {}
        for hook in self._hooks:
            hook(summary, scratch, files)
        return files

    def finish(
        self,
        summary: dict[str, Any],
        *,
        private: dict[str, Any] | None,
        files: RunFiles,
        ledger: list[dict[str, Any]] | None,
        model: Callable[[Path], None],
        plot_title: str,
    ) -> None:
        """Write the end of the run: ``model.pt`` (``model(path)`` saves it), ``ledger.json``,
        ``private/summary.json`` (a DP run's ``private``), the hooks' files, ``summary.json`` (once)
        and ``metrics.png``."""
        if self.run_dir is None:
            return
        model(self.run_dir.path / "model.pt")
        if ledger is not None:
            self.run_dir.write_json("ledger.json", ledger)
        if private is not None:
            self.write_json(f"{PRIVATE_DIR}/summary.json", private)
        for name, data in files.private.items():
            self.write_json(f"{PRIVATE_DIR}/{name}", data)
        for name, data in files.public.items():
            self.write_json(name, data)
        self.run_dir.write_json("summary.json", summary)
        self.run_dir.plot(self.run_dir.read_metrics(), plot_title, summary.get("audit"))
