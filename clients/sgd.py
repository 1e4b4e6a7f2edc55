"""Plain local SGD, one client at a time: the reference trainer every faster path must match.

Each client starts from the global flat parameters, runs ``local_epochs`` passes of minibatch SGD
(shuffled with a generator seeded from the client's task seed) on mean cross-entropy, and reports
``delta = local - global`` clipped to ``clip_norm`` when the round asks for clipping.

:meth:`SGDTrainer.train_cohort` (what the simulator calls) trains Linear/ReLU ``Sequential``
models (logreg, mlp) with the batched implementation in :mod:`clients.batched`, which runs this
same algorithm for a whole group of clients at once (equal within float tolerance, see
``tests/test_batched_training.py``); other models, or ``[client] batched = false``, use this
per-client loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from clients.batched import BatchedSGD, supports
from fedsim.client import ClientResult, ClientTrainer
from fedsim.models import get_flat, set_flat
from fedsim.privacy.clipping import clip_by_norm
from fedsim.types import ClientTask, CohortChunk, TrainConfig


class SGDTrainer(ClientTrainer):
    """Minibatch SGD on the device's data (no momentum, no weight decay).

    Parameters
    ----------
    model:
        Template model.
    batched:
        Train cohorts with :class:`clients.batched.BatchedSGD` when the model supports it
        (default); ``False`` always loops over :meth:`train_client`.
    workers:
        Groups the batched path trains at once, each on its own single-threaded torch thread;
        ``None`` (default): the torch thread count in effect when a cohort is trained, which the
        engine sets from ``[engine] threads``. The per-client loop uses torch's own threads.
    """

    def __init__(self, model: nn.Module, batched: bool = True, workers: int | None = None) -> None:
        super().__init__(model)
        if not isinstance(batched, bool):
            raise ValueError(f"batched must be true or false, got {batched!r}")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
        self.batched = BatchedSGD(model) if batched and supports(model) else None
        self.workers = workers

    def train_cohort(
        self,
        params: torch.Tensor,
        tasks: Iterable[ClientTask],
        config: TrainConfig,
        *,
        chunk_size: int = 256,
    ) -> Iterator[CohortChunk]:
        """Train many clients: batched when the model allows it, else the per-client loop."""
        if self.batched is None:
            return super().train_cohort(params, tasks, config, chunk_size=chunk_size)
        workers = self.workers if self.workers is not None else torch.get_num_threads()
        return self.batched.train_cohort(
            params.to(next(self.model.parameters()).dtype), tasks, config, chunk_size=chunk_size, workers=workers
        )

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
