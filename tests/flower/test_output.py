"""Flower output: the bridge's one line per round and final summary, without Flower's own duplicates;
what the simulation backend shows of the Flower run's log; the ServerApp's run-directory protection.

(The real Flower runs are in tests/flower/test_simulation.py and tests/flower/test_deploy.py.)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info

from fedsim.engine.rundir import RunDirExists
from fedsim.errors import ScenarioError
from fedsim.flower.server_app import ServerOptions, claim_out_dir
from fedsim.flower.simulation import federation_config, run_config, shown
from fedsim.flower.strategy import _FlowerStrategyProgressFilter
from fedsim.scenario import scenario_from_dict


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_flowers_strategy_loop_lines_are_dropped_fedsims_and_warnings_kept() -> None:
    flwr_logger = logging.getLogger("flwr")
    collect, quiet = _Collect(), _FlowerStrategyProgressFilter()
    level = flwr_logger.level
    flwr_logger.addHandler(collect)
    flwr_logger.setLevel(logging.INFO)
    flwr_logger.addFilter(quiet)
    try:
        # Flower's own strategy module logging (what Strategy.start does every round)
        log_strategy_start_info(3, ArrayRecord(), ConfigRecord(), ConfigRecord())
        logging.getLogger("flwr.fedsim").info("fedsim: round 1/3, clients 2/2 eligible")
        flwr_logger.warning("a Flower warning")
    finally:
        flwr_logger.removeFilter(quiet)
        flwr_logger.removeHandler(collect)
        flwr_logger.setLevel(level)
    assert collect.messages == ["fedsim: round 1/3, clients 2/2 eligible", "a Flower warning"]


# the log of a `flwr run --stream` of the simulation backend, as Flower 1.42 writes it
STREAM = [
    "Using SuperLink: fedsim-simulation (127.0.0.1:40000)",
    "\x1b[92mINFO \x1b[0m:      Starting Flower Simulation",
    "\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.",
    "\x1b[92mINFO \x1b[0m:      fedsim: round 1/2, clients 20/100 eligible, accuracy 0.2423",
    "\x1b[93mWARNING \x1b[0m:   fedsim: round 2: rejected update(s) of device(s) [3]: non_finite",
    "\x1b[91mERROR \x1b[0m:     Simulation raised an exception",
    "Traceback (most recent call last):",
    "ValueError: something broke",
    "\x1b[92mINFO \x1b[0m:      ",
]


def _shown(lines: list[str], verbose: bool) -> list[str]:
    level, out = None, []
    for line in lines:
        show, level = shown(line, verbose=verbose, level=level)
        if show:
            out.append(line)
    return out


def test_the_run_log_shows_warnings_and_errors_less_the_federation_size_notice() -> None:
    assert _shown(STREAM, verbose=False) == [STREAM[4], STREAM[5], STREAM[6], STREAM[7]]
    assert _shown(STREAM, verbose=True) == STREAM


def test_federation_and_run_config_map_the_scenario_onto_the_simulation(tmp_path: Path) -> None:
    scenario = scenario_from_dict({"name": "x"})
    fed = federation_config(scenario, 7)
    assert fed["num-supernodes"] == 7 and fed["client-resources-num-cpus"] == 1 and fed["client-resources-num-gpus"] == 0.0
    assert fed["init-args-log-to-driver"] is False and fed["init-args-logging-level"] == "ERROR"
    run = run_config(tmp_path / "s.toml", tmp_path / "run", 7)
    options = ServerOptions.from_run_config(run)  # the ServerApp accepts exactly this run config
    assert (options.min_nodes, options.job_id, options.out_dir) == (7, "simulation", str(tmp_path / "run"))
    assert options.scenario == str(tmp_path / "s.toml") and not options.overwrite


def test_the_server_app_refuses_to_replace_a_run_unless_told(tmp_path: Path) -> None:
    assert claim_out_dir(tmp_path / "new") == tmp_path / "new"
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"accuracy": 0.5}))
    with pytest.raises(RunDirExists) as refused:
        claim_out_dir(run)
    message = str(refused.value)
    assert "\n" not in message and str(run) in message and "finished run" in message
    assert "out-dir='DIR'" in message and "overwrite=true" in message
    assert (run / "summary.json").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(RunDirExists, match="holds no fedsim run"):
        claim_out_dir(other, overwrite=True)
    assert (other / "notes.txt").exists()
    assert claim_out_dir(run, overwrite=True) == run and not run.exists()
    assert ServerOptions.from_run_config({"overwrite": True}).overwrite is True
    with pytest.raises(ScenarioError, match="overwrite"):
        ServerOptions.from_run_config({"overwrite": "yes"})
