"""Ray backend: the in-process engine with cohort training sharded across Ray workers.

``[engine] backend = "ray"`` keeps the whole round loop (check-ins, selection, validation,
streaming aggregation, strategy, accounting) in the driver process and hands the cohort out in
blocks of ``chunk-size`` devices to Ray actors, one per worker CPU. Each actor builds the
scenario's data, model and trainer once and trains its blocks exactly as the in-process engine
would (same per-device data, same client seeds, same batched groups); the driver folds the
returned chunks into the :class:`~fedsim.engine.aggregation.UpdateAccumulator` *in cohort order*,
so a run gives the same results as ``backend = "inprocess"`` for the same scenario and seed
(bit for bit on one machine; across machines up to float differences between CPUs).

Only device ids, the global parameters (one object-store copy per round) and the resulting
deltas travel; device data is generated (synthetic) or loaded (digits) inside each actor. At most
two blocks per actor are in flight, so driver and object-store memory stay flat in cohort size.

Pointing it at a cluster
------------------------
Start Ray on the machines (``ray start --head`` on one, ``ray start --address=HEAD:6379`` on the
others), install fedsim in the same environment on every node, and set::

    [engine]
    backend = "ray"
    ray-address = "auto"          # or "ray://HEAD:10001" (Ray Client) or "HEAD:6379"
    ray-workers = 0               # 0: one actor per CPU the cluster reports

With ``ray-address = ""`` (the default) the backend uses the Ray runtime this process already
initialised (``ray.init(...)`` before the run), else starts a local one with ``ray-workers``
CPUs (all of this machine's when 0) and shuts it down when the run ends. Scenario plug-ins named
by file path must exist at the same path on every node. Each actor reserves one Ray CPU and runs
torch with one thread, so actors never oversubscribe a node (``engine.threads`` applies to the
driver only).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedsim.builders import build_data, build_scenario_model, build_trainer, cohort_tasks
from fedsim.engine.aggregation import UpdateAccumulator
from fedsim.engine.allocator import keep_freed_memory
from fedsim.engine.executors import CohortExecutor
from fedsim.errors import FedsimError
from fedsim.scenario import Scenario
from fedsim.types import CohortChunk, TrainConfig

if TYPE_CHECKING:  # annotations only
    from fedsim.engine.rounds import RoundPlan

#: Blocks queued per actor: one training, one waiting, so no actor idles between blocks.
IN_FLIGHT_PER_WORKER = 2


class CohortWorker:
    """The actor: one scenario's data, model and trainer, training blocks of devices."""

    def __init__(self, scenario: Scenario) -> None:
        torch.set_num_threads(1)  # one reserved Ray CPU per actor: the actors are the parallelism
        keep_freed_memory()
        self.scenario = scenario
        self.data = build_data(scenario)
        self.trainer = build_trainer(scenario, build_scenario_model(scenario, self.data), self.data)

    def train(self, params: torch.Tensor, round: int, device_ids: np.ndarray, config: TrainConfig) -> list[CohortChunk]:
        """Train one block of devices for ``round``; the chunks the in-process engine would get."""
        tasks = list(cohort_tasks(self.data, self.scenario.seed, round, device_ids.tolist()))
        return list(self.trainer.train_cohort(params, tasks, config, chunk_size=max(len(tasks), 1)))


class RayCohortRunner(CohortExecutor):
    """Shards cohort training over Ray actors (``[engine] backend = "ray"``).

    Parameters
    ----------
    scenario:
        The validated scenario; its ``engine`` section gives ``ray-address``, ``ray-workers``,
        ``threads`` and ``chunk-size``.

    Actors start on the first round (not at construction) and stop at :meth:`close`.
    """

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.address = scenario.engine.ray_address
        self.requested_workers = scenario.engine.ray_workers
        self._actors: list[Any] = []
        self._started_ray = False

    # ---------------------------------------------------------------------------------------
    def _start(self) -> None:
        try:
            import ray
        except ImportError as exc:  # pragma: no cover - ray ships with flwr[simulation]
            raise FedsimError(f"engine.backend = \"ray\" needs the ray package: {exc}") from None
        if not ray.is_initialized():
            # keep Ray from rewriting accelerator env vars of CPU-only workers (and its warning)
            os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
            kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
            if self.address:
                check_reachable(self.address)
                kwargs["address"] = self.address
            elif self.requested_workers:
                kwargs["num_cpus"] = self.requested_workers
            try:
                ray.init(**kwargs)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                where = self.address or "a local Ray runtime"
                raise FedsimError(f"engine.ray-address: cannot start or reach {where}: {exc}") from None
            self._started_ray = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        workers = self.requested_workers or cpus
        if workers > cpus:
            raise FedsimError(f"engine.ray-workers: {workers} workers need {workers} CPUs, the Ray cluster has {cpus}")
        actor_cls = ray.remote(num_cpus=1)(CohortWorker)
        self._actors = [actor_cls.remote(self.scenario) for _ in range(workers)]

    @property
    def num_workers(self) -> int:
        """Number of actors (0 before the first round)."""
        return len(self._actors)

    def train_cohort(
        self, params: torch.Tensor, round: int, cohort: np.ndarray, config: TrainConfig, *, chunk_size: int
    ) -> Iterator[CohortChunk]:
        """Train ``cohort`` for ``round`` on the actors; yield chunks in cohort order.

        Blocks of ``chunk_size`` devices go round-robin to the actors, at most
        :data:`IN_FLIGHT_PER_WORKER` per actor; results are consumed strictly in block order,
        which makes the server's running sum identical to the in-process engine's.
        """
        import ray

        if not self._actors:
            self._start()
        cohort = np.asarray(cohort, dtype=np.int64)
        blocks = [cohort[i : i + chunk_size] for i in range(0, len(cohort), chunk_size)]
        if not blocks:
            return
        params_ref = ray.put(params.detach().contiguous())
        pending: dict[int, Any] = {}
        submitted = 0
        limit = IN_FLIGHT_PER_WORKER * len(self._actors)
        for index in range(len(blocks)):
            while submitted < len(blocks) and len(pending) < limit:
                actor = self._actors[submitted % len(self._actors)]
                pending[submitted] = actor.train.remote(params_ref, round, blocks[submitted], config)
                submitted += 1
            yield from ray.get(pending.pop(index))

    def train(self, plan: RoundPlan, acc: UpdateAccumulator) -> np.ndarray:
        """The :class:`~fedsim.engine.executors.CohortExecutor` contract over :meth:`train_cohort`."""
        chunks = self.train_cohort(
            plan.params, plan.round, plan.cohort, plan.config, chunk_size=self.scenario.engine.chunk_size
        )
        for chunk in chunks:
            acc.add(chunk)
        return plan.cohort

    def close(self) -> None:
        """Stop the actors, and the Ray runtime if this runner started it."""
        if not self._actors and not self._started_ray:
            return
        import ray

        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast, with a clear message, when an explicit ``host:port`` does not answer.

    ``ray.init`` retries an unreachable head node for minutes; ``"auto"`` (find the cluster of
    this node) is left to Ray, which fails fast by itself when there is none.
    """
    target = address.removeprefix("ray://")
    if target == "auto" or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as exc:
        raise FedsimError(f"engine.ray-address: cannot reach {address!r} within {timeout:g} s: {exc}") from None
