"""Batched local SGD: a whole chunk of clients trained as one tensor computation.

:class:`BatchedSGD` runs exactly the algorithm of the reference per-client loop
(:class:`clients.sgd.SGDTrainer.train_client`) for many clients at once:

* every client starts from the global parameters and, for each local epoch, shuffles its own
  examples with ``torch.randperm(n, generator=torch.Generator().manual_seed(task.seed))`` (one
  generator per client, advanced epoch after epoch, as in the loop);
* minibatches of ``batch_size`` in that order, the last one short when ``n`` is not a multiple;
* one plain SGD step per minibatch on the *mean* cross-entropy of the minibatch;
* ``delta = local - global``, clipped per client to ``clip_norm`` when the round asks for it.

How. The model must be an ``nn.Sequential`` of ``nn.Linear`` and ``nn.ReLU`` layers (logistic
regression, MLPs). Each client gets its own copy of every weight matrix, stacked into a
``[clients, out, in]`` tensor; forward and backward passes are hand-written batched matmuls
(``torch.baddbmm`` / ``torch.bmm``), and the weight update is fused into the gradient matmul
(``W.baddbmm_(dZ^T, H, alpha=-lr)``) so no per-client gradient tensor is ever materialised.
The input layer's input gradient is never computed. Clients with fewer examples than the
largest in the chunk are padded; their padded rows carry zero weight in the loss, and a client
whose epoch is over takes exactly-zero steps (``W - lr * 0 == W``), so unequal data sizes give
the same result as the loop, not an approximation.

Why hand-batched. Measured on the 2-core reference machine (client = 64 examples, batch 16,
1 epoch, 1 torch thread): for logistic regression on 784 features the per-client loop does
~700 updates/s, ``torch.func.vmap`` over ``grad`` ~7,700/s, and these hand-batched layers
~11,000-13,000/s; for a 784-128-10 MLP ~480/s, ~1,000/s and ~2,200/s. vmap materialises
per-client gradients and re-derives the graph each step; the hand-written passes do not, and the
batched matmuls themselves run at 75-120 GFLOP/s (sgemm peak ~105-115). A "deferred update"
variant (one shared-weight gemm for every step's forward plus per-client low-rank corrections,
one ``G^T X`` for the final delta) was measured too: it is exact but ~35 % slower for the MLP
(the corrections cost more than they save). Models with other layers fall back to the loop
(:func:`supports` says which).

Groups. Clients are trained in groups sized so that the group's working set (private weights
plus shuffled data) stays in the 32 MB last-level cache (:meth:`BatchedSGD._group_stream`):
measured best at 8-16 clients for the MLP and 32-43 for logistic regression; larger groups
spill to memory, smaller ones pay per-kernel overheads. Groups are cut from the task stream as
tasks arrive, so with the engine's task generator a device's data is generated just before
its group trains (and, with several workers, on the worker that trains it). Work buffers are
reused between groups (fresh ones cost page faults: a quarter of the MLP's time went to the
kernel). Results do not depend on the grouping.

Numerics. In float32 the batched and the loop results agree to ~1e-6 relative; a ReLU
pre-activation that is within rounding of zero can flip, so equality tests compare in float64
(pass float64 ``params`` and a float64 model: the computation runs in ``params.dtype``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from clients.concurrent import train_concurrently
from fedsim.privacy.clipping import clip_rows_with_bits_
from fedsim.types import ClientTask, CohortChunk, TrainConfig
from fedsim.validation import positive_number

#: Working-set budget of one group in float elements (weights + one epoch of data per client):
#: ~8 MB, a quarter of the last-level cache; 13 clients of the MLP, 34 of logistic regression.
GROUP_ELEMENTS = 2_000_000
#: Upper bound on clients per group, whatever the model size.
MAX_GROUP = 1024


@dataclass(frozen=True)
class _Linear:
    in_features: int
    out_features: int
    bias: bool


@dataclass(frozen=True)
class _ReLU:
    pass


def supports(model: nn.Module) -> bool:
    """Whether :class:`BatchedSGD` can train ``model`` (a ``Sequential`` of Linear/ReLU layers
    that starts with a Linear layer, optionally after an ``nn.Flatten`` of the whole example)."""
    layers = _layers(model)
    if layers is None or not layers or not isinstance(layers[0], nn.Linear):
        return False
    return all(type(m) in (nn.Linear, nn.ReLU) for m in layers)


def _layers(model: nn.Module) -> list[nn.Module] | None:
    """The Sequential's layers without a leading whole-example ``Flatten``; ``None`` if not a Sequential."""
    if not isinstance(model, nn.Sequential):
        return None
    layers = list(model)
    if layers and type(layers[0]) is nn.Flatten:
        if (layers[0].start_dim, layers[0].end_dim) != (1, -1):
            return None
        layers = layers[1:]
    return layers


