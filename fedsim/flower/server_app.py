"""fedsim's Flower ServerApp: runs a scenario file's strategy against real SuperNodes.

``pyproject.toml`` names it as the app's ``serverapp`` component, so ``flwr run . <superlink>``
starts it on a SuperLink. Its options are the app's run config (``[tool.flwr.app.config]``,
override with ``flwr run . <superlink> --run-config 'key=value ...'``):

=====================  ========================================================================
key                    meaning (default)
=====================  ========================================================================
``scenario``           scenario file; relative paths are looked up in the app, then in the
                       SuperLink's working directory (``scenarios/quickstart.toml``)
``rounds``             override the scenario's rounds (0: keep)
``seed``               override the scenario's seed (-1: keep)
``out-dir``            run directory; relative to the SuperLink's working directory
                       ("": the scenario's ``output-dir``). One that already holds a run is
                       refused (the run fails with a one-line error naming it), unless
                       ``overwrite``
``overwrite``          replace an earlier run in the run directory (false)
``job-id``             the training job: devices keep their participation ledgers under it,
                       and the server its state ("": this Flower run's id, so every
                       ``flwr run`` is a new job)
``state-dir``          where the server keeps its jobs' states, ``<state-dir>/<job-id>/``: the
                       job's noise key, its release record and a checkpoint after every round;
                       a restarted server of the same job (same ``job-id`` and ``state-dir``)
                       continues it, or refuses when its newest usable checkpoint is older
                       than the rounds it may have published ("": ``<out-dir>/server-state``)
``prior-jobs``         earlier jobs in the same ``state-dir`` (comma-separated job ids) whose
                       released rounds count toward this job's privacy: their rho is added to
                       this job's report and budget, e.g. a new job started because an old
                       one's state could not be restored ("": none)
``device-keys``        device key roster, a CSV ``partition-id,public-key`` (OpenSSH EC keys):
                       a node is admitted as a device only with the SuperNode key issued for
                       it (``fedsim.flower.identity``); "": device ids are self-claimed
``min-nodes``          nodes that must check in before round 1 (1)
``checkin-timeout``    seconds round 1 waits for check-ins (120)
``round-timeout``      seconds a round waits for replies; late replies are dropped (300)
``secure-aggregation`` true: every round runs under Flower's SecAgg+, the server learns only
                       the cohort's sum (the scenario's ``[flower] secure-aggregation = true``,
                       with its ``secagg-*`` parameters); false: as the scenario says (false)
=====================  ========================================================================
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsim.engine.rounds import RunResult
from fedsim.engine.rundir import RunDirExists, claim_run_dir, is_run_dir
from fedsim.errors import FedsimError, ScenarioError
from fedsim.flower.identity import load_device_keys
from fedsim.flower.server_state import ServerState
from fedsim.flower.strategy import FedsimStrategy
from fedsim.scenario import Scenario, load_scenario

logger = logging.getLogger("flwr.fedsim")

#: The directory the app's files live in (the installed FAB, or the repository).
APP_DIR = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ServerOptions:
    """The ServerApp's run config, validated (see the module docstring)."""

    scenario: str = "scenarios/quickstart.toml"
    rounds: int = 0
    seed: int = -1
    out_dir: str = ""
    overwrite: bool = False
    job_id: str = ""
    state_dir: str = ""
    prior_jobs: str = ""
    device_keys: str = ""
    min_nodes: int = 1
    checkin_timeout: float = 120.0
    round_timeout: float = 300.0
    secure_aggregation: bool = False

    @classmethod
    def from_run_config(cls, config: dict[str, Any]) -> ServerOptions:
        """Read the kebab-case run config; unknown keys are ignored, wrong types raise."""
        kwargs: dict[str, Any] = {}
        for name, default in cls.__dataclass_fields__.items():
            key = name.replace("_", "-")
            if key not in config:
                continue
            value = config[key]
            kind = type(default.default)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                raise ScenarioError(f"must be {kind.__name__}, got {value!r}", key=key, source="run config")
            kwargs[name] = value
        opts = cls(**kwargs)
        for key, ok in (
            ("rounds", opts.rounds >= 0),
            ("seed", opts.seed >= -1),
            ("min-nodes", opts.min_nodes >= 1),
            ("checkin-timeout", opts.checkin_timeout > 0),
            ("round-timeout", opts.round_timeout > 0),
        ):
            if not ok:
                raise ScenarioError(f"out of range: {getattr(opts, key.replace('-', '_'))!r}", key=key, source="run config")
        return opts

    @property
    def prior_job_ids(self) -> list[str]:
        """``prior-jobs`` as a list of job ids."""
        return [job.strip() for job in self.prior_jobs.split(",") if job.strip()]

    def state_root(self, run_dir: str | Path) -> Path:
        """The server state directory: ``state-dir``, else ``<run dir>/server-state``."""
        return Path(self.state_dir) if self.state_dir else Path(run_dir) / "server-state"

    def resolve_scenario(self) -> Path:
        """The scenario file: absolute, else in the app, else in the working directory."""
        path = Path(self.scenario)
        if path.is_absolute():
            return path
        in_app = APP_DIR / path
        return in_app if in_app.exists() else Path.cwd() / path

    def load(self) -> Scenario:
        """The scenario with this run config's overrides applied."""
        overrides: list[tuple[list[str], Any]] = []
        if self.rounds:
            overrides.append((["rounds"], self.rounds))
        if self.seed >= 0:
            overrides.append((["seed"], self.seed))
        if self.out_dir:
            overrides.append((["output-dir"], self.out_dir))
        if self.secure_aggregation:
            overrides.append((["flower", "secure-aggregation"], True))
        return load_scenario(self.resolve_scenario(), overrides)


