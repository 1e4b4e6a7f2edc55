"""``fedsim run SCENARIO --backend flower``: the scenario through Flower's simulation engine.

The scenario runs as a Flower app inside this process: a ``ServerApp`` whose strategy is the
bridge (:class:`~fedsim.flower.strategy.FedsimStrategy`, the same one a deployed server uses) and
fedsim's ``ClientApp`` (``fedsim/flower/client_app.py``) on one virtual SuperNode per device, executed
by Flower's Ray backend (``flwr.simulation.run_simulation``). Flower gives every virtual node its
``partition-id``, which the ClientApp takes as its device id, so results match the in-process
engine for the same scenario and seed; this path is the side-by-side baseline for the in-process
engine's speed, and the way in for users who already run Flower simulations.

Devices keep their participation ledgers in a temporary directory that lives as long as the run.
Flower's telemetry and update checks are switched off (``FLWR_TELEMETRY_ENABLED=0``,
``FLWR_DISABLE_UPDATE_CHECK=1``) unless the environment already sets them.
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from fedsim.engine.rounds import RunResult
from fedsim.scenario import Scenario

#: The fedsim ClientApp, as ``module:attribute`` (a client plug-in, imported when needed).
CLIENT_APP = "fedsim.flower.client_app:app"


def backend_config(scenario: Scenario) -> dict[str, Any]:
    """Ray settings: one CPU per virtual client, at most the machine's CPUs, no dashboard."""
    cpus = os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        # log_to_driver off: the actors' own log lines ("Manually terminating ClientAppActor" at the
        # end of every run) are not for users; ClientApp failures come back as message errors
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False},
    }


class FlowerSimulation:
    """Runs a :class:`Scenario` on Flower's simulation engine (``fedsim run --backend flower``).

    Parameters
    ----------
    scenario:
        The validated scenario; one virtual SuperNode per device.
    run_dir:
        Run directory to write (same layout as the in-process engine), or ``None``.
    progress:
        Show a progress bar.
    verbose:
        Keep Flower's INFO logs (otherwise only its warnings and errors are shown).
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
        os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
        # Ray's FutureWarning about GPU environment variables (no GPUs are used here): opt in now
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        from flwr.app import Context
        from flwr.serverapp import Grid, ServerApp
        from flwr.simulation import run_simulation

        from fedsim.flower.server_app import ServerOptions, run_server

        scenario, run_dir, progress = self.scenario, self.run_dir, self.progress
        module, _, attr = CLIENT_APP.partition(":")
        client_app = getattr(importlib.import_module(module), attr)
        out: dict[str, RunResult] = {}
        server_app = ServerApp()
        num_devices = scenario.data.num_devices
        if num_devices is None:  # a naturally partitioned dataset: one SuperNode per user
            from fedsim.workloads import build_data

            num_devices = build_data(scenario).num_devices
        options = ServerOptions(min_nodes=num_devices, checkin_timeout=600.0, round_timeout=3600.0)

        @server_app.main()
        def _main(grid: Grid, context: Context) -> None:
            out["result"] = run_server(grid, scenario, options, job_id="simulation", run_dir=run_dir, progress=progress)

        flwr_logger = logging.getLogger("flwr")
        level = flwr_logger.level
        quiet = _DropRunSimulationDeprecation()
        if not self.verbose:
            flwr_logger.setLevel(logging.WARNING)
            flwr_logger.addFilter(quiet)
        previous_state = os.environ.get("FEDSIM_STATE_DIR")
        with tempfile.TemporaryDirectory(prefix="fedsim-devices-") as state_dir:
            os.environ["FEDSIM_STATE_DIR"] = state_dir
            try:
                run_simulation(
                    server_app=server_app,
                    client_app=client_app,
                    num_supernodes=num_devices,
                    backend_config=backend_config(scenario),  # type: ignore[arg-type]
                    verbose_logging=False,
                )
            finally:
                flwr_logger.setLevel(level)
                flwr_logger.removeFilter(quiet)
                if previous_state is None:
                    os.environ.pop("FEDSIM_STATE_DIR", None)
                else:
                    os.environ["FEDSIM_STATE_DIR"] = previous_state
        if "result" not in out:
            raise RuntimeError("the Flower simulation ended without a result (see the log above)")
        return out["result"]


class _DropRunSimulationDeprecation(logging.Filter):
    """Drops Flower 1.42's "run_simulation is deprecated" warning from this backend's output.

    Flower's replacement, ``flwr run`` with a local simulation federation, starts a separate
    SuperLink process and runs a packaged app; this backend runs the scenario in this process
    (the strategy, run directory and progress bar are fedsim's own), which is what
    ``run_simulation`` offers. The warning is about that choice, not about anything a user of
    ``fedsim run --backend flower`` can change, so it is not shown (``verbose`` keeps it).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation` function is deprecated" not in record.getMessage()

