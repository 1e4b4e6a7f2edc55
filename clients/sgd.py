"""Plain local SGD: the reference per-client algorithm, and the fastest exact path to run it.

Each client starts from the global flat parameters, runs ``local_epochs`` passes of minibatch SGD
(shuffled with ``torch.randperm`` from a generator seeded with the client's task seed, advanced
epoch after epoch; the last minibatch short) on the task's loss (:meth:`fedsim.tasks.Task.loss`:
mean cross-entropy for classification, mean over non-padding tokens for next-token prediction),
and reports ``delta = local - global`` clipped to ``clip_norm`` when the round asks for it.
:meth:`SGDTrainer.train_client` is that algorithm, one client at a time.

:meth:`SGDTrainer.train_cohort` (what the engine calls) trains a cohort by one of three paths that
all give the loop's results (equality tests in float64: ``tests/engine/test_batched_training.py``,
``tests/engine/test_trainer_paths.py``):

==============  ================================================================================
path            what, and when ``path = "auto"`` picks it
==============  ================================================================================
``batched``     hand-batched matmuls for ``Sequential`` stacks of Linear / ReLU (logreg, mlp;
                :mod:`clients.batched`); picked whenever it applies to a classification model.
                Measured ~13,500 updates/s (logreg 784-10) and ~1,900/s (MLP 784-128-10) against
                ~700/s and ~480/s for the loop.
``conv``        per-client weights stacked, grouped convolutions (``groups = clients``) and batched
                matmuls, autograd for every client's own gradient (:mod:`clients.convbatched`);
                picked for classification ``Sequential`` stacks of Conv2d / ReLU / MaxPool2d /
                Flatten / Linear (the zoo's ``cnn``): measured ~3x the one-core loop on the digits
                CNN (8x8 images, where the loop is per-operation overhead).
``vmap``        ``torch.func`` ``functional_call`` + ``vmap`` + ``grad`` over a group of clients,
                for any batch-independent model (:mod:`clients.functional`); picked for dense
                models (Linear, activations, LayerNorm, Flatten) that the hand-batched path does
                not cover: measured ~2x the loop on an MLP (~1,000/s vs ~480/s).
``loop``        the per-client loop with the model built once per worker and reused (no copy per
                client), ``workers`` groups of clients trained at once, each on one torch
                thread, in worker processes (:mod:`clients.processes`) or threads
                (``[client] pool``); picked for recurrent and attention models (and convolutional
                ones the conv path does not cover), where batching across clients measured no
                faster (char LSTM: vmap 5.3 vs loop 6.5 clients/s; small transformer: 4.3 vs 4.1;
                per-client LSTM weights stacked with bmm: 2.5-3x slower, memory-bound).
==============  ================================================================================

Cores. ``workers`` (default: ``[engine] threads``) groups train at once. The batched and vmap
paths run them on threads (their big batched kernels release the GIL for long stretches). The
loop path runs them in worker processes when ``pool = "auto"`` (default) or ``"processes"``:
its many small kernels gain little from threads of one interpreter (measured, issue 25: two
threads 1.0x on the digits CNN, 1.3-1.6x on the char LSTM; two processes ~2x); ``pool =
"threads"`` keeps them in this process. A model that a fresh interpreter cannot rebuild (its
class defined in ``__main__``) trains on threads under ``"auto"``, and is an error under
``"processes"``. Results never depend on ``workers`` or the pool.

``path = "measure"`` times every path that applies on the first cohort's first clients and keeps
the fastest (results then match the loop to float rounding whichever wins, but not necessarily
bit for bit across runs that pick differently); ``path = "batched" | "vmap" | "loop"`` forces one.
:meth:`SGDTrainer.describe` says which path runs and why; the engine reports it in
``summary.json["trainer"]`` and on the console.
"""

from __future__ import annotations

import copy
import itertools
import threading
import time
import typing
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from clients.batched import BatchedSGD, supports
from clients.concurrent import train_concurrently
from clients.convbatched import ConvBatchedSGD
from clients.convbatched import supports as conv_supports
from clients.functional import FunctionalSGD, fixed_groups, vmap_layers_ok
from clients.processes import ProcessGroupPool, ProcessPoolUnavailable
from fedsim.client import ClientResult, ClientTrainer, stated_bits
from fedsim.models import set_flat
from fedsim.privacy.clipping import clip_and_bit
from fedsim.registry import resolve_params
from fedsim.types import ClientTask, CohortChunk, TrainConfig
from fedsim.validation import boolean, choice, int_at_least