def claim_out_dir(path: str | Path, *, overwrite: bool = False) -> Path:
    """Make sure the ServerApp may write its run directory ``path``; return it.

    The deployed counterpart of ``fedsim run``'s protection
    (:func:`fedsim.engine.rundir.claim_run_dir`): a missing or empty directory is fine; one that
    holds a run is refused with a :class:`~fedsim.engine.rundir.RunDirExists` naming it and the
    run-config choices (another ``out-dir``, ``overwrite=true``), or removed when ``overwrite``;
    any other non-empty directory is never removed.
    """
    try:
        return claim_run_dir(path, overwrite=overwrite)
    except RunDirExists:
        if overwrite:
            raise
    choose = "choose another with --run-config \"out-dir='DIR'\""
    if is_run_dir(path):
        what = "a finished run" if (Path(path) / "summary.json").exists() else "an unfinished run"
        raise RunDirExists(f"run config out-dir: {path} already holds {what}; {choose}, or replace it with --run-config overwrite=true")
    raise RunDirExists(f"run config out-dir: {path} is not empty and holds no fedsim run; {choose}")


def run_server(
    grid: Grid,
    scenario: Scenario,
    options: ServerOptions,
    *,
    job_id: str,
    run_dir: str | Path | None,
    progress: bool = False,
    state: ServerState | None = None,
) -> RunResult:
    """Run ``scenario`` through :class:`FedsimStrategy` on ``grid``, writing ``run_dir`` if given.

    With ``state``, the job's key and checkpoints live there and a job that has them continues
    (:class:`~fedsim.flower.server_state.ServerState`).
    """
    bridge = FedsimStrategy(
        scenario,
        run_dir=run_dir,
        job_id=job_id,
        min_nodes=options.min_nodes,
        checkin_timeout=options.checkin_timeout,
        progress=progress,
        state=state,
        device_keys=load_device_keys(options.device_keys, num_devices=scenario.data.num_devices) if options.device_keys else None,
        prior_jobs=options.prior_job_ids,
    )
    result = bridge.run(grid, round_timeout=options.round_timeout)
    s = result.summary
    logger.info(
        "fedsim: %s finished: %d/%d rounds (%s), accuracy %.4f, %s, run dir %s",
        scenario.name, s["rounds"], s["rounds_planned"], s["stopped_reason"], s["accuracy"],
        "no DP" if s["rho"] is None else f"rho {s['rho']:.6g}, epsilon {s['epsilon']:.4g} (delta {s['delta']:g})",
        result.run_dir,
    )
    return result


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls: read the run config, load the scenario, run it.

    fedsim's own refusals (:class:`~fedsim.errors.FedsimError`: a run directory that holds another
    run, a job whose published rounds its checkpoints no longer cover, bad run config) reach
    Flower's failure report as one line, ``<ErrorClass>: <message>``: the traceback of a refusal
    says nothing more (the ServerApp process ends with the run).
    """
    try:
        _main(grid, context)
    except FedsimError:
        sys.tracebacklimit = 0
        raise


def _main(grid: Grid, context: Context) -> None:
    options = ServerOptions.from_run_config(dict(context.run_config))
    scenario = options.load()
    job_id = options.job_id or f"run-{context.run_id}"
    state = ServerState(options.state_root(scenario.output_dir), job_id)
    if state.exists() and not options.overwrite:
        # a restarted server of this job: it continues the job's run directory
        run_dir: str | Path = scenario.output_dir
    else:
        replacing = is_run_dir(scenario.output_dir)
        run_dir = claim_out_dir(scenario.output_dir, overwrite=options.overwrite)  # never silently over an earlier run
        if replacing:
            logger.warning("fedsim: overwrite: removed the earlier run in %s", run_dir)
    run_server(grid, scenario, options, job_id=job_id, run_dir=run_dir, state=state)
