"""The engine: the round owner, the in-process round loop and its executors, server-side
validation and aggregation, checkpoints, run directories.

The names below are imported on first use, so that ``fedsim.engine.rundir`` (which the command
line needs before a run starts) does not import torch with the package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedsim.engine.rounds import RoundOwner, RoundPlan, RunResult
    from fedsim.engine.simulation import Simulation, run_scenario

__all__ = ["RoundOwner", "RoundPlan", "RunResult", "Simulation", "run_scenario"]

_HOME = {
    "RoundOwner": "fedsim.engine.rounds",
    "RoundPlan": "fedsim.engine.rounds",
    "RunResult": "fedsim.engine.rounds",
    "Simulation": "fedsim.engine.simulation",
    "run_scenario": "fedsim.engine.simulation",
}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'fedsim.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
