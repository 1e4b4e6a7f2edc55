"""The example-level DP trainer (Opacus DP-SGD on the device)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from clients.opacus_trainer import OpacusTrainer, example_level_epsilon, local_schedule
from fedsim.client import TRAINERS
from fedsim.engine import run_scenario
from fedsim.errors import ScenarioError
from fedsim.models import build_model, get_flat
from fedsim.scenario import scenario_from_dict
from fedsim.types import ClientTask, TrainConfig

from .test_tree_noise import std_matches


def _model(hidden: int = 16) -> torch.nn.Module:
    return build_model("mlp", num_features=64, num_classes=10, hidden=hidden, seed=1)


def _task(device: int, n: int, seed: int) -> ClientTask:
    gen = torch.Generator().manual_seed(1000 + device)
    return ClientTask(device, torch.randn(n, 64, generator=gen), torch.randint(0, 10, (n,), generator=gen), seed)


def _reference_epsilon(z: float, q: float, steps: int, delta: float) -> float:
    """Independent reference: Google's dp_accounting RDP accountant (integer orders)."""
    import dp_accounting

    acc = dp_accounting.rdp.RdpAccountant(orders=list(range(2, 64)))
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    return float(acc.get_epsilon(delta))


def test_registered_and_validates_its_parameters() -> None:
    assert TRAINERS.get("opacus") is OpacusTrainer
    for kwargs, key in (
        ({"noise_multiplier": 0}, "noise-multiplier"),
        ({"max_grad_norm": -1}, "max-grad-norm"),
        ({"target_delta": 1.0}, "target-delta"),
        ({"max_participations": 0}, "max-participations"),
    ):
        with pytest.raises(ValueError, match=f"^{key} "):
            OpacusTrainer(_model(), **kwargs)
    with pytest.raises(ScenarioError, match="unknown key 'noise' \\(did you mean 'noise-multiplier'\\?\\); .*; parameters of trainer 'opacus': max-grad-norm"):
        scenario_from_dict({"name": "x", "client": {"trainer": "opacus", "noise": 1.0}})


def test_deltas_are_clipped_and_reproducible_from_the_secret_source_only() -> None:
    from fedsim.privacy.noise import NoiseSource

    model = _model()
    trainer = OpacusTrainer(model, noise_multiplier=1.0, max_grad_norm=1.0)
    params = get_flat(model)
    config = TrainConfig(round=0, lr=0.5, local_epochs=2, batch_size=4, clip_norm=0.3)
    # a device (no private source): every task draws fresh secret seeds, whatever the task seed
    a = trainer.train_client(params, _task(1, 17, seed=7), config)
    b = trainer.train_client(params, _task(1, 17, seed=7), config)
    assert not torch.equal(a.delta, b.delta)
    # simulation: the seeds come from the run's secret source and (round, device), not the task seed
    trainer.set_private_source(NoiseSource.from_seed(5))
    for dev, n in enumerate((1, 5, 17)):
        a = trainer.train_client(params, _task(dev, n, seed=7), config)
        b = trainer.train_client(params, _task(dev, n, seed=8), config)
        assert a.delta.dtype == torch.float32 and a.delta.shape == params.shape
        assert float(a.delta.norm()) <= 0.3 * (1 + 1e-5)
        assert torch.equal(a.delta, b.delta) and a.loss == b.loss  # the task seed plays no part
        trainer.set_private_source(NoiseSource.from_seed(6))
        c = trainer.train_client(params, _task(dev, n, seed=7), config)
        trainer.set_private_source(NoiseSource.from_seed(5))
        assert not torch.equal(a.delta, c.delta)
        assert a.num_examples == n and math.isfinite(a.loss)
    empty = trainer.train_client(params, ClientTask(9, torch.zeros(0, 64), torch.zeros(0, dtype=torch.int64), 1), config)
    assert empty.num_examples == 0 and not empty.delta.any()


