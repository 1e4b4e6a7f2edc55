"""Where a round's client work runs: the :class:`CohortExecutor` contract and its engines.

An executor trains a :class:`~fedsim.engine.rounds.RoundPlan`'s cohort and folds every report
into the round's :class:`~fedsim.engine.aggregation.UpdateAccumulator` *in cohort order*, so the
server's running sum is the same wherever the clients ran. Implementations:

* :class:`InProcessExecutor` (``[engine] backend = "inprocess"``): the scenario's trainer in this
  process, ``chunk-size`` clients at a time;
* :class:`fedsim.engine.ray_backend.RayCohortRunner` (``backend = "ray"``): blocks of the
  cohort on Ray actors;
* :class:`fedsim.flower.executor.FlowerGridExecutor` (``backend = "flower"``): one Flower
  message per device over a ServerApp's grid (a SuperLink, or Flower's simulation engine).

:func:`fedsim.engine.simulation.make_executor` is the one place that maps ``engine.backend``
to an executor of the in-process engine; ``"flower"`` runs are driven by Flower's server
(:func:`fedsim.backends.open_run` chooses who drives a run).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import numpy as np

from fedsim.builders import cohort_tasks
from fedsim.engine.aggregation import UpdateAccumulator

if TYPE_CHECKING:  # annotations only
    from fedsim.engine.rounds import RoundOwner, RoundPlan

__all__ = ["CohortExecutor", "InProcessExecutor"]


class CohortExecutor(ABC):
    """Trains a round's cohort and reports into the round's accumulator."""

    @abstractmethod
    def train(self, plan: RoundPlan, acc: UpdateAccumulator) -> np.ndarray:
        """Train ``plan.cohort`` from ``plan.params`` with ``plan.config``; ``acc.add`` every chunk.

        Returns the devices that trained (and so remember the round in their own ledgers).
        """

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release workers at the end of a run (default: nothing to release)."""


class InProcessExecutor(CohortExecutor):
    """The run's own trainer in this process (``owner.trainer``, looked up at each round)."""

    def __init__(self, owner: RoundOwner) -> None:
        self.owner = owner

    def train(self, plan: RoundPlan, acc: UpdateAccumulator) -> np.ndarray:
        owner = self.owner
        tasks = cohort_tasks(owner.data, owner.scenario.seed, plan.round, plan.cohort)
        for chunk in owner.trainer.train_cohort(
            plan.params, tasks, plan.config, chunk_size=owner.scenario.engine.chunk_size
        ):
            acc.add(chunk)
        return plan.cohort

    def close(self) -> None:
        """Stop the trainer's workers (the loop path's processes)."""
        self.owner.trainer.close()
