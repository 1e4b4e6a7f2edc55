"""Generic batched local SGD for any ``nn.Module``: ``torch.func`` over a group of clients.

:class:`FunctionalSGD` runs the reference per-client algorithm (:meth:`clients.sgd.SGDTrainer.train_client`)
for a group of clients at once: each client's parameters are one row of a ``[clients, P]``
tensor, the model is applied with ``torch.func.functional_call``, and ``vmap(grad_and_value(loss))``
gives every client's gradient of its own minibatch loss in one call. Shuffles (one
``torch.randperm`` per client and epoch from the client's task seed), minibatches (the last one
short), the loss (:meth:`fedsim.tasks.Task.loss`), the plain SGD step, ``delta = local - global``
and per-client clipping are those of the loop; clients with fewer examples are padded with rows
whose loss weight is exactly 0, so a client whose epoch is over takes exactly-zero steps and the
result equals the loop's (up to floating-point summation order: equality tests compare in float64).

Applies to models whose layers do not couple the examples of a batch (no BatchNorm in training
mode) and draw no randomness (no dropout): :func:`vmap_layers_ok` says which the engine picks it
for automatically. It is not always faster than the loop: per-client gradients are materialised
and each step re-traces the graph, so it wins for small dense models and loses for recurrent
ones (see :mod:`clients.sgd`).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from clients.concurrent import train_concurrently
from fedsim.privacy.clipping import clip_rows_with_bits_
from fedsim.tasks import Task
from fedsim.types import ClientTask, CohortChunk, TrainConfig

#: Working-set budget of one group in float elements (as :data:`clients.batched.GROUP_ELEMENTS`).
GROUP_ELEMENTS = 2_000_000
#: Most clients per group (larger vmaps get memory-bound: FIELD-NOTES, MLP best at ~50).
MAX_GROUP = 64

#: Layer types of "dense" models, for which the vmap path beats the per-client loop.
DENSE_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Bilinear, nn.Flatten, nn.Unflatten, nn.Identity, nn.LayerNorm,
    nn.ReLU, nn.ReLU6, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Softplus,
    nn.Mish, nn.Hardtanh, nn.Hardswish, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
)


def vmap_layers_ok(model: nn.Module) -> tuple[bool, str]:
    """Whether every leaf layer of ``model`` is a dense layer (:data:`DENSE_LAYERS`); and if
    not, the first layer type that is not."""
    for module in model.modules():
        if next(module.children(), None) is not None:
            continue  # a container
        if not isinstance(module, DENSE_LAYERS):
            return False, type(module).__name__
    return True, ""


class FunctionalSGD:
    """Trains groups of clients of any (batch-independent, deterministic) model with ``torch.func``.

    Parameters
    ----------
    model:
        Template model (its parameters are ignored; its buffers are used as they are).
    objective:
        The task whose loss is minimised.
    """

    def __init__(self, model: nn.Module, objective: Task) -> None:
        self.model = model
        self.objective = objective
        self.shapes = [(name, p.shape) for name, p in model.named_parameters()]
        self.num_params = sum(p.numel() for p in model.parameters())
        self.group: int | None = None
        # functional_call swaps a module's tensors while it runs: one model copy per thread
        self._local = threading.local()
        self._lock = threading.Lock()
        self._local.model = model

    def group_size(self, data_elements: int) -> int:
        """Clients per group: working set within :data:`GROUP_ELEMENTS`, in ``[1, MAX_GROUP]``."""
        if self.group is not None:
            return self.group
        return int(max(1, min(MAX_GROUP, GROUP_ELEMENTS // max(self.num_params + data_elements, 1))))

    def _step_fn(self) -> Any:
        """This thread's ``vmap(grad_and_value(loss))`` over its own copy of the model."""
        step = getattr(self._local, "step", None)
        if step is None:
            model = getattr(self._local, "model", None)
            if model is None:
                with self._lock:
                    model = copy.deepcopy(self.model)
            buffers = dict(model.named_buffers())

            def loss(weights: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
                logits = functional_call(model, (weights, buffers), (xb,))
                return self._masked_loss(logits, yb, valid)

            step = self._local.step = vmap(grad_and_value(loss))
        return step

    def _masked_loss(self, logits: torch.Tensor, yb: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        per, count = self.objective.per_example_loss(logits, yb)
        return (per * valid).sum() / (count * valid).sum().clamp(min=1)

    # -------------------------------------------------------------------------------------------
    def train_cohort(
        self,
        params: torch.Tensor,
        tasks: Iterable[ClientTask],
        config: TrainConfig,
        *,
        chunk_size: int = 256,
        workers: int = 1,
    ) -> Iterator[CohortChunk]:
        """Train a stream of clients, one chunk per group (groups never cross ``chunk_size`` blocks)."""
        features = self.objective.spec.num_features
        groups = fixed_groups(tasks, chunk_size, self.group_size(64 * features))
        if workers == 1:
            for group in groups:
                yield self.train_chunk(params, group, config)
            return
        yield from train_concurrently(lambda group: self.train_chunk(params, group, config), groups, workers)

    def train_chunk(self, params: torch.Tensor, tasks: Sequence[ClientTask], config: TrainConfig) -> CohortChunk:
        """Train ``tasks`` from the flat ``params``; one :class:`CohortChunk` in task order."""
        if params.dim() != 1 or params.numel() != self.num_params:
            raise ValueError(f"flat parameters have shape {tuple(params.shape)}, model needs ({self.num_params},)")
        m = len(tasks)
        dtype = params.dtype
        sizes = [t.num_examples for t in tasks]
        n_max = max(sizes, default=0)
        ids = np.fromiter((t.device_id for t in tasks), dtype=np.int64, count=m)
        counts = torch.tensor(sizes, dtype=torch.int64)
        rounds = np.full(m, config.round, dtype=np.int64)
        dev = params.device
        if n_max == 0:
            return CohortChunk(ids, torch.zeros(m, self.num_params, dtype=dtype, device=dev), counts, torch.zeros(m), rounds)
        flat = params.unsqueeze(0).repeat(m, 1)  # every client's private parameters
        weights: dict[str, torch.Tensor] = {}
        offset = 0
        for name, shape in self.shapes:
            k = int(np.prod(shape)) if len(shape) else 1
            weights[name] = flat[:, offset : offset + k].view(m, *shape)
            offset += k
        x0, y0 = tasks[0].x, tasks[0].y
        xp = torch.zeros(m, n_max, *x0.shape[1:], dtype=x0.dtype, device=dev)
        yp = torch.zeros(m, n_max, *y0.shape[1:], dtype=y0.dtype, device=dev)
        gens = [torch.Generator().manual_seed(t.seed) for t in tasks]
        n = torch.tensor(sizes, device=dev)
        bs = config.batch_size
        steps_per_epoch = -(-n_max // bs)
        loss_sum = torch.zeros(m, dtype=torch.float64, device=dev)
        lr = float(config.lr)
        step = self._step_fn()
        for _ in range(config.local_epochs):
            for i, (task, gen) in enumerate(zip(tasks, gens, strict=True)):
                if sizes[i] == 0:
                    continue
                order = torch.randperm(sizes[i], generator=gen).to(dev)  # drawn on the CPU, as the loop draws it
                xp[i, : sizes[i]] = task.x.index_select(0, order)
                yp[i, : sizes[i]] = task.y.index_select(0, order)
            for k in range(steps_per_epoch):
                lo, hi = k * bs, min(k * bs + bs, n_max)
                valid = (torch.arange(lo, hi, device=dev).unsqueeze(0) < n.unsqueeze(1)).to(dtype)  # [m, b]
                grads, losses = step(weights, xp[:, lo:hi], yp[:, lo:hi], valid)
                with torch.no_grad():
                    for name, g in grads.items():
                        weights[name].sub_(g, alpha=lr)
                loss_sum += losses.detach().to(torch.float64)
        deltas = flat.sub_(params)
        bits = None
        if config.clip_norm is not None:
            bits = clip_rows_with_bits_(deltas, config.clip_norm)
        steps = (-(-n // bs)) * config.local_epochs
        losses = (loss_sum / steps.clamp(min=1).to(torch.float64)).to(torch.float32).cpu()
        return CohortChunk(ids, deltas.detach(), counts, losses, rounds, below_clip=bits)


def fixed_groups(tasks: Iterable[ClientTask], chunk_size: int, group: int) -> Iterator[list[ClientTask]]:
    """Consecutive groups of at most ``group`` tasks that never cross a block of ``chunk_size``.

    The split depends only on the task sequence (so every executor, the Ray backend's blocks
    included, trains the same groups and the server sums the same chunks); tasks are pulled
    lazily.
    """
    if chunk_size < 1 or group < 1:
        raise ValueError(f"chunk_size and group must be >= 1, got {chunk_size}, {group}")
    current: list[ClientTask] = []
    in_block = 0
    for task in tasks:
        current.append(task)
        in_block += 1
        if len(current) == group or in_block == chunk_size:
            yield current
            current = []
            if in_block == chunk_size:
                in_block = 0
    if current:
        yield current
