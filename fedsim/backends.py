"""Who drives a run: ``[engine] backend`` chosen in one place.

``"inprocess"`` and ``"ray"`` runs are driven by fedsim's engine
(:class:`~fedsim.engine.simulation.Simulation`; the backend picks its
:class:`~fedsim.engine.executors.CohortExecutor` in
:func:`~fedsim.engine.simulation.make_executor`); ``"flower"`` runs are driven by a Flower
ServerApp on Flower's simulation engine (:class:`~fedsim.flower.simulation.FlowerSimulation`),
whose rounds go through the same :class:`~fedsim.engine.rounds.RoundOwner`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from fedsim.engine.rounds import RunResult
from fedsim.scenario import Scenario

__all__ = ["Run", "open_run"]


class Run(Protocol):
    """Anything :func:`open_run` returns: ``run()`` gives the :class:`RunResult`."""

    def run(self) -> RunResult: ...


def open_run(scenario: Scenario, *, run_dir: str | Path | None, progress: bool) -> Run:
    """The run of ``scenario`` on the backend its ``[engine] backend`` names."""
    if scenario.engine.backend == "flower":
        from fedsim.flower.simulation import FlowerSimulation

        return FlowerSimulation(scenario, run_dir=run_dir, progress=progress)
    from fedsim.engine.simulation import Simulation

    return Simulation(scenario, run_dir=run_dir, progress=progress)
