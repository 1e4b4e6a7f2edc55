"""Batched cohort training equals the per-client reference loop; training never aliases params."""

from __future__ import annotations

import torch

from clients.sgd import SGDTrainer
from fedsim.models import build_model, get_flat
from fedsim.types import ClientTask, TrainConfig


def _task(device: int, n: int, num_features: int, dtype: torch.dtype = torch.float32) -> ClientTask:
    gen = torch.Generator().manual_seed(10_000 + device)
    x = torch.randn(n, num_features, generator=gen, dtype=dtype)
    y = torch.randint(0, 10, (n,), generator=gen)
    return ClientTask(device, x, y, seed=777 + device)


def test_training_a_client_leaves_the_global_params_untouched() -> None:
    model = build_model("mlp", num_features=12, num_classes=10, hidden=8, seed=1)
    params = get_flat(model)
    before = params.clone()
    result = SGDTrainer(model).train_client(params, _task(0, 40, 12), TrainConfig(round=0, lr=0.5, local_epochs=2, batch_size=8))
    assert torch.equal(params, before)
    assert result.delta.abs().max() > 1e-3
