"""The engine: the round owner, the in-process round loop and its executors, server-side
validation and aggregation, checkpoints, run directories."""

from fedsim.engine.rounds import RoundOwner, RoundPlan, RunResult
from fedsim.engine.simulation import Simulation, run_scenario

__all__ = ["RoundOwner", "RoundPlan", "RunResult", "Simulation", "run_scenario"]
