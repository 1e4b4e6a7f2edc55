"""One contract suite, run against every registered client trainer (as the strategy suite)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.client import TRAINERS, ClientResult, ClientTrainer
from fedsim.engine import run_scenario
from fedsim.models import build_model, get_flat
from fedsim.privacy.noise import NoiseSource
from fedsim.scenario import scenario_from_dict
from fedsim.types import ClientTask, TrainConfig

NAMES = TRAINERS.names()
FEATURES, CLASSES = 12, 4


def _model() -> torch.nn.Module:
    return build_model("logreg", num_features=FEATURES, num_classes=CLASSES, seed=1)


def _task(device: int, n: int = 20, seed: int = 7) -> ClientTask:
    gen = torch.Generator().manual_seed(1000 + device)
    x = torch.randn(n, FEATURES, generator=gen)
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    return ClientTask(device, x, y, seed + device)


def _trainer(name: str) -> ClientTrainer:
    return TRAINERS.get(name)(_model())


CONFIG = TrainConfig(round=3, lr=0.1, local_epochs=1, batch_size=8)


@pytest.mark.parametrize("name", NAMES)
def test_constructible_with_defaults(name: str) -> None:
    trainer = _trainer(name)
    assert isinstance(trainer, ClientTrainer)
    report = trainer.example_privacy()
    assert report is None or isinstance(report, dict)


@pytest.mark.parametrize("name", NAMES)
def test_train_client_reports_a_finite_delta_and_leaves_params_alone(name: str) -> None:
    trainer = _trainer(name)
    params = get_flat(_model())
    before = params.clone()
    result = trainer.train_client(params, _task(0), CONFIG)
    assert isinstance(result, ClientResult)
    assert result.delta.shape == params.shape and result.delta.dtype == torch.float32
    assert torch.isfinite(result.delta).all() and float(result.delta.norm()) > 0
    assert result.num_examples == 20 and np.isfinite(result.loss)
    assert torch.equal(params, before)


@pytest.mark.parametrize("name", NAMES)
def test_train_client_is_a_function_of_params_task_and_config(name: str) -> None:
    params = get_flat(_model())

    def make() -> ClientTrainer:
        trainer = _trainer(name)
        set_private = getattr(trainer, "set_private_source", None)
        if callable(set_private):  # DP-SGD noise comes from the run's secret source, not the task seed
            set_private(NoiseSource.from_seed(17))
        return trainer

    a = make().train_client(params, _task(1), CONFIG)
    b = make().train_client(params, _task(1), CONFIG)
    assert torch.equal(a.delta, b.delta)
    if not callable(getattr(_trainer(name), "set_private_source", None)):
        other_seed = make().train_client(params, _task(1, seed=99), CONFIG)
        assert not torch.equal(a.delta, other_seed.delta)


@pytest.mark.parametrize("name", NAMES)
def test_delta_is_clipped_to_the_rounds_clip_norm(name: str) -> None:
    params = get_flat(_model())
    clip = 1e-3
    clipped = TrainConfig(round=3, lr=0.5, local_epochs=2, batch_size=4, clip_norm=clip)
    result = _trainer(name).train_client(params, _task(2), clipped)
    assert float(torch.linalg.vector_norm(result.delta.double())) <= clip * (1 + 1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_train_cohort_matches_train_client_in_order_and_chunks(name: str) -> None:
    params = get_flat(_model())
    tasks = [_task(d, n=8 + d) for d in (5, 2, 9, 4, 7)]
    chunks = list(_trainer(name).train_cohort(params, iter(tasks), CONFIG, chunk_size=2))
    assert [len(c.device_ids) for c in chunks] == [2, 2, 1]
    ids = np.concatenate([c.device_ids for c in chunks])
    assert ids.tolist() == [5, 2, 9, 4, 7]
    assert all(c.rounds is None or (np.asarray(c.rounds) == CONFIG.round).all() for c in chunks)
    deltas = torch.cat([c.deltas for c in chunks])
    counts = torch.cat([c.num_examples for c in chunks])
    assert counts.tolist() == [t.num_examples for t in tasks]
    if callable(getattr(_trainer(name), "set_private_source", None)):
        return  # DP-SGD noise is fresh secret randomness per client: no two calls agree
    for task, delta in zip(tasks, deltas, strict=True):
        single = _trainer(name).train_client(params, task, CONFIG)
        torch.testing.assert_close(delta, single.delta, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_adaptive_clipping_bits_say_which_updates_fit_before_clipping(name: str) -> None:
    """Every chunk's bits (stated by the trainer, or read off the clipped deltas by the server)
    are ``||delta|| <= C`` on the deltas before clipping."""
    from fedsim.engine.aggregation import UpdateAccumulator

    if callable(getattr(_trainer(name), "set_private_source", None)):
        return  # DP-SGD noise is fresh per call: the unclipped and clipped runs differ
    params = get_flat(_model())
    tasks = [_task(d, n=4 + 3 * d) for d in range(8)]
    config = TrainConfig(round=3, lr=0.5, local_epochs=2, batch_size=4)
    raw = torch.cat([c.deltas for c in _trainer(name).train_cohort(params, iter(tasks), config, chunk_size=3)])
    norms = sorted(float(torch.linalg.vector_norm(r.double())) for r in raw)
    clip = (norms[3] + norms[4]) / 2  # half fit
    clipped = TrainConfig(round=3, lr=0.5, local_epochs=2, batch_size=4, clip_norm=clip)
    acc = UpdateAccumulator(num_params=params.numel(), round=3, clip_norm=clip, weighting="uniform",
                            ledger=None, num_devices=8)
    for chunk in _trainer(name).train_cohort(params, iter(tasks), clipped, chunk_size=3):
        acc.add(chunk)
    assert acc.num_updates == 8 and acc.result().num_below_clip == 4


@pytest.mark.parametrize("name", NAMES)
def test_runs_end_to_end_in_engine(name: str) -> None:
    raw = {
        "name": "trainer-contract",
        "rounds": 2,
        "clients-per-round": 6,
        "data": {"dataset": "synthetic", "num-devices": 20, "examples-per-device": 8, "num-features": FEATURES},
        "model": {"name": "logreg"},
        "client": {"trainer": name, "batch-size": 4},
        "strategy": {"name": "fedavg"},
    }
    result = run_scenario(scenario_from_dict(raw))
    assert [m["clients"] for m in result.metrics] == [6, 6]
    assert result.summary["rejected"] == {} and torch.isfinite(result.params).all()


class _MinimalTrainer(ClientTrainer):
    """A user trainer that implements only the one abstract hook (plain local SGD, clipped)."""

    def train_client(self, params: torch.Tensor, task: ClientTask, config: TrainConfig) -> ClientResult:
        from fedsim.privacy.clipping import clip_by_norm

        weight = params[: FEATURES * CLASSES].view(CLASSES, FEATURES).clone().requires_grad_(True)
        bias = params[FEATURES * CLASSES :].clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(task.x @ weight.T + bias, task.y)
        loss.backward()
        delta = -config.lr * torch.cat([weight.grad.reshape(-1), bias.grad])
        if config.clip_norm is not None:
            delta = clip_by_norm(delta, config.clip_norm)
        return ClientResult(delta.detach(), int(len(task.y)), loss.item())


def test_a_trainer_with_only_train_client_runs_dp_and_checkpointed_with_every_hook_defaulted(tmp_path) -> None:
    """Every hook the engine calls (describe, set_private_source, state_dict, example_privacy) is
    declared on ClientTrainer with a default: the engine never probes for them."""
    trainer = _MinimalTrainer(_model())
    assert trainer.describe() is None and trainer.state_dict() is None and trainer.example_privacy() is None
    trainer.set_private_source(NoiseSource.from_seed(1))  # accepted and unused
    with pytest.raises(ValueError, match="keeps no state"):
        trainer.load_state_dict({"x": 1})
    raw = {
        "name": "minimal-trainer",
        "rounds": 2,
        "clients-per-round": 6,
        "data": {
            "dataset": "synthetic", "num-devices": 20, "examples-per-device": 8, "num-features": FEATURES,
            "num-classes": CLASSES,
        },
        "model": {"name": "logreg"},
        "client": {"trainer": f"{__name__}:_MinimalTrainer"},
        "strategy": {"name": "dp-ftrl", "noise-multiplier": 1.0, "clip-norm": 0.5},
        "checkpoint": {"every": 1},
    }
    result = run_scenario(scenario_from_dict(raw), run_dir=tmp_path / "run")
    assert result.summary["rounds"] == 2 and "trainer" not in result.summary
    assert result.summary["rho"] is not None and torch.isfinite(result.params).all()
