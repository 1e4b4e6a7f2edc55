"""Training groups of clients in worker processes, results in order.

:class:`ProcessGroupPool` is the per-client loop's way to use several cores for models where
threads gain little: convolutional, recurrent and attention models run many small kernels, and
with one torch thread per worker thread they still share one interpreter, its GIL between
kernels and one allocator. Measured on the 2-core machine (issue 25): two threads gained nothing
on the digits CNN and 1.3-1.6x on the char LSTM, where pfl-research's two worker processes
gained ~2x.

Each worker process is started once (``spawn``: a fresh interpreter, no inherited torch
threads), runs torch on one thread, and receives the template model and the task's loss once.
Each worker starts its own session (``os.setsid``), as ``torch.distributed.run`` does for
pfl-research's processes: where the kernel shares CPU time between sessions rather than
processes (Linux's autogroup scheduling, on by default on many distributions), workers left in
the driver's session split that one session's share and two of them obtained no more CPU time
than one thread (measured on the shared 2-core machine, ``docs/benchmarks.md``). The driver still
ends them (``close``), and a worker exits by itself when the driver process ends, however it
ends (a watch on the driver's sentinel: signals sent to the driver's process group or terminal
no longer reach the workers).
Each group of clients is split into ``workers`` consecutive parts (so even a one-group cohort
uses every worker); a part travels with the global parameters, its tasks (device id, data,
seed; the data copied out of the dataset's tensors first, since pickling a view sends its whole
storage: 0.35 MB per char-LSTM client for 10 KB of data) and the round's :class:`TrainConfig` (a part trains for milliseconds to seconds; pickling
the parameters costs ~1 ms per MB). A worker trains its part with the reference per-client loop
(:meth:`clients.sgd.SGDTrainer._train_one`) and returns the part's rows; the driver joins a
group's parts into the group's one :class:`CohortChunk`, keeps at most ``2 x workers`` parts in
flight and yields chunks strictly in group order, so the server's running sum, and every result,
is bit for bit that of the one-process loop (``tests/engine/test_trainer_paths.py``).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import pickle
import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsim.tasks import Task
from fedsim.types import ClientTask, CohortChunk, TrainConfig

#: Groups handed out and not yet consumed, per worker.
IN_FLIGHT_PER_WORKER = 2

# ---------------------------------------------------------------------------------------------
# the worker side

_WORKER: dict[str, Any] = {}


def _init_worker(payload: bytes) -> None:
    """Build this process's trainer from the pickled template model and task (once)."""
    _own_session()
    _exit_with_driver()
    torch.set_num_threads(1)
    from clients.sgd import SGDTrainer

    model, objective = pickle.loads(payload)
    trainer = SGDTrainer(model, path="loop", workers=1)
    trainer.objective = objective
    _WORKER["trainer"] = trainer


def _own_session() -> None:
    """Make this worker its own session, so that a scheduler that shares CPU time between
    sessions gives it its own share (module docstring); a no-op where there are no sessions."""
    setsid = getattr(os, "setsid", None)
    if setsid is not None:
        with contextlib.suppress(OSError):  # already a session or process-group leader
            setsid()


def _exit_with_driver() -> None:
    """End this worker when the driver process ends, however it ends (a worker in its own session
    no longer receives the signals sent to the driver's process group or terminal)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="fedsim-driver-watch", daemon=True).start()


def _ready() -> int:
    return os.getpid()


def _train_group(params: torch.Tensor, tasks: list[ClientTask], config: TrainConfig) -> CohortChunk:
    """Train one group with the reference per-client loop, on this process's model."""
    trainer = _WORKER["trainer"]
    return trainer._loop_chunk(params, tasks, config, trainer.model)


# ---------------------------------------------------------------------------------------------
# the driver side


class ProcessPoolUnavailable(RuntimeError):
    """The worker processes could not be started or could not rebuild the model."""