def test_each_local_step_adds_dp_sgd_noise_of_std_z_c_over_the_expected_batch() -> None:
    """One full-batch step (q = 1): delta = -lr (sum of clipped grads + N(0, (zC)^2)) / B."""
    model = build_model("logreg", num_features=64, num_classes=10, seed=2)
    z, c, lr, b = 6.0, 1.0, 1.0, 8
    trainer = OpacusTrainer(model, noise_multiplier=z, max_grad_norm=c)
    deltas = [
        trainer.train_client(get_flat(model), _task(d, b, seed=d), TrainConfig(round=0, lr=lr, local_epochs=1, batch_size=b)).delta
        for d in range(20)
    ]
    samples = torch.cat(deltas)  # the gradient part is at most lr * c per client: negligible here
    sigma = lr * z * c / b
    assert std_matches(samples, sigma)
    assert not std_matches(samples, sigma * 2 / 3) and not std_matches(samples, sigma * 1.5)


def test_example_level_epsilon_matches_an_independent_accountant() -> None:
    model = _model()
    trainer = OpacusTrainer(model, noise_multiplier=1.1, max_grad_norm=1.0, target_delta=1e-5, max_participations=3)
    params = get_flat(model)
    config = TrainConfig(round=0, lr=0.1, local_epochs=2, batch_size=4)
    for dev, n in enumerate((6, 12, 40)):
        trainer.train_client(params, _task(dev, n, seed=dev), config)
    report = trainer.example_privacy()
    assert report is not None and report["unit"] == "example"
    # the worst device: 6 examples, batch 4 -> 2 batches, q = 1/2, 2 epochs x 2 steps x 3 participations
    assert local_schedule(6, 4, 2) == (0.5, 4)
    assert report["sampling_rate"] == 0.5 and report["local_steps"] == 12 and report["max_participations"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = _reference_epsilon(1.1, 0.5, 12, 1e-5)
    # Opacus also uses fractional orders, so it is at most the integer-order reference, and close
    assert report["epsilon"] <= reference * (1 + 1e-9)
    assert report["epsilon"] >= 0.95 * reference
    for n in (6, 12, 40):
        q, steps = local_schedule(n, 4, 2)
        assert report["epsilon"] >= example_level_epsilon(1.1, q, steps * 3, 1e-5)
    # without a configured limit: the participations actually made (device 0 twice)
    observed = OpacusTrainer(model, noise_multiplier=1.1, max_grad_norm=1.0)
    for _ in range(2):
        observed.train_client(params, _task(0, 6, seed=0), config)
    assert observed.example_privacy()["max_participations"] == 2
    # the delta: target-delta when set, else the scenario's (the engine passes it), else 1e-6
    assert observed.example_privacy(delta=1e-5)["epsilon"] == pytest.approx(example_level_epsilon(1.1, 0.5, 8, 1e-5))
    assert observed.example_privacy()["delta"] == 1e-6
    fixed = OpacusTrainer(model, noise_multiplier=1.1, max_grad_norm=1.0, target_delta=1e-3)
    fixed.train_client(params, _task(0, 6, seed=0), config)
    assert fixed.example_privacy(delta=1e-5)["delta"] == 1e-3


def test_example_level_dp_run_reports_it_separately(tmp_path: Path) -> None:
    raw = {
        "name": "opacus",
        "rounds": 3,
        "clients-per-round": 6,
        "data": {"num-devices": 40},
        "model": {"name": "logreg"},
        "client": {"trainer": "opacus", "batch-size": 8, "lr": 0.5, "noise-multiplier": 1.0, "max-grad-norm": 1.0,
                   "max-participations": 2},
        "strategy": {"name": "dp-fedavg", "noise-multiplier": 1.0, "clip-norm": 0.5, "max-participations": 2},
    }
    run_scenario(scenario_from_dict(raw), run_dir=tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    example = summary["example_level"]
    assert math.isfinite(example["epsilon"]) and example["epsilon"] > 0
    assert example["delta"] == summary["delta"] == 1e-6  # the scenario's [privacy] delta
    assert example["max_participations"] == 2
    assert summary["rejected"] is None  # private in a DP run ...
    private = json.loads((tmp_path / "run" / "private" / "summary.json").read_text())
    assert private["rejected"] == {}  # ... where every delta was within the round's clip bound
    assert summary["rho"] == pytest.approx(2 / (2 * 1.0**2))  # user level: 2 contributions at z = 1
    assert summary["epsilon"] != example["epsilon"]
