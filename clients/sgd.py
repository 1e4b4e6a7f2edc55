"""Plain local SGD, one client at a time: the reference trainer every faster path must match.

Each client starts from the global flat parameters, runs ``local_epochs`` passes of minibatch SGD
(shuffled with a generator seeded from the client's task seed) on mean cross-entropy, and reports
``delta = local - global`` clipped to ``clip_norm`` when the round asks for clipping.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fedsim.client import ClientResult, ClientTrainer
from fedsim.models import get_flat, set_flat
from fedsim.privacy.clipping import clip_by_norm
from fedsim.types import ClientTask, TrainConfig


class SGDTrainer(ClientTrainer):
    """Minibatch SGD on the device's data (no momentum, no weight decay)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)

    def train_client(self, params: torch.Tensor, task: ClientTask, config: TrainConfig) -> ClientResult:
        model = self.model
        set_flat(model, params)
        n = task.num_examples
        if n == 0:
            return ClientResult(torch.zeros_like(params), 0, 0.0)
        gen = torch.Generator().manual_seed(task.seed)
        weights = list(model.parameters())
        total_loss, steps = 0.0, 0
        for _ in range(config.local_epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, config.batch_size):
                idx = order[start : start + config.batch_size]
                loss = F.cross_entropy(model(task.x[idx]), task.y[idx])
                grads = torch.autograd.grad(loss, weights)
                with torch.no_grad():
                    for w, g in zip(weights, grads, strict=True):
                        w.sub_(config.lr * g)
                total_loss += float(loss.detach())
                steps += 1
        delta = get_flat(model) - params
        if config.clip_norm is not None:
            delta = clip_by_norm(delta, config.clip_norm)
        return ClientResult(delta, n, total_loss / steps)