class ProcessGroupPool:
    """``workers`` processes that train groups of clients with the per-client loop.

    Parameters
    ----------
    model:
        The template model (sent once to each worker; must be picklable by a fresh interpreter,
        i.e. its class importable there).
    objective:
        The task whose loss local training minimises (``None``: mean cross-entropy).
    workers:
        Number of worker processes.

    Raises
    ------
    ProcessPoolUnavailable
        When the model cannot be pickled or a worker cannot rebuild it (for example a model class
        defined in ``__main__`` or in a file loaded by path under a name a fresh interpreter cannot
        import); the caller then trains with threads.
    """

    def __init__(self, model: nn.Module, objective: Task | None, workers: int) -> None:
        if workers < 2:
            raise ValueError(f"a process pool needs >= 2 workers, got {workers}")
        try:
            payload = pickle.dumps((model, objective))
        except Exception as exc:
            raise ProcessPoolUnavailable(f"the model cannot be sent to worker processes: {exc}") from None
        self.workers = workers
        ctx = multiprocessing.get_context("spawn")
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(payload,))
        self._finalizer = weakref.finalize(self, self._pool.shutdown, wait=True, cancel_futures=True)
        try:  # start every worker now, so a model that cannot be rebuilt fails here, not mid-round
            for fut in [self._pool.submit(_ready) for _ in range(workers)]:
                fut.result()
        except Exception as exc:
            self.close()
            raise ProcessPoolUnavailable(f"worker processes could not rebuild the model: {type(exc).__name__}: {exc}") from None

    def pids(self) -> list[int]:
        """Process ids of the workers started so far (the executor starts them as work arrives)."""
        return sorted(self._pool._processes or {})

    def train(self, params: torch.Tensor, groups: Iterator[list[ClientTask]], config: TrainConfig) -> Iterator[CohortChunk]:
        """Train ``groups`` from ``params``; yield their chunks in group order.

        Each group is split into ``workers`` consecutive parts trained by different workers (so a
        cohort of a single group still uses every worker) and reassembled into the group's one
        chunk: the chunks, and so the server's running sum, are those of the one-process loop
        whatever the number of workers.
        """
        params = params.detach().contiguous()
        pending: dict[int, list[Future]] = {}
        submitted = 0
        index = 0
        limit = IN_FLIGHT_PER_WORKER * self.workers  # parts in flight
        in_flight = 0
        exhausted = False
        try:
            while True:
                while not exhausted and in_flight < limit:
                    group = next(groups, None)
                    if group is None:
                        exhausted = True
                        break
                    size = -(-len(group) // self.workers)
                    parts = [group[i : i + size] for i in range(0, len(group), size)]
                    pending[submitted] = [self._pool.submit(_train_group, params, _compact(part), config) for part in parts]
                    in_flight += len(parts)
                    submitted += 1
                if index not in pending:
                    return
                futures = pending.pop(index)
                in_flight -= len(futures)
                index += 1
                yield _joined([f.result() for f in futures])
        finally:
            for futs in pending.values():
                for fut in futs:
                    fut.cancel()

    def close(self) -> None:
        """Stop the worker processes."""
        self._finalizer()


def _compact(tasks: list[ClientTask]) -> list[ClientTask]:
    """The tasks with their data in tensors of their own (equal values), so that pickling sends
    each client's examples and not the whole storage its data is a view of."""
    return [ClientTask(t.device_id, _own(t.x), _own(t.y), t.seed) for t in tasks]


def _own(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it owns exactly its storage, else a contiguous copy."""
    if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _joined(chunks: list[CohortChunk]) -> CohortChunk:
    """One chunk of consecutive parts, rows in order (the parts' rows are copied, not changed)."""
    if len(chunks) == 1:
        return chunks[0]
    rounds = [c.rounds for c in chunks]
    return CohortChunk(
        device_ids=np.concatenate([c.device_ids for c in chunks]),
        deltas=torch.cat([c.deltas for c in chunks]),
        num_examples=torch.cat([c.num_examples for c in chunks]),
        losses=torch.cat([c.losses for c in chunks]),
        rounds=None if any(r is None for r in rounds) else np.concatenate(rounds),
        below_clip=None if any(c.below_clip is None for c in chunks) else np.concatenate([c.below_clip for c in chunks]),
    )