#: A trainer path (``[client] path``); module docstring.
PathName = Literal["auto", "batched", "conv", "vmap", "loop", "measure"]
PATHS: tuple[str, ...] = typing.get_args(PathName)
#: Where the loop path's workers run (``[client] pool``); module docstring.
PoolName = Literal["auto", "processes", "threads"]
POOLS: tuple[str, ...] = typing.get_args(PoolName)
#: Clients per group of the per-client loop (the unit a worker thread takes).
LOOP_GROUP = 8
#: Clients ``path = "measure"`` trains with every candidate path.
MEASURE_CLIENTS = 16


@dataclass(frozen=True)
class SGDParams:
    """``[client] trainer = "sgd"`` parameters (kebab-case in a scenario).

    Attributes
    ----------
    batched:
        ``False``: always the per-client loop (the same as ``path = "loop"``).
    workers:
        Groups trained at once, each on its own single-threaded torch thread; ``None`` (default):
        the torch thread count in effect when a cohort is trained, which the engine sets from
        ``[engine] threads``.
    path:
        ``"auto"`` (default), ``"measure"``, ``"batched"``, ``"conv"``, ``"vmap"`` or ``"loop"`` (module
        docstring).
    pool:
        Where the loop path's ``workers`` run: ``"auto"`` (default: worker processes, threads
        when the model cannot be sent to one), ``"processes"`` or ``"threads"`` (module docstring).
    """

    batched: bool = True
    workers: int | None = None
    path: PathName = "auto"
    pool: PoolName = "auto"

    def __post_init__(self) -> None:
        boolean("batched", self.batched)
        int_at_least("workers", self.workers, 1, optional=True)
        choice("path", self.path, PATHS)
        choice("pool", self.pool, POOLS)
        if not self.batched and self.path not in ("auto", "loop"):
            raise ValueError(f"batched = false trains with the per-client loop; it contradicts path = {self.path!r}")


