"""The example-level DP trainer (Opacus DP-SGD on the device)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

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


class _TorchCalls(TorchFunctionMode):
    """Records the name of every torch function called inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.names.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


#: torch's random functions: drawing through any of them (with a seeded generator or the global
#: one) would put the example-level noise or sampling in a generator the server can enumerate
TORCH_RANDOM = {
    "normal", "normal_", "rand", "rand_like", "randn", "randn_like", "randint", "randint_like",
    "randperm", "bernoulli", "bernoulli_", "uniform_", "multinomial", "poisson", "exponential_",
    "geometric_", "cauchy_", "log_normal_", "random_", "dropout", "manual_seed", "seed",
}


def test_no_torch_random_function_runs_while_a_device_trains() -> None:
    """The attack on the old trainer: its noise came from ``torch.Generator().manual_seed(s)`` (32
    bits kept), so the server enumerated ``s`` and regenerated the noise. Now no torch random
    function runs at all, on a device or in simulation: nothing to enumerate."""
    from fedsim.privacy.noise import NoiseSource

    model = _model()
    trainer = OpacusTrainer(model, noise_multiplier=1.0, max_grad_norm=1.0)
    params = get_flat(model)
    config = TrainConfig(round=2, lr=0.5, local_epochs=2, batch_size=4, clip_norm=0.3)
    trainer.train_client(params, _task(1, 17, seed=7), config)  # imports, first-use set-up
    task = _task(1, 17, seed=7)
    for source in (None, NoiseSource.from_seed(5)):
        trainer.set_private_source(source)
        with _TorchCalls() as calls:
            trainer.train_client(params, task, config)
        assert "linear" in calls.names and "einsum" in calls.names  # the mode sees Opacus's work
        assert not calls.names & TORCH_RANDOM, calls.names & TORCH_RANDOM
    # nor does the trainer's code build or seed a torch generator anywhere
    import ast
    import inspect

    import clients.opacus_trainer as module

    calls = {
        node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        for node in ast.walk(ast.parse(inspect.getsource(module)))
        if isinstance(node, ast.Call)
    }
    assert not calls & {"manual_seed", "Generator", "seed"}, calls & {"manual_seed", "Generator", "seed"}
    # and torch's global generator plays no part: reseeding it changes nothing
    trainer.set_private_source(NoiseSource.from_seed(5))
    torch.manual_seed(0)
    a = trainer.train_client(params, _task(1, 17, seed=7), config)
    torch.manual_seed(1)
    b = trainer.train_client(params, _task(1, 17, seed=7), config)
    assert torch.equal(a.delta, b.delta)


