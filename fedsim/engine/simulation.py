"""The in-process engine: the round loop over a :class:`~fedsim.engine.rounds.RoundOwner`.

One round (see :mod:`fedsim.engine.rounds` and docs/architecture.md): the owner begins it
(privacy event and budget guard, check-ins, selection, client config), the run's
:class:`~fedsim.engine.executors.CohortExecutor` trains the cohort and folds every report into
the server's validation and streaming sum, and the owner ends it (ledgers, aggregation with the
strategy's noise, accounting, evaluation, metrics row) and commits it (run log, checkpoint).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from fedsim.builders import (  # noqa: F401 (re-exported: the engine's builders, one import path)
    build_availability,
    build_data,
    build_scenario_model,
    build_strategy,
    build_trainer,
    evaluate,
)
from fedsim.engine.checkpoint import CheckpointError, latest_for_resume
from fedsim.engine.executors import CohortExecutor, InProcessExecutor
from fedsim.engine.ray_backend import RayCohortRunner
from fedsim.engine.rounds import (
    RoundOwner,
    RunResult,
    build_canaries,  # noqa: F401 (re-exported)
    progress_postfix,  # noqa: F401 (re-exported: the progress bar's figures, used by the Flower bridge too)
)
from fedsim.privacy.noise import NoiseKey
from fedsim.scenario import Scenario

__all__ = ["RunResult", "Simulation", "make_executor", "progress_postfix", "run_scenario"]


def make_executor(owner: RoundOwner) -> CohortExecutor:
    """The executor ``[engine] backend`` names for the in-process engine (the one switch)."""
    backend = owner.scenario.engine.backend
    if backend == "ray":
        return RayCohortRunner(owner.scenario)
    if backend == "inprocess":
        return InProcessExecutor(owner)
    raise ValueError(f"engine.backend = {backend!r} is driven by its own server, not by fedsim's engine")


class Simulation(RoundOwner):
    """Runs a :class:`Scenario` with fedsim's engine (clients in this process or on Ray).

    Parameters
    ----------
    scenario, run_dir, noise_key:
        As for :class:`~fedsim.engine.rounds.RoundOwner`.
    progress:
        Show a progress bar with per-round metrics.
    executor:
        Where client work runs; default: what ``[engine] backend`` names.
    """

    def __init__(
        self,
        scenario: Scenario,
        *,
        run_dir: str | Path | None = None,
        progress: bool = True,
        executor: CohortExecutor | None = None,
        noise_key: NoiseKey | None = None,
    ) -> None:
        super().__init__(scenario, run_dir=run_dir, noise_key=noise_key)
        self.progress = progress
        self.executor = executor if executor is not None else make_executor(self)

    @property
    def ray(self) -> RayCohortRunner | None:
        """The Ray executor when ``backend = "ray"``, else ``None``."""
        return self.executor if isinstance(self.executor, RayCohortRunner) else None

    def resume(self) -> int:
        """Continue from the newest usable checkpoint in the run directory.

        Returns the number of completed rounds restored (see :mod:`fedsim.engine.checkpoint`);
        0 when there is none (the run starts over, with a ``CheckpointWarning``). A keyed run
        first reads back its key and its release record (:mod:`fedsim.engine.releases`): another
        key, other data, or a record behind the public run log refuse; rounds re-executed up to
        the record's mark must reproduce what they released before anything of them is
        published again (:meth:`~fedsim.engine.rounds.RoundOwner.commit`).
        """
        if self.run_dir is None:
            raise CheckpointError("resuming needs a run directory")
        self.reload_key()
        released = self.resume_releases()
        self.resumed = True
        start_over = "starting over from round 1"
        if released:
            start_over += (
                f" under the run's key: rounds 1-{released} were released, and each must reproduce "
                f"what it released ({self.releases_path}) before it is published again"
            )
        found = latest_for_resume(self.run_dir, self.checkpoint_auth, start_over=start_over)
        if found is None:
            self.next_round = 0
            self.recorder.cut_diagnostics(0)
            return 0
        state, path = found
        return self.restore(state, path)

    def run_round(self, round: int) -> dict[str, Any] | None:
        """Execute one round; return its metrics row (not yet logged), or ``None`` if the budget stops the run."""
        plan = self.begin(round)
        if plan is None:
            return None
        acc = self.accumulator(plan)
        contributed = self.executor.train(plan, acc)
        row, _ = self.end(plan, acc, contributed=contributed)
        return row

    def run(self) -> RunResult:
        """Run all remaining rounds, writing the run directory as it goes."""
        start = time.perf_counter()
        path = self.trainer.describe()
        if self.progress and path is not None and self.ray is None:
            print(f"{self.scenario.name}: trainer path {path['path']}: {path['reason']}", file=sys.stderr, flush=True)
        self.start(progress=self.progress)
        try:
            for r in range(self.next_round, self.scenario.rounds):
                row = self.run_round(r)
                if row is None:
                    break
                self.commit(row)
        finally:
            self.close_progress()
            self.executor.close()
        return self.finish(time.perf_counter() - start)


def run_scenario(
    scenario: Scenario, *, run_dir: str | Path | None = None, progress: bool = False, noise_key: NoiseKey | None = None
) -> RunResult:
    """Convenience: build a :class:`Simulation` and run it."""
    return Simulation(scenario, run_dir=run_dir, progress=progress, noise_key=noise_key).run()