class BatchedSGD:
    """Trains many clients of one Linear/ReLU ``Sequential`` model at once.

    Parameters
    ----------
    model:
        Template model; only its architecture is read (:func:`supports` must hold).
    """

    def __init__(self, model: nn.Module) -> None:
        if not supports(model):
            raise ValueError(
                f"batched training supports nn.Sequential stacks of nn.Linear / nn.ReLU, got {type(model).__name__}"
            )
        self.layers: list[_Linear | _ReLU] = []
        layers = _layers(model)
        assert layers is not None
        for m in layers:
            if isinstance(m, nn.Linear):
                self.layers.append(_Linear(m.in_features, m.out_features, m.bias is not None))
            else:
                self.layers.append(_ReLU())
        self.num_params = sum(p.numel() for p in model.parameters())
        self.num_features = layers[0].in_features
        #: clients per batched group; ``None``: sized by :meth:`group_size`'s cache rule
        self.group: int | None = None
        self._local = threading.local()  # work buffers, one set per training thread

    # ---------------------------------------------------------------------------------------
    def train_cohort(
        self,
        params: torch.Tensor,
        tasks: Iterable[ClientTask],
        config: TrainConfig,
        *,
        chunk_size: int = 256,
        workers: int = 1,
    ) -> Iterator[CohortChunk]:
        """Train a stream of clients ``chunk_size`` at a time, yielding one chunk per group.

        Blocks of ``chunk_size`` consecutive tasks are split into cache-sized groups
        (:meth:`_group_stream`); each group is yielded as soon as it is trained, so the server
        validates and sums its deltas while they are still in cache, and memory stays at a few
        groups whatever the cohort. The split depends only on the task sequence, so any executor
        that hands out the same blocks (the Ray backend) produces the same sequence of chunks.

        ``workers > 1`` trains that many groups at once on helper threads, each running torch
        single-threaded (torch releases the GIL inside its kernels); each worker also pulls its
        own group from ``tasks`` (under a lock), so the devices' data is generated on the core
        that trains it while the consuming thread only validates and sums. Chunks still come out
        in order and every group is computed exactly as with one worker, so results are
        identical. Unlike torch's intra-op threads there is no barrier per kernel: a thread that
        another process preempts does not stall the others (measured on the loaded 2-core
        machine: intra-op threads can make a round several times slower, concurrent groups do
        not).
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        groups = self._group_stream(tasks, chunk_size)
        if workers == 1:
            for group in groups:
                yield self.train_chunk(params, group, config)
            return
        yield from self._train_concurrently(params, groups, config, workers)

    def _group_stream(self, tasks: Iterable[ClientTask], chunk_size: int) -> Iterator[list[ClientTask]]:
        """Split a stream of tasks into consecutive cache-sized groups, pulling tasks lazily.

        A group takes tasks while its padded working set ``clients x (num_params + n_max x
        features)`` fits :data:`GROUP_ELEMENTS` (:meth:`group_size`; ``self.group``, when set,
        fixes the count); groups
        never cross a block of ``chunk_size`` consecutive tasks. The split depends only on the
        task sequence, so every executor (one thread, several, a Ray actor per block) trains the
        same groups. Tasks are pulled one at a time (with the engine's generator that is when a
        device's data is generated), so a group's data is fresh in cache when it is trained.
        """
        it = iter(tasks)
        pending = next(it, None)
        in_block = 0
        while pending is not None:
            if in_block == chunk_size:
                in_block = 0
            group = [pending]
            n_max = pending.num_examples
            pending = None
            while len(group) < chunk_size - in_block:
                task = next(it, None)
                if task is None:
                    break
                n = max(n_max, task.num_examples)
                if len(group) >= self.group_size(n * self.num_features):  # padded to n rows, it would not fit
                    pending = task
                    break
                group.append(task)
                n_max = n
            else:
                pending = next(it, None)
            in_block += len(group)
            yield group

    def _train_concurrently(
        self, params: torch.Tensor, groups: Iterator[list[ClientTask]], config: TrainConfig, workers: int
    ) -> Iterator[CohortChunk]:
        """Train ``groups`` on ``workers`` threads; yield their chunks in group order
        (:func:`clients.concurrent.train_concurrently`)."""
        return train_concurrently(lambda group: self.train_chunk(params, group, config), groups, workers)

    def train_chunk(self, params: torch.Tensor, tasks: Sequence[ClientTask], config: TrainConfig) -> CohortChunk:
        """Train ``tasks`` from the flat ``params``; one :class:`CohortChunk` in task order."""
        if params.dim() != 1 or params.numel() != self.num_params:
            raise ValueError(f"flat parameters have shape {tuple(params.shape)}, model needs ({self.num_params},)")
        if config.clip_norm is not None:
            positive_number("clip_norm", config.clip_norm)
        m = len(tasks)
        ids = np.fromiter((t.device_id for t in tasks), dtype=np.int64, count=m)
        counts = torch.tensor([t.num_examples for t in tasks], dtype=torch.int64)
        deltas = torch.empty(m, self.num_params, dtype=params.dtype, device=params.device)
        losses = torch.zeros(m, dtype=torch.float32)
        bits = np.ones(m, dtype=bool) if config.clip_norm is not None else None
        n_max = max((t.num_examples for t in tasks), default=0)
        group = self.group_size(n_max * self.num_features)
        for start in range(0, m, group):
            stop = min(start + group, m)
            self._train_group(params, tasks[start:stop], config, deltas[start:stop], losses[start:stop],
                              None if bits is None else bits[start:stop])
        rounds = np.full(m, config.round, dtype=np.int64)
        return CohortChunk(device_ids=ids, deltas=deltas, num_examples=counts, losses=losses, rounds=rounds,
                           below_clip=bits)

    def group_size(self, data_elements: int) -> int:
        """Clients per batched group when each brings ``data_elements`` input values.

        The group's working set (its clients' weights and minibatch data) should stay in the last
        level cache: ``GROUP_ELEMENTS / (num_params + data_elements)``, within ``[1, MAX_GROUP]``.
        ``self.group``, when set, overrides the rule (benchmarks, tests).
        """
        if self.group is not None:
            return self.group
        return int(max(1, min(MAX_GROUP, GROUP_ELEMENTS // max(self.num_params + data_elements, 1))))

    # ---------------------------------------------------------------------------------------
    def _layer_views(self, flat: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per-layer ``[m, out, in]`` weights and ``[m, out]`` biases as views of ``flat`` ``[m, P]``
        (rows in ``model.parameters()`` order: weight, bias per Linear layer)."""
        m = flat.shape[0]
        out: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        offset = 0
        for layer in self.layers:
            if isinstance(layer, _ReLU):
                continue
            size = layer.out_features * layer.in_features
            w = flat[:, offset : offset + size].view(m, layer.out_features, layer.in_features)
            offset += size
            b = None
            if layer.bias:
                b = flat[:, offset : offset + layer.out_features]
                offset += layer.out_features
            out.append((w, b))
        return out

    def _buffer(self, name: str, numel: int, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
        """A reusable flat work buffer of at least ``numel`` elements.

        Work buffers persist between groups: allocating them afresh for every group costs page
        faults (measured: a quarter of the MLP's time in the kernel) instead of cache hits.
        """
        buffers: dict[str, torch.Tensor] | None = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = {}
        buf = buffers.get(name)
        device = device if device is not None else torch.device("cpu")
        if buf is None or buf.dtype != dtype or buf.device != device or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=device)
            buffers[name] = buf
        return buf[:numel]

    def _train_group(
        self,
        params: torch.Tensor,
        tasks: Sequence[ClientTask],
        config: TrainConfig,
        deltas: torch.Tensor,
        losses: torch.Tensor,
        bits: np.ndarray | None = None,
    ) -> None:
        """Train one group; write its clipped deltas ``[m, P]``, mean losses ``[m]`` and, when the
        round clips, adaptive clipping's bits ``[m]`` (norm before clipping at most the clip norm).

        The clients' private weights live in reusable work buffers (contiguous per layer, so the
        batched matmuls run at full speed); ``deltas`` is written once, at the end.
        """
        m = len(tasks)
        dtype = params.dtype
        dev = params.device
        sizes = [t.num_examples for t in tasks]
        n_max = max(sizes)
        if n_max == 0:
            deltas.zero_()
            losses.zero_()
            if bits is not None:
                bits[:] = True
            return
        # private weights, contiguous per layer, starting as copies of the global ones
        shared = self._layer_views(params.unsqueeze(0))  # the global weights, one copy
        weights: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        for li, (w0, b0) in enumerate(shared):
            w = self._buffer(f"w{li}", m * w0[0].numel(), dtype, dev).view(m, *w0.shape[1:])
            w.copy_(w0.expand(m, -1, -1))
            b = None
            if b0 is not None:
                b = self._buffer(f"b{li}", m * b0.shape[1], dtype, dev).view(m, -1)
                b.copy_(b0.expand(m, -1))
            weights.append((w, b))
        n = torch.tensor(sizes, dtype=torch.int64, device=dev)
        uniform = min(sizes) == n_max
        bs = config.batch_size
        steps_per_epoch = -(-n_max // bs)
        gens = [torch.Generator().manual_seed(t.seed) for t in tasks]
        num_features = self.num_features
        xp = self._buffer("x", m * n_max * num_features, dtype, dev).view(m, n_max, num_features)
        yp = self._buffer("y", m * n_max, torch.int64, dev).view(m, n_max)
        if not uniform:  # padded rows must hold finite values: they are masked out
            xp.zero_()
            yp.zero_()
        loss_sum = torch.zeros(m, dtype=dtype, device=dev)
        lr = float(config.lr)
        first = True
        for _ in range(config.local_epochs):
            # each client's own shuffle, drawn exactly as the loop draws it
            for i, (task, gen) in enumerate(zip(tasks, gens, strict=True)):
                if sizes[i] == 0:
                    continue
                order = torch.randperm(sizes[i], generator=gen).to(dev)  # drawn on the CPU, as the loop draws it
                tx = task.x if task.x.dim() == 2 else task.x.reshape(sizes[i], -1)  # images: flattened
                if tx.dtype == dtype:
                    torch.index_select(tx, 0, order, out=xp[i, : sizes[i]])
                else:
                    xp[i, : sizes[i]].copy_(tx.index_select(0, order))
                torch.index_select(task.y, 0, order, out=yp[i, : sizes[i]])
            for step in range(steps_per_epoch):
                lo = step * bs
                hi = min(lo + bs, n_max)
                if uniform:
                    valid = None
                    scale: torch.Tensor | float = 1.0 / (hi - lo)
                else:
                    cnt = (n - lo).clamp(min=0, max=hi - lo)  # examples of each client in this batch
                    valid = torch.arange(hi - lo, device=dev).unsqueeze(0) < cnt.unsqueeze(1)  # [m, b]
                    scale = torch.where(cnt > 0, 1.0 / cnt.clamp(min=1).to(dtype), torch.zeros((), dtype=dtype, device=dev))
                loss_sum += self._step(weights, shared if first else None, xp[:, lo:hi], yp[:, lo:hi], valid, scale, lr)
                first = False
        steps = (-(-n // bs)) * config.local_epochs
        losses.copy_(loss_sum / steps.clamp(min=1).to(dtype))
        for (w, b), (dw, db), (w0, b0) in zip(weights, self._layer_views(deltas), shared, strict=True):
            torch.sub(w, w0, out=dw)
            if b is not None and db is not None and b0 is not None:
                torch.sub(b, b0, out=db)
        if config.clip_norm is not None:  # while the group's rows are still in cache
            below = clip_rows_with_bits_(deltas, config.clip_norm)
            if bits is not None:
                bits[:] = below

    def _step(
        self,
        weights: list[tuple[torch.Tensor, torch.Tensor | None]],
        shared: list[tuple[torch.Tensor, torch.Tensor | None]] | None,
        xb: torch.Tensor,
        yb: torch.Tensor,
        valid: torch.Tensor | None,
        scale: torch.Tensor | float,
        lr: float,
    ) -> torch.Tensor:
        """One SGD step for every client, updating ``weights`` in place; returns each client's
        minibatch mean loss ``[m]``.

        ``valid`` ``[m, b]`` marks real (not padded) rows, ``None`` when all are real; ``scale``
        is ``1 / rows`` per client (0 for a client with no rows in this step), a plain number
        when every client has the same rows. On a group's first step every client still holds
        the global weights: ``shared`` (one copy) then serves the forward pass and input
        gradients as single plain matmuls. Each elementwise stage is one fused kernel
        (``log_softmax``, ``relu``, ``threshold_backward``): on these small per-step tensors
        the cost is the number of kernels, not their arithmetic.
        """
        inputs: list[torch.Tensor] = []
        outputs: list[torch.Tensor | None] = []  # post-ReLU activations, for the ReLU backward
        h = xb
        li = 0
        for layer in self.layers:
            if isinstance(layer, _Linear):
                inputs.append(h)
                if shared is not None:
                    w0, b0 = shared[li]
                    h = torch.matmul(h, w0[0].t())
                    if b0 is not None:
                        h.add_(b0[0])
                else:
                    w, b = weights[li]
                    if b is not None:
                        h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
                    else:
                        h = torch.bmm(h, w.transpose(1, 2))
                outputs.append(None)
                li += 1
            else:
                h = torch.relu_(h)
                outputs[-1] = h  # the ReLU right after Linear li - 1
        # mean cross-entropy per client over its valid rows, and its gradient w.r.t. the logits
        logp = torch.log_softmax(h, dim=2)  # [m, b, C]
        picked = logp.gather(2, yb.unsqueeze(2)).squeeze(2)  # [m, b]
        grad = logp.exp_()  # softmax, in place
        grad.scatter_add_(2, yb.unsqueeze(2), self._neg_ones(yb.shape, grad.dtype, grad.device))
        if valid is None and isinstance(scale, float):
            loss = picked.sum(dim=1).mul_(-scale)
            grad.mul_(scale)
        else:
            if valid is not None:
                picked = picked * valid
            loss = picked.sum(dim=1).neg_().mul_(scale)
            row_scale = torch.as_tensor(scale, dtype=grad.dtype).reshape(-1, 1, 1)
            if valid is not None:
                row_scale = row_scale * valid.unsqueeze(2).to(grad.dtype)
            grad.mul_(row_scale)
        # backward, updating each Linear right after its pre-update weights were used
        for pos in reversed(range(len(weights))):
            w, b = weights[pos]
            out = outputs[pos]
            if out is not None:
                grad = torch.ops.aten.threshold_backward(grad, out, 0)
            grad_in = None
            if pos > 0:
                grad_in = torch.matmul(grad, shared[pos][0][0]) if shared is not None else torch.bmm(grad, w)
            w.baddbmm_(grad.transpose(1, 2), inputs[pos], alpha=-lr)
            if b is not None:
                b.sub_(grad.sum(dim=1), alpha=lr)
            if grad_in is not None:
                grad = grad_in
        return loss

    def _neg_ones(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A ``[m, b, 1]`` tensor of -1 (the one-hot term of the cross-entropy gradient), reused."""
        m, b = shape
        return self._buffer("neg_ones", m * b, dtype, device).fill_(-1.0).view(m, b, 1)