def _clipped_gradient_sum(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> torch.Tensor:
    """Sum of per-example gradients clipped as Opacus clips them, one example at a time."""
    total = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    for i in range(len(y)):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
        total += g * min(1.0, clip / (float(g.norm()) + 1e-6))
    return total


def test_the_noise_is_the_run_keys_stream_and_replays_in_simulation() -> None:
    """One full-batch step (q = 1, every example sampled), by hand: the delta is
    ``-lr (clipped gradient sum + z C xi) / B`` with ``xi`` the normals of the stream
    ``(TAG_CLIENT, round, device, USE_NOISE, 0)`` of the run's key, nothing else."""
    from clients.opacus_trainer import USE_NOISE
    from fedsim.models import set_flat
    from fedsim.privacy.noise import TAG_CLIENT, NoiseSource

    model = build_model("logreg", num_features=64, num_classes=10, seed=2)
    params = get_flat(model)
    z, c, lr, b = 1.3, 0.7, 0.5, 8
    source = NoiseSource.from_seed(11)  # a public key: this test recomputes the noise
    trainer = OpacusTrainer(model, noise_multiplier=z, max_grad_norm=c)
    trainer.set_private_source(source)
    task = _task(3, b, seed=9)
    config = TrainConfig(round=4, lr=lr, local_epochs=1, batch_size=b)
    delta = trainer.train_client(params, task, config).delta
    reference = build_model("logreg", num_features=64, num_classes=10, seed=2)
    set_flat(reference, params)
    grads = _clipped_gradient_sum(reference, task.x, task.y, c)
    xi = source.normal((TAG_CLIENT, 4, 3, USE_NOISE, 0), params.numel()).double()
    expected = -lr * (grads + z * c * xi) / b
    assert torch.allclose(delta.double(), expected, rtol=1e-4, atol=1e-6)
    # the same key and (round, device) replay it bit for bit (a resumed run), another round does not
    assert torch.equal(trainer.train_client(params, task, config).delta, delta)
    assert not torch.equal(trainer.train_client(params, task, TrainConfig(round=5, lr=lr, local_epochs=1, batch_size=b)).delta, delta)


def test_a_device_draws_independent_noise_for_identical_tasks() -> None:
    """On a device (no run key) every task has a fresh key from secrets: the same public inputs
    (model, data, round, task seed) give different noise, centred on the same noiseless step."""
    model = build_model("logreg", num_features=64, num_classes=10, seed=2)
    params = get_flat(model)
    trainer = OpacusTrainer(model, noise_multiplier=6.0, max_grad_norm=1.0)
    config = TrainConfig(round=0, lr=1.0, local_epochs=1, batch_size=8)
    deltas = [trainer.train_client(params, _task(0, 8, seed=1), config).delta for _ in range(6)]
    for i in range(len(deltas)):
        for j in range(i):
            assert not torch.equal(deltas[i], deltas[j])
    # the differences are pure noise: std sqrt(2) z C / B per coordinate
    diffs = torch.cat([deltas[i] - deltas[i + 1] for i in range(0, 6, 2)])
    assert std_matches(diffs, math.sqrt(2.0) * 6.0 * 1.0 / 8)


def test_keyed_noise_in_simulation_has_std_z_c_over_the_expected_batch() -> None:
    """The simulation path (the run key's streams), as the device test below checks the device path."""
    from fedsim.privacy.noise import NoiseSource

    model = build_model("logreg", num_features=64, num_classes=10, seed=2)
    z, c, lr, b = 6.0, 1.0, 1.0, 8
    trainer = OpacusTrainer(model, noise_multiplier=z, max_grad_norm=c)
    trainer.set_private_source(NoiseSource.from_seed(21))
    deltas = [
        trainer.train_client(get_flat(model), _task(d, b, seed=d), TrainConfig(round=0, lr=lr, local_epochs=1, batch_size=b)).delta
        for d in range(20)
    ]
    samples = torch.cat(deltas)
    sigma = lr * z * c / b
    assert std_matches(samples, sigma)
    assert not std_matches(samples, sigma * 2 / 3) and not std_matches(samples, sigma * 1.5)


def test_a_resumed_run_replays_the_example_level_noise(tmp_path: Path) -> None:
    """A DP-SGD run killed inside a round and resumed from its checkpoint ends with the same model
    and the same observed example-level figures as the run uninterrupted under the same key."""
    from fedsim.engine import Simulation
    from fedsim.privacy.noise import NoiseKey, new_run_id

    # an exact replay needs the key and the run id
    raw = {**_opacus_dp_raw(), "rounds": 4, "checkpoint": {"every": 1}, "privacy": {"run-id": new_run_id()}}
    key = NoiseKey.generate()
    ref = Simulation(scenario_from_dict(raw), run_dir=tmp_path / "ref", progress=False, noise_key=key).run()
    crashed = Simulation(scenario_from_dict(raw), run_dir=tmp_path / "run", progress=False, noise_key=key)
    original = crashed.run_round

    def run_round(r: int):
        row = original(r)
        if r == 2:
            raise KeyboardInterrupt  # after the round's training, before it is logged
        return row

    crashed.run_round = run_round  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        crashed.run()
    resumed = Simulation(scenario_from_dict(raw), run_dir=tmp_path / "run", progress=False, noise_key=key)
    assert resumed.resume() == 2
    out = resumed.run()
    assert torch.equal(out.params, ref.params)
    private = [json.loads((tmp_path / r / "private" / "summary.json").read_text()) for r in ("ref", "run")]
    assert private[0]["example_level"] == private[1]["example_level"]


def test_example_level_epsilon_matches_an_independent_accountant() -> None:
    model = _model()
    trainer = OpacusTrainer(model, noise_multiplier=1.1, max_grad_norm=1.0, target_delta=1e-5, max_participations=3)
    params = get_flat(model)
    config = TrainConfig(round=0, lr=0.1, local_epochs=2, batch_size=4)
    for dev, n in enumerate((6, 12, 40)):
        trainer.train_client(params, _task(dev, n, seed=dev), config)
    report = trainer.observed_example_privacy()
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
    assert observed.observed_example_privacy()["max_participations"] == 2
    # the delta: target-delta when set, else the scenario's (the engine passes it), else 1e-6
    assert observed.observed_example_privacy(delta=1e-5)["epsilon"] == pytest.approx(example_level_epsilon(1.1, 0.5, 8, 1e-5))
    assert observed.observed_example_privacy()["delta"] == 1e-6
    fixed = OpacusTrainer(model, noise_multiplier=1.1, max_grad_norm=1.0, target_delta=1e-3)
    fixed.train_client(params, _task(0, 6, seed=0), config)
    assert fixed.observed_example_privacy(delta=1e-5)["delta"] == 1e-3
    assert fixed.example_privacy(delta=1e-5)["delta"] == 1e-3
    # the published figure is the worst device size at the configured participations: at least
    # every trained device's, and the same whatever sizes trained
    public = trainer.example_privacy()
    assert public["max_participations"] == 3 and public["participations_basis"] == "configured"
    assert public["epsilon"] >= report["epsilon"] * (1 - 1e-9)
    other = OpacusTrainer(model, noise_multiplier=1.1, max_grad_norm=1.0, target_delta=1e-5, max_participations=3)
    other.train_client(params, _task(0, 40, seed=0), config)
    assert other.example_privacy() == public


def _opacus_dp_raw(**data: object) -> dict:
    return {
        "name": "opacus",
        "rounds": 3,
        "clients-per-round": 6,
        "data": {"num-devices": 40, **data},
        "model": {"name": "logreg"},
        "client": {"trainer": "opacus", "batch-size": 8, "lr": 0.5, "noise-multiplier": 1.0, "max-grad-norm": 1.0},
        "strategy": {"name": "dp-fedavg", "noise-multiplier": 1.0, "clip-norm": 0.5, "max-participations": 2},
    }


def test_published_example_level_figures_do_not_depend_on_the_devices_data(tmp_path: Path) -> None:
    """summary.json's example-level figures are a function of the configuration: runs whose
    smallest devices differ publish the same figures; the trained devices' own (which reveal the
    smallest device's size) are in private/summary.json only."""
    small = _opacus_dp_raw(dataset="synthetic", **{"examples-per-device": 5, "num-features": 16})
    large = _opacus_dp_raw(dataset="synthetic", **{"examples-per-device": 40, "num-features": 16})
    public, private = [], []
    for name, raw in (("small", small), ("large", large)):
        run_scenario(scenario_from_dict(raw), run_dir=tmp_path / name)
        public.append(json.loads((tmp_path / name / "summary.json").read_text())["example_level"])
        private.append(json.loads((tmp_path / name / "private" / "summary.json").read_text())["example_level"])
    assert public[0] == public[1]
    # not configured in [client]: the strategy's limit (2 participations), data-independent
    assert public[0]["max_participations"] == 2 and public[0]["participations_basis"] == "strategy"
    # the exact figures: 5 examples at batch 8 -> one batch (q = 1); 40 -> 5 batches (q = 1/5)
    assert private[0]["sampling_rate"] == 1.0 and private[1]["sampling_rate"] == pytest.approx(0.2)
    assert all(public[0]["epsilon"] >= p["epsilon"] * (1 - 1e-9) for p in private)
    for run in ("small", "large"):
        text = (tmp_path / run / "summary.json").read_text()
        assert "example_level_observed" not in text


def test_worst_case_figure_bounds_every_device_size() -> None:
    """The grid's maximum bounds the epsilon of device sizes between its points (the function
    decreases there), at Opacus's own orders."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant

    from clients.opacus_trainer import _worst_case_batches, worst_case_example_epsilon

    grid = set(_worst_case_batches())
    off_grid = [33, 40, 47, 100, 333, 1000, 5000, 123457]
    assert not grid & set(off_grid) and max(grid) >= 2**24
    orders = RDPAccountant.DEFAULT_ALPHAS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for z, epochs, k in ((0.6, 1, 1), (1.5, 3, 5)):
            worst, _ = worst_case_example_epsilon(z, epochs, k, 1e-6)
            for b in off_grid:
                rdp = compute_rdp(q=1.0 / b, noise_multiplier=z, steps=epochs * b * k, orders=orders)
                assert get_privacy_spent(orders=orders, rdp=rdp, delta=1e-6)[0] <= worst
            # and it is attained at a small number of batches, not at the largest one
            for b in (1, 2, 3, 8):
                assert worst >= example_level_epsilon(z, 1.0 / b, epochs * b * k, 1e-6) * (1 - 1e-3)


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
