"""Convolutional models batched across clients: per-client weights stacked, im2col + batched matmuls.

:class:`ConvBatchedSGD` runs the reference per-client algorithm (:meth:`clients.sgd.SGDTrainer.train_client`:
each client's own shuffle from its task seed, minibatches with the last one short, one plain SGD
step per minibatch on the mean loss, ``delta = local - global``, per-client clipping) for a
group of clients at once, for ``nn.Sequential`` stacks of ``Conv2d`` (stride 1, no dilation, one
group), ``ReLU``, ``MaxPool2d`` (non-overlapping), ``Flatten`` and ``Linear`` layers, the
``cnn`` of the model zoo among them (:func:`supports`).

How. Every client's weights are one slice of a ``[clients, ...]`` tensor. A convolution is
``unfold`` (im2col) of all clients' minibatches at once followed by one ``torch.baddbmm`` with
the stacked kernels; a Linear layer is one ``baddbmm``; ReLU and pooling run on all clients'
feature maps as one tensor. The per-client losses are summed and autograd gives every client's
gradient of its own minibatch loss (a client's weights touch only its own loss), so each step is
a dozen large kernels instead of a dozen tiny ones per client: on 8x8 images the per-client loop
spends its time on per-operation overhead (~2 % of the FLOP bound). Clients with fewer examples
are padded with rows of loss weight exactly 0 and a client whose epoch is over takes an exactly
zero step, so results equal the loop's up to floating-point summation order (equality tests in
float64: ``tests/engine/test_trainer_paths.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from clients.concurrent import train_concurrently
from clients.functional import fixed_groups
from fedsim.privacy.clipping import clip_rows_with_bits_
from fedsim.tasks import Task
from fedsim.types import ClientTask, CohortChunk, TrainConfig

#: Clients per group: large enough to amortise per-kernel overhead, small enough that the
#: group's activations (``clients x batch x channels x H x W`` per layer) stay in cache.
GROUP = 64


def supports(model: nn.Module) -> bool:
    """Whether :class:`ConvBatchedSGD` can train ``model``: an ``nn.Sequential`` of Conv2d (stride 1,
    dilation 1, groups 1, integer zero padding), ReLU, MaxPool2d (kernel = stride, no padding),
    Flatten (of the whole example) and Linear layers, with at least one Conv2d."""
    if not isinstance(model, nn.Sequential):
        return False
    has_conv = False
    for m in model:
        if type(m) is nn.Conv2d:
            ok = (m.stride == (1, 1) and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros"
                  and isinstance(m.padding, tuple) and m.kernel_size[0] == m.kernel_size[1])
            if not ok:
                return False
            has_conv = True
        elif type(m) is nn.MaxPool2d:
            k, s = m.kernel_size, m.stride
            if not isinstance(k, int) or s not in (k, (k, k)) or m.padding != 0 or m.dilation != 1 or m.ceil_mode:
                return False
        elif type(m) is nn.Flatten:
            if (m.start_dim, m.end_dim) != (1, -1):
                return False
        elif type(m) not in (nn.ReLU, nn.Linear):
            return False
    return has_conv


class ConvBatchedSGD:
    """Trains groups of clients of a convolutional ``Sequential`` model at once.

    Parameters
    ----------
    model:
        Template model (:func:`supports` must hold); only its architecture is read.
    objective:
        The task whose loss is minimised (classification).
    """

    def __init__(self, model: nn.Module, objective: Task) -> None:
        if not supports(model):
            raise ValueError("the conv path needs an nn.Sequential of Conv2d / ReLU / MaxPool2d / Flatten / Linear layers")
        self.layers = list(model)
        self.objective = objective
        self.shapes = [p.shape for p in model.parameters()]
        self.num_params = sum(p.numel() for p in model.parameters())
        #: clients per group (``GROUP`` unless set: benchmarks, tests)
        self.group = GROUP

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
        groups = fixed_groups(tasks, chunk_size, self.group)
        if workers == 1:
            for group in groups:
                yield self.train_chunk(params, group, config)
            return
        yield from train_concurrently(lambda group: self.train_chunk(params, group, config), groups, workers)

    def _forward(self, weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Logits ``[m, b, classes]`` of every client's minibatch ``x`` ``[m, b, C, H, W]``.

        Feature maps are kept as ``[b, m x channels, H, W]``: every client's channels side by side,
        so a convolution is one grouped convolution (``groups = m``) with the clients' stacked
        kernels, and ReLU and pooling act on all clients at once without any layout change.
        """
        m, b = x.shape[:2]
        h = x.transpose(0, 1).reshape(b, m * x.shape[2], *x.shape[3:])
        wi = 0
        grouped = True
        for layer in self.layers:
            if isinstance(layer, nn.Conv2d):
                w = weights[wi]
                bias = weights[wi + 1] if layer.bias is not None else None
                wi += 2 if layer.bias is not None else 1
                h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), bias.reshape(-1) if bias is not None else None,
                             padding=layer.padding, groups=m)
            elif isinstance(layer, nn.MaxPool2d):
                h = F.max_pool2d(h, layer.kernel_size)
            elif isinstance(layer, nn.ReLU):
                h = torch.relu(h)
            elif isinstance(layer, nn.Flatten):
                h = h.reshape(b, m, -1).transpose(0, 1)  # [m, b, features]: one layout change
                grouped = False
            else:  # Linear
                if grouped:
                    raise ValueError("a Linear layer after a convolution needs a Flatten between them")
                w = weights[wi]
                bias = weights[wi + 1] if layer.bias is not None else None
                wi += 2 if layer.bias is not None else 1
                h = torch.baddbmm(bias.unsqueeze(1), h, w.transpose(1, 2)) if bias is not None else torch.bmm(h, w.transpose(1, 2))
        return h

    def train_chunk(self, params: torch.Tensor, tasks: Sequence[ClientTask], config: TrainConfig) -> CohortChunk:
        """Train ``tasks`` from the flat ``params``; one :class:`CohortChunk` in task order."""
        if params.dim() != 1 or params.numel() != self.num_params:
            raise ValueError(f"flat parameters have shape {tuple(params.shape)}, model needs ({self.num_params},)")
        m = len(tasks)
        dtype, dev = params.dtype, params.device
        sizes = [t.num_examples for t in tasks]
        n_max = max(sizes, default=0)
        ids = np.fromiter((t.device_id for t in tasks), dtype=np.int64, count=m)
        counts = torch.tensor(sizes, dtype=torch.int64)
        rounds = np.full(m, config.round, dtype=np.int64)
        if n_max == 0:
            return CohortChunk(ids, torch.zeros(m, self.num_params, dtype=dtype, device=dev), counts, torch.zeros(m), rounds)
        flat = params.unsqueeze(0).repeat(m, 1)  # every client's private parameters, one row each
        weights: list[torch.Tensor] = []
        offset = 0
        for shape in self.shapes:
            k = int(np.prod(shape)) if len(shape) else 1
            weights.append(flat[:, offset : offset + k].view(m, *shape))
            offset += k
        x0 = tasks[0].x
        xp = torch.zeros(m, n_max, *x0.shape[1:], dtype=dtype, device=dev)
        yp = torch.zeros(m, n_max, dtype=torch.int64, device=dev)
        gens = [torch.Generator().manual_seed(t.seed) for t in tasks]
        n = torch.tensor(sizes, device=dev)
        bs = config.batch_size
        steps_per_epoch = -(-n_max // bs)
        loss_sum = torch.zeros(m, dtype=torch.float64, device=dev)
        lr = float(config.lr)
        for _ in range(config.local_epochs):
            for i, (task, gen) in enumerate(zip(tasks, gens, strict=True)):
                if sizes[i] == 0:
                    continue
                order = torch.randperm(sizes[i], generator=gen).to(dev)  # drawn on the CPU, as the loop draws it
                xp[i, : sizes[i]] = task.x.index_select(0, order)
                yp[i, : sizes[i]] = task.y.index_select(0, order)
            for step in range(steps_per_epoch):
                lo, hi = step * bs, min(step * bs + bs, n_max)
                valid = (torch.arange(lo, hi, device=dev).unsqueeze(0) < n.unsqueeze(1)).to(dtype)  # [m, b]
                leaves = [w.detach().requires_grad_(True) for w in weights]
                logits = self._forward(leaves, xp[:, lo:hi])
                per = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yp[:, lo:hi].reshape(-1), reduction="none")
                per = per.reshape(m, hi - lo) * valid
                losses = per.sum(dim=1) / valid.sum(dim=1).clamp(min=1)  # each client's minibatch mean
                grads = torch.autograd.grad(losses.sum(), leaves)
                with torch.no_grad():
                    for w, g in zip(weights, grads, strict=True):
                        w.sub_(g, alpha=lr)
                loss_sum += losses.detach().to(torch.float64)
        deltas = flat.sub_(params)
        bits = None
        if config.clip_norm is not None:
            bits = clip_rows_with_bits_(deltas, config.clip_norm)
        steps = (-(-n // bs)) * config.local_epochs
        losses_out = (loss_sum / steps.clamp(min=1).to(torch.float64)).to(torch.float32).cpu()
        return CohortChunk(ids, deltas.detach(), counts, losses_out, rounds, below_clip=bits)
