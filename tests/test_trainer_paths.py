"""Every trainer path equals the per-client reference, for every built-in model (float64).

The reference is :meth:`SGDTrainer.train_client` (one client at a time). Unequal device sizes
(empty, one example, short last batch), two epochs and clipping are covered; losses too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clients.sgd import SGDTrainer
from fedsim.data import DataSpec
from fedsim.models import build_model
from fedsim.tasks import Task
from fedsim.types import ClientTask, TrainConfig

SIZES = [5, 0, 1, 9, 4, 8, 3]
TEXT = DataSpec("next-token", (6,), 12, pad_id=0, oov_ids=(2,), eos_id=1)
CASES = {
    "logreg": (DataSpec("classification", (5,), 3), {}, ["batched", "vmap", "loop"]),
    "mlp": (DataSpec("classification", (1, 2, 3), 3), {"hidden": 7}, ["batched", "vmap", "loop"]),
    "cnn": (DataSpec("classification", (1, 8, 8), 10), {"channels": (3, 4), "hidden": 8}, ["vmap", "loop"]),
    "lstm-lm": (TEXT, {"hidden": 8, "embedding": 4}, ["vmap", "loop"]),
    "transformer-lm": (TEXT, {"dim": 8, "heads": 2, "layers": 1}, ["vmap", "loop"]),
}
#: clipping bound per model (both settings are covered across models; clipping is per row either way)
CLIP = {"logreg": None, "mlp": 0.05, "cnn": 0.05, "lstm-lm": None, "transformer-lm": 0.05}
AUTO = {"logreg": "batched", "mlp": "batched", "cnn": "loop", "lstm-lm": "loop", "transformer-lm": "loop"}


def _tasks(spec: DataSpec) -> list[ClientTask]:
    gen = torch.Generator().manual_seed(42)
    tasks = []
    for i, n in enumerate(SIZES):
        if spec.task == "next-token":
            x = torch.randint(0, spec.num_classes, (n, *spec.input_shape), generator=gen)
            y = torch.randint(0, spec.num_classes, (n, *spec.input_shape), generator=gen)
            y[:, -2:] = 0  # padded tails
        else:
            x = torch.randn(n, *spec.input_shape, generator=gen, dtype=torch.float64)
            y = torch.randint(0, spec.num_classes, (n,), generator=gen)
        tasks.append(ClientTask(i, x, y, seed=1000 + i))
    return tasks


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_path_equals_the_per_client_reference(name: str) -> None:
    spec, params, paths = CASES[name]
    clip = CLIP[name]
    model = build_model(name, spec=spec, params=params, seed=7).double()
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    tasks = _tasks(spec)
    config = TrainConfig(round=2, lr=0.3, local_epochs=2, batch_size=4, clip_norm=clip)
    reference = SGDTrainer(model, path="loop")
    reference.objective = Task(spec)
    expected = [reference.train_client(flat, t, config) for t in tasks]
    ref_deltas = torch.stack([r.delta for r in expected])
    assert ref_deltas.abs().max() > 1e-3
    auto = SGDTrainer(model)
    auto.objective = Task(spec)
    assert auto.describe()["path"] == AUTO[name]
    for path in paths:
        for workers in (1, 2) if path != "batched" else (1,):  # batched threads: tests/test_batched_training.py
            trainer = SGDTrainer(model, path=path, workers=workers)
            trainer.objective = Task(spec)
            chunks = list(trainer.train_cohort(flat, iter(tasks), config, chunk_size=3))
            assert max(len(c.device_ids) for c in chunks) <= 3
            deltas = torch.cat([c.deltas for c in chunks]).double()
            torch.testing.assert_close(deltas, ref_deltas, rtol=0, atol=1e-9, msg=f"{name} {path} x{workers}")
            losses = torch.cat([c.losses for c in chunks])
            torch.testing.assert_close(losses, torch.tensor([r.loss for r in expected], dtype=torch.float32), rtol=1e-5, atol=1e-6)
            assert np.array_equal(np.concatenate([c.device_ids for c in chunks]), np.arange(len(tasks)))
            assert torch.all(deltas[1] == 0)
            if clip is not None:
                assert torch.all(torch.linalg.vector_norm(deltas, dim=1) <= clip * (1 + 1e-9))


def test_measure_picks_a_path_and_says_why() -> None:
    spec, params, _ = CASES["mlp"]
    model = build_model("mlp", spec=spec, params=params, seed=1).double()
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    trainer = SGDTrainer(model, path="measure")
    trainer.objective = Task(spec)
    tasks = _tasks(spec) * 3
    config = TrainConfig(round=0, lr=0.1, local_epochs=1, batch_size=4)
    chunks = list(trainer.train_cohort(flat, iter(tasks), config))
    assert sum(len(c.device_ids) for c in chunks) == len(tasks)  # the measured clients are trained too
    info = trainer.describe()
    assert info["path"] in ("batched", "vmap", "loop") and info["reason"].startswith("measured on")
    for path in ("batched", "vmap", "loop"):
        assert f"{path} " in info["reason"]
