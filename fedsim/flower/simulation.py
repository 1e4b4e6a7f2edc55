"""``fedsim run SCENARIO --backend flower``: the scenario through Flower's simulation runtime.

The scenario runs as the repository's Flower app (``[tool.flwr.app]`` in ``pyproject.toml``) the
way Flower runs simulations: ``flwr run APP CONNECTION`` against a SuperLink started with
``--simulation``. The SuperLink hands the run to Flower's simulation process
(``flwr-simulation``), which installs the app and runs fedsim's ``ServerApp``
(:mod:`fedsim.flower.server_app`, the bridge strategy
:class:`~fedsim.flower.strategy.FedsimStrategy` that a deployed server uses) against one virtual
SuperNode per device, each running fedsim's ``ClientApp`` in Flower's Ray backend. Flower gives
every virtual node its ``partition-id``, which the ClientApp takes as its device id, so results
match the in-process engine for the same scenario and seed.

What this module does around it, all offline and private to the run:

* a temporary directory holds ``FLWR_HOME`` (Flower's connection config, the installed app),
  the devices' participation ledgers (``FEDSIM_STATE_DIR``), the resolved scenario and the logs;
* a ``flower-superlink --simulation`` on a free port of 127.0.0.1, stopped when the run ends;
* the scenario is the resolved one (every ``--set`` applied, plug-in and key-file paths
  absolute), handed to the ServerApp by the run config together with the run directory;
* the federation config maps the scenario onto the simulation (:func:`federation_config`);
* the progress bar follows ``metrics.jsonl`` as the ServerApp writes it (one update per round,
  with that round's figures), and the result is read back from the run directory.

Flower's telemetry, update checks and runtime dependency installation are off. Of the run's log
(``flwr run --stream``) only warnings and errors are shown, less the notice about Flower's default
federation size (the federation size here is always the number of devices); ``verbose`` shows
all of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedsim.engine.rounds import PRIVATE_DIR, RunResult, progress_postfix
from fedsim.engine.rundir import claim_run_dir
from fedsim.errors import FedsimError
from fedsim.scenario import Scenario

#: The Flower app: the repository (or installed app) holding ``pyproject.toml``.
APP_DIR = Path(__file__).resolve().parents[2]

#: Name of the SuperLink connection written to the run's private ``FLWR_HOME``.
CONNECTION = "fedsim-simulation"

#: Log lines of the simulation process that say nothing a user of this backend can act on.
HIDDEN_NOTICES = (
    # the federation size is always set here (one SuperNode per device), never Flower's default
    "default simulated SuperNodes changed",
)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_BOX = re.compile("[\u2500-\u257f]")  # the frame the Flower CLI draws around its errors
_LEVEL = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:")


class FlowerRunError(FedsimError):
    """The Flower simulation did not produce a run (the log lines above the message say why)."""

    exit_code = 1


def federation_config(scenario: Scenario, num_devices: int) -> dict[str, Any]:
    """The simulation's federation config (``flwr run --federation-config``).

    One virtual SuperNode per device (``num-supernodes``); one CPU and no GPU per ClientApp
    (``client-resources-num-cpus`` / ``-num-gpus``), so Ray runs as many ClientApps at once as
    the machine has CPUs (``init-args-num-cpus``); Ray logs only errors and its workers' own
    output is not forwarded (``init-args-logging-level``, ``init-args-log-to-driver``; Flower's
    Ray backend already leaves the dashboard off).
    """
    return {
        "num-supernodes": num_devices,
        "client-resources-num-cpus": 1,
        "client-resources-num-gpus": 0.0,
        "init-args-num-cpus": os.cpu_count() or 1,
        "init-args-logging-level": "ERROR",
        "init-args-log-to-driver": False,
    }


def run_config(scenario_file: Path, run_dir: Path, num_devices: int) -> dict[str, Any]:
    """The ServerApp's run config (see :mod:`fedsim.flower.server_app`) for one simulation.

    Every device is a virtual SuperNode that is always there: round 1 waits for all of them, and
    the timeouts only bound a broken run. Devices keep their ledgers under the job ``simulation``
    in the run's own state directory.
    """
    return {
        "scenario": str(scenario_file),
        "out-dir": str(run_dir),
        "job-id": "simulation",
        "min-nodes": num_devices,
        "checkin-timeout": 600.0,
        "round-timeout": 3600.0,
    }


def shown(line: str, *, verbose: bool, level: str | None) -> tuple[bool, str | None]:
    """Whether a line of the run's log is shown, and the log level that following lines inherit.

    A line that starts with a level (``WARNING :  ...``) sets it; other lines (a traceback, the
    CLI's own messages) belong to the last record. Warnings and errors are shown, except
    :data:`HIDDEN_NOTICES`; everything is shown when ``verbose``.
    """
    match = _LEVEL.match(_ANSI.sub("", line))
    if match:
        level = match.group(1)
        if any(notice in line for notice in HIDDEN_NOTICES):
            level = "HIDDEN"
    return verbose or level in ("WARNING", "ERROR", "CRITICAL"), level


def _tool(name: str) -> str:
    """A Flower executable from this interpreter's environment (else from ``PATH``)."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FlowerRunError(f"--backend flower: Flower's `{name}` command was not found (install fedsim with `make install`)")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # in the child, before exec (Linux): SIGKILL when fedsim dies
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _Process:
    """A child process whose output goes to a file; stopped (SIGTERM, then SIGKILL) by :meth:`stop`."""

    def __init__(self, args: list[str], *, env: dict[str, str], cwd: Path, log: Path) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )

    def tail(self, lines: int = 8) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""
        plain = (" ".join(_BOX.sub(" ", _ANSI.sub("", line)).split()) for line in text.splitlines())
        return " | ".join([line for line in plain if line][-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


def _wait_healthy(link: _Process, port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1.0) as reply:
            if reply.status == 200:
                return
        if link.proc.poll() is not None:
            raise FlowerRunError(f"--backend flower: the simulation SuperLink exited with code {link.proc.returncode}: {link.tail()}")
        if time.monotonic() > deadline:
            raise FlowerRunError(f"--backend flower: the simulation SuperLink did not start within {timeout:g} s: {link.tail()}")
        time.sleep(0.3)


class _Follower:
    """Reads what a file gained since the last call, in whole lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        if len(data) == 0 and self.path.stat().st_size < self.offset:  # recreated (reset_metrics)
            self.offset, self.partial = 0, b""
            return self.lines()
        self.offset += len(data)
        data = self.partial + data
        *whole, self.partial = data.split(b"\n")
        return [line.decode("utf-8", errors="replace") for line in whole]


class FlowerSimulation:
    """Runs a :class:`Scenario` on Flower's simulation runtime (``fedsim run --backend flower``).

    Parameters
    ----------
    scenario:
        The validated scenario; one virtual SuperNode per device.
    run_dir:
        Run directory to write (same layout as the in-process engine), or ``None`` (the run
        directory is then temporary and :attr:`RunResult.run_dir` is ``None``).
    progress:
        Show a progress bar.
    verbose:
        Show the whole log of the Flower run (otherwise only its warnings and errors).
    """

    def __init__(
        self, scenario: Scenario, *, run_dir: str | Path | None = None, progress: bool = True, verbose: bool = False
    ) -> None:
        self.scenario = scenario
        self.run_dir = run_dir
        self.progress = progress
        self.verbose = verbose

    def run(self) -> RunResult:
        """Run every round; return the run's result (as :meth:`Simulation.run` does)."""
        import tomli_w

        scenario = self.scenario
        if not (APP_DIR / "pyproject.toml").is_file():
            raise FlowerRunError(f"--backend flower: no Flower app (pyproject.toml) in {APP_DIR}; install fedsim from its source tree")
        if self.run_dir is not None:
            claim_run_dir(self.run_dir)  # the ServerApp refuses to replace a run as well
        num_devices = scenario.data.num_devices
        if num_devices is None:  # a naturally partitioned dataset: one SuperNode per user
            from fedsim.workloads import build_data

            num_devices = build_data(scenario).num_devices
        with tempfile.TemporaryDirectory(prefix="fedsim-flower-") as tmp:
            work = Path(tmp)
            home = work / "flwr-home"
            home.mkdir()
            run_dir = Path(self.run_dir).resolve() if self.run_dir is not None else work / "run"
            resolved = dict(scenario.to_dict(), **{"output-dir": str(run_dir)})
            scenario_file = work / "scenario.toml"
            scenario_file.write_text(tomli_w.dumps(resolved), encoding="utf-8")
            run_file = work / "run-config.toml"
            run_file.write_text(tomli_w.dumps(run_config(scenario_file, run_dir, num_devices)), encoding="utf-8")
            federation_file = work / "federation-config.toml"
            federation_file.write_text(tomli_w.dumps(federation_config(scenario, num_devices)), encoding="utf-8")
            port = _free_port()
            connection = {"superlink": {"default": CONNECTION, CONNECTION: {"address": f"127.0.0.1:{port}", "insecure": True}}}
            (home / "config.toml").write_text(tomli_w.dumps(connection), encoding="utf-8")
            env = dict(os.environ)
            env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
            env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
            # Ray's FutureWarning about GPU environment variables (no GPUs are used here): opt in now
            env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
            env.update(
                FLWR_HOME=str(home),
                FEDSIM_STATE_DIR=str(work / "devices"),
                FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",  # offline: the app's deps are here
                PYTHONUNBUFFERED="1",
                PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            )
            link = _Process(
                [_tool("flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port),
                 "--disable-runtime-dependency-installation"],
                env=env, cwd=work, log=work / "superlink.log",
            )
            try:
                _wait_healthy(link, port)
                flwr = _Process(
                    [_tool("flwr"), "run", str(APP_DIR), CONNECTION, "--stream",
                     "--run-config", str(run_file), "--federation-config", str(federation_file)],
                    env=env, cwd=work, log=work / "flwr-run.log",
                )
                try:
                    errors = self._follow(flwr, run_dir)
                finally:
                    flwr.stop()
            finally:
                link.stop()
            if not (run_dir / "summary.json").is_file():
                why = errors[-1] if errors else flwr.tail()
                raise FlowerRunError(f"--backend flower: the Flower simulation ended without a result (exit {flwr.proc.returncode}): {why}")
            return _read_result(run_dir, shown_as=None if self.run_dir is None else Path(self.run_dir))

    def _follow(self, flwr: _Process, run_dir: Path) -> list[str]:
        """Until ``flwr run`` ends: show its log's shown lines and advance the bar; return the errors."""
        log, metrics = _Follower(flwr.log), _Follower(run_dir / "metrics.jsonl")
        level: str | None = None
        errors: list[str] = []
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.scenario.rounds, desc=f"{self.scenario.name} (flower)", unit="round", dynamic_ncols=True)
        write: Callable[[str], None] = _stderr_line if bar is None else lambda line: bar.write(line, file=sys.stderr)
        try:
            while True:
                done = flwr.proc.poll() is not None
                for line in log.lines():
                    show, level = shown(line, verbose=self.verbose, level=level)
                    if show:
                        write(line)
                    text = _LEVEL.sub("", _ANSI.sub("", line)).strip()
                    if level in ("ERROR", "CRITICAL") and text:  # a traceback's last line says what failed
                        errors.append(text)
                for line in metrics.lines():
                    if line.strip() and bar is not None:
                        row = json.loads(line)
                        bar.set_postfix(progress_postfix(row), refresh=False)  # this round's own figures
                        bar.update(1)
                if done:
                    return errors
                time.sleep(0.3)
        finally:
            if bar is not None:
                bar.close()


def _stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _read_result(run_dir: Path, *, shown_as: Path | None) -> RunResult:
    """The finished run in ``run_dir`` as a :class:`RunResult` whose ``run_dir`` is ``shown_as``."""
    import torch

    from fedsim.privacy.events import PrivacyLedger

    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    params = torch.load(run_dir / "model.pt")["flat"]
    ledger_file = run_dir / "ledger.json"
    ledger = PrivacyLedger.from_json(json.loads(ledger_file.read_text(encoding="utf-8"))) if ledger_file.is_file() else None
    private = run_dir / PRIVATE_DIR / "summary.json"
    rejected = summary.get("rejected")
    if rejected is None and private.is_file():
        rejected = json.loads(private.read_text(encoding="utf-8")).get("rejected")
    return RunResult(
        shown_as,
        params,
        _read_jsonl(run_dir / "metrics.jsonl"),
        summary,
        ledger,
        dict(rejected or {}),
        _read_jsonl(run_dir / PRIVATE_DIR / "diagnostics.jsonl"),
    )
