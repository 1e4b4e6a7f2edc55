"""The engine: round loop, server-side validation and aggregation, run directories."""

from fedsim.engine.simulation import RunResult, Simulation, run_scenario

__all__ = ["RunResult", "Simulation", "run_scenario"]
