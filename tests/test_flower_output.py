"""Flower output: the bridge's one line per round and final summary, without Flower's own duplicates.

(The real Flower runs are in tests/test_flower_simulation.py and tests/test_flower_deploy.py.)
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info

from fedsim.flower.simulation import _DropRunSimulationDeprecation, backend_config
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


def test_run_simulation_deprecation_is_filtered_other_warnings_not() -> None:
    drop = _DropRunSimulationDeprecation()
    deprecated = logging.LogRecord(
        "flwr", logging.WARNING, "x.py", 1,
        "DEPRECATED FEATURE: The `run_simulation` function is deprecated and will be removed", None, None,
    )
    other = logging.LogRecord("flwr", logging.WARNING, "x.py", 1, "node 3 failed", None, None)
    assert not drop.filter(deprecated) and drop.filter(other)


def test_ray_actors_do_not_forward_their_logs() -> None:
    config = backend_config(scenario_from_dict({"name": "x"}))
    assert config["init_args"]["log_to_driver"] is False and config["init_args"]["include_dashboard"] is False