class SGDTrainer(ClientTrainer):
    """Minibatch SGD on the device's data (no momentum, no weight decay).

    ``model`` is the template model (built once; the loop trains private copies of it, one per
    worker); the parameters are an :class:`SGDParams` or its fields as keywords
    (``SGDTrainer(model, path="loop")``).
    """

    Params = SGDParams

    def __init__(self, model: nn.Module, params: SGDParams | None = None, /, **kwargs: Any) -> None:
        super().__init__(model)
        self.params = resolve_params(SGDParams, params, kwargs)
        self.path: str = self.params.path if self.params.batched else "loop"
        self.workers = self.params.workers
        self._choice: tuple[str, str] | None = None
        self._batched: BatchedSGD | None = None
        self._functional: FunctionalSGD | None = None
        self._conv: ConvBatchedSGD | None = None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._procs: ProcessGroupPool | None = None
        #: where clients train (:meth:`set_device`)
        self.device = torch.device("cpu")
        #: why the loop path runs on threads although processes were asked for (``None``: it does not)
        self._pool_note: str | None = None
        if self.path == "batched" and not supports(model):
            raise ValueError("path = 'batched' needs an nn.Sequential of nn.Linear / nn.ReLU layers")

    # -------------------------------------------------------------------------------------------
    # which path

    def _is_classification(self) -> bool:
        return self.objective is None or self.objective.kind == "classification"

    def candidates(self) -> list[str]:
        """The paths that apply to this model and task, fastest expected first."""
        out = []
        if supports(self.model) and self._is_classification():
            out.append("batched")
        if conv_supports(self.model) and self.objective is not None and self._is_classification():
            out.append("conv")
        if self.objective is not None and vmap_layers_ok(self.model)[0]:
            out.append("vmap")
        out.append("loop")
        return out

    def choice(self) -> tuple[str, str]:
        """``(path, reason)`` of the path that trains cohorts (``"measure"``: known after the first cohort)."""
        if self._choice is not None:
            return self._choice
        if self.path == "measure":
            return ("measure", "measured on the first cohort")
        if self.path != "auto":
            if self.path in ("vmap", "conv") and self.objective is None:
                raise ValueError(f"path = {self.path!r} needs the trainer's task (set by the engine)")
            if self.path == "conv" and not (conv_supports(self.model) and self._is_classification()):
                raise ValueError(
                    "path = 'conv' needs a classification nn.Sequential of Conv2d / ReLU / MaxPool2d / Flatten / Linear layers"
                )
            self._choice = (self.path, "set by [client] path (or batched = false)")
            return self._choice
        if supports(self.model) and self._is_classification():
            self._choice = ("batched", "Linear/ReLU stack: hand-batched matmuls across clients (measured fastest, ~4-20x the loop)")
        elif conv_supports(self.model) and self.objective is not None and self._is_classification():
            self._choice = (
                "conv",
                "Conv2d/ReLU/MaxPool2d/Linear stack: grouped convolutions and batched matmuls across clients "
                "(measured ~3x the per-client loop on the digits CNN, one core)",
            )
        elif self.objective is not None and vmap_layers_ok(self.model)[0]:
            self._choice = ("vmap", "dense layers only: torch.func vmap across clients (measured ~2x the loop)")
        else:
            blocker = vmap_layers_ok(self.model)[1] if self.objective is not None else "no task set"
            self._choice = (
                "loop",
                f"{blocker} layer: batching across clients measured no faster for recurrent/attention models; "
                "per-client loop, model reused, client groups in worker processes on [engine] threads",
            )
        return self._choice

    @property
    def batched(self) -> BatchedSGD | None:
        """The hand-batched trainer when that path trains cohorts, else ``None``."""
        if self.choice()[0] != "batched":
            return None
        if self._batched is None:
            self._batched = BatchedSGD(self.model)
        return self._batched

    def describe(self) -> dict[str, str]:
        """Which path trains cohorts and why (for the run's summary and console)."""
        path, reason = self.choice()
        out = {"path": path, "reason": reason}
        if path == "loop":
            workers = self.workers if self.workers is not None else torch.get_num_threads()
            if workers == 1:
                out["pool"] = "one worker"
            elif self._uses_processes():
                out["pool"] = f"{workers} worker processes"
            else:
                out["pool"] = f"{workers} threads" + (f" ({self._pool_note})" if self._pool_note else "")
        return out

    def _uses_processes(self) -> bool:
        return self.params.pool != "threads" and self._pool_note is None and self.device.type == "cpu"

    def set_device(self, device: torch.device) -> torch.device:
        """Train every path on ``device`` (the model moves there; each cohort's parameters and
        data are copied there; deltas stay there for the server's sum, losses come back).
        Shuffles are still drawn on the CPU from each client's seed, so results equal the CPU
        loop's up to the device's floating-point rounding. Worker processes are for the CPU:
        on an accelerator the loop's workers are threads."""
        self.device = torch.device(device)
        self.model.to(self.device)
        if self.device.type != "cpu":
            self.close()
        self._functional = None  # rebuilt from the moved model
        return self.device

    def close(self) -> None:
        """Stop the loop path's worker processes, if any were started."""
        if self._procs is not None:
            self._procs.close()
            self._procs = None

    # -------------------------------------------------------------------------------------------
    # training

    def train_cohort(
        self,
        params: torch.Tensor,
        tasks: Iterable[ClientTask],
        config: TrainConfig,
        *,
        chunk_size: int = 256,
    ) -> Iterator[CohortChunk]:
        """Train many clients by the chosen path (results equal the per-client loop's)."""
        workers = self.workers if self.workers is not None else torch.get_num_threads()
        params = params.to(self.device)
        if self.device.type != "cpu":
            tasks = (ClientTask(t.device_id, t.x.to(self.device), t.y.to(self.device), t.seed) for t in tasks)
        if self.path == "measure" and self._choice is None:
            tasks = self._measure(params, tasks, config)
        path, _ = self.choice()
        if path == "batched":
            assert self.batched is not None
            dtype = next(self.model.parameters()).dtype
            return self.batched.train_cohort(params.to(dtype), tasks, config, chunk_size=chunk_size, workers=workers)
        if path == "vmap":
            return self._functional_sgd().train_cohort(params, tasks, config, chunk_size=chunk_size, workers=workers)
        if path == "conv":
            if self._conv is None:
                assert self.objective is not None
                self._conv = ConvBatchedSGD(self.model, self.objective)
            return self._conv.train_cohort(params, tasks, config, chunk_size=chunk_size, workers=workers)
        return self._loop_cohort(params, tasks, config, chunk_size, workers)

    def _functional_sgd(self) -> FunctionalSGD:
        if self._functional is None:
            assert self.objective is not None
            self._functional = FunctionalSGD(self.model, self.objective)
        return self._functional

    def _loop_cohort(
        self, params: torch.Tensor, tasks: Iterable[ClientTask], config: TrainConfig, chunk_size: int, workers: int
    ) -> Iterator[CohortChunk]:
        groups = fixed_groups(tasks, chunk_size, LOOP_GROUP)
        if workers == 1:
            for group in groups:
                yield self._loop_chunk(params, group, config, self.model)
            return
        procs = self._process_pool(workers) if self._uses_processes() else None
        if procs is not None:
            yield from procs.train(params, groups, config)
            return
        yield from train_concurrently(lambda group: self._loop_chunk(params, group, config, self._replica()), groups, workers)

    def _process_pool(self, workers: int) -> ProcessGroupPool | None:
        """The loop path's worker processes (started on first use, kept across rounds), or
        ``None`` when the model cannot be sent to them under ``pool = "auto"``."""
        if self._procs is not None and self._procs.workers == workers:
            return self._procs
        self.close()
        try:
            self._procs = ProcessGroupPool(self.model, self.objective, workers)
        except ProcessPoolUnavailable as exc:
            if self.params.pool == "processes":
                raise ValueError(f"[client] pool = \"processes\": {exc}") from None
            self._pool_note = f"threads: {exc}"
            return None
        return self._procs

    def _replica(self) -> nn.Module:
        """This worker thread's own copy of the model (made once per thread, reused for every client)."""
        model = getattr(self._local, "model", None)
        if model is None:
            with self._lock:
                model = copy.deepcopy(self.model)
            self._local.model = model
        return model

    def _loop_chunk(self, params: torch.Tensor, tasks: Sequence[ClientTask], config: TrainConfig, model: nn.Module) -> CohortChunk:
        results = [self._train_one(model, params, t, config) for t in tasks]
        return CohortChunk(
            device_ids=np.asarray([t.device_id for t in tasks], dtype=np.int64),
            deltas=torch.stack([r.delta for r in results]),
            num_examples=torch.tensor([r.num_examples for r in results], dtype=torch.int64),
            losses=torch.tensor([r.loss for r in results], dtype=torch.float32),
            rounds=np.full(len(tasks), config.round, dtype=np.int64),
            below_clip=stated_bits([r.below_clip for r in results]),
        )

    def _measure(self, params: torch.Tensor, tasks: Iterable[ClientTask], config: TrainConfig) -> Iterator[ClientTask]:
        """Time every candidate path on the first clients; keep the fastest; return all tasks."""
        it = iter(tasks)
        head = list(itertools.islice(it, MEASURE_CLIENTS))
        rates: dict[str, float] = {}
        for path in self.candidates():
            self._choice = (path, "")
            try:
                list(self.train_cohort(params, head[:2], config))  # warm-up
                start = time.perf_counter()
                list(self.train_cohort(params, head, config))
                rates[path] = len(head) / max(time.perf_counter() - start, 1e-9)
            except Exception as exc:  # a path that does not apply to this model
                rates[path] = 0.0
                if path == "loop":
                    raise exc
        best = max(rates, key=lambda p: rates[p])
        listed = ", ".join(f"{p} {r:.1f}/s" for p, r in rates.items())
        self._choice = (best, f"measured on {len(head)} clients: {listed}")
        return itertools.chain(head, it)

    def train_client(self, params: torch.Tensor, task: ClientTask, config: TrainConfig) -> ClientResult:
        return self._train_one(self.model, params, task, config)

    def _train_one(self, model: nn.Module, params: torch.Tensor, task: ClientTask, config: TrainConfig) -> ClientResult:
        """The reference algorithm for one client, on ``model`` (its parameters are overwritten)."""
        set_flat(model, params)
        model.train()
        n = task.num_examples
        if n == 0:
            return ClientResult(torch.zeros_like(params), 0, 0.0)
        gen = torch.Generator().manual_seed(task.seed)  # shuffles on the CPU, whatever the device
        weights = list(model.parameters())
        objective = self.objective
        total_loss, steps = 0.0, 0
        for _ in range(config.local_epochs):
            order = torch.randperm(n, generator=gen).to(task.x.device)
            for start in range(0, n, config.batch_size):
                idx = order[start : start + config.batch_size]
                logits = model(task.x[idx])
                loss = F.cross_entropy(logits, task.y[idx]) if objective is None else objective.loss(logits, task.y[idx])
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
                with torch.no_grad():
                    for w, g in zip(weights, grads, strict=True):
                        if g is not None:
                            w.sub_(config.lr * g)
                total_loss += float(loss.detach())
                steps += 1
        with torch.no_grad():
            delta = nn.utils.parameters_to_vector(model.parameters()).to(params.dtype) - params
        bit = None
        if config.clip_norm is not None:
            delta, bit = clip_and_bit(delta, config.clip_norm)
        return ClientResult(delta, n, total_loss / steps, bit)
