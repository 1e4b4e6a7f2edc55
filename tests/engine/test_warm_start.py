"""Warm start (``[model] init``) and who owns a model's initialisation.

A run from a finished run's ``model.pt`` starts at that model's accuracy; a plain ``state_dict``
file works the same way; a user builder's own (loaded) weights are never re-drawn; the run
directory records the file's path and SHA-256; bad files are one-line errors before anything runs.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

import pytest
import torch

from fedsim.data import DataSpec
from fedsim.engine import Simulation, run_scenario
from fedsim.flower.protocol import client_scenario_sections, scenario_from_sections
from fedsim.models import build_model, get_flat
from fedsim.scenario import load_scenario, parse_override

from ..conftest import SCENARIOS, run_cli

BASE = """
name = "warm"
seed = 3
rounds = {rounds}
clients-per-round = 20
[data]
dataset = "digits"
num-devices = 100
partitioner = "dirichlet"
alpha = 1.0
[model]
name = "mlp"
hidden = {hidden}
{init}
[client]
local-epochs = 2
batch-size = 8
lr = {lr}
[strategy]
name = "fedavg"
"""


def _scenario(tmp_path: Path, *, rounds: int = 6, hidden: int = 32, lr: float = 0.1, init: str = "", name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(BASE.format(rounds=rounds, hidden=hidden, lr=lr, init=init), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """A finished FedAvg run: its directory and final accuracy."""
    tmp = tmp_path_factory.mktemp("finished")
    out = tmp / "run"
    result = run_scenario(load_scenario(_scenario(tmp, rounds=15), [(["output-dir"], str(out))]), run_dir=out)
    assert result.summary["accuracy"] > 0.5
    return out, result.summary["accuracy"]


def test_a_run_from_a_finished_model_starts_at_its_accuracy(tmp_path: Path, finished: tuple[Path, float]) -> None:
    run, accuracy = finished
    model_file = run / "model.pt"
    scenario = _scenario(tmp_path, rounds=1, lr=1e-6, init=f'init = "{model_file}"')
    out = tmp_path / "warm"
    sim = Simulation(load_scenario(scenario, [(["output-dir"], str(out))]), run_dir=out, progress=False)
    assert torch.equal(sim.params, torch.load(model_file)["flat"])  # the global model is the file's
    result = sim.run()
    assert result.metrics[0]["accuracy"] == pytest.approx(accuracy, abs=0.01)  # not chance (~0.1)
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
    summary = json.loads((out / "summary.json").read_text())
    assert {k: summary["init"][k] for k in ("path", "sha256")} == {"path": str(model_file.resolve()), "sha256": digest}
    # the starting model's own evaluation on the same test split: exactly the finished run's final one
    assert summary["init"]["accuracy"] == pytest.approx(accuracy, abs=1e-6) and summary["init"]["loss"] > 0
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["model"]["init"] == str(model_file.resolve()) and config["model"]["init-sha256"] == digest
    # the recorded config runs again from anywhere, and a cold start records no init file
    assert load_scenario(out / "config.toml").model.init_sha256 == digest
    assert json.loads((run / "summary.json").read_text())["init"] is None
    assert "init" not in tomllib.loads((run / "config.toml").read_text())["model"]


def test_a_plain_state_dict_file_relative_to_the_scenario(tmp_path: Path, finished: tuple[Path, float]) -> None:
    run, accuracy = finished
    model = build_model("mlp", num_features=64, num_classes=10, hidden=32)
    model.load_state_dict(torch.load(run / "model.pt")["state_dict"])
    (tmp_path / "weights").mkdir()
    torch.save(model.state_dict(), tmp_path / "weights" / "sd.pt")
    scenario = _scenario(tmp_path, rounds=1, lr=1e-6, init='init = "weights/sd.pt"')
    result = run_scenario(load_scenario(scenario))
    assert result.metrics[0]["accuracy"] == pytest.approx(accuracy, abs=0.01)
    assert result.summary["init"]["path"] == str((tmp_path / "weights" / "sd.pt").resolve())


USER_BUILDER = '''
import torch
from torch import nn

def build(spec, weights: str = "", width: int = 16):
    model = nn.Sequential(nn.Flatten(), nn.Linear(spec.num_features, width), nn.Tanh(), nn.Linear(width, spec.num_classes))
    if weights:
        model.load_state_dict(torch.load(weights))
    return model
'''


def test_a_user_builders_loaded_weights_survive(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text(USER_BUILDER, encoding="utf-8")
    spec = DataSpec("classification", (64,), 10)
    reference = build_model(str(tmp_path / "m.py:build"), spec=spec, seed=123)
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(3.0).add_(0.25)  # no initialisation scheme draws these
    torch.save(reference.state_dict(), tmp_path / "pre.pt")
    scenario = _scenario(tmp_path, rounds=1).read_text().replace(
        'name = "mlp"\nhidden = 32', f'name = "m.py:build"\nweights = "{tmp_path / "pre.pt"}"'
    )
    (tmp_path / "u.toml").write_text(scenario, encoding="utf-8")
    sim = Simulation(load_scenario(tmp_path / "u.toml"), progress=False)
    assert torch.equal(sim.params, get_flat(reference))


def test_a_builder_without_generator_is_seeded_and_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text(USER_BUILDER, encoding="utf-8")
    spec = DataSpec("classification", (64,), 10)
    state = torch.random.get_rng_state()
    a = get_flat(build_model(str(tmp_path / "m.py:build"), spec=spec, seed=5))
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(999)  # the global RNG has no influence
    b = get_flat(build_model(str(tmp_path / "m.py:build"), spec=spec, seed=5))
    c = get_flat(build_model(str(tmp_path / "m.py:build"), spec=spec, seed=6))
    torch.random.set_rng_state(state)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # PyTorch's own initialisation of the layers the builder made: Linear's kaiming-uniform bound
    assert a[: 64 * 16].abs().max() <= 1 / 8 + 1e-6


def _one_line_error(proc, scenario: Path, key: str, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {scenario}: {key}: "), proc.stderr
    assert needle in lines[0], lines[0]


def test_bad_init_files_are_one_line_errors_and_nothing_runs(tmp_path: Path, finished: tuple[Path, float]) -> None:
    run, _ = finished
    (tmp_path / "notes.txt").write_text("not a model\n", encoding="utf-8")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"weight": "abc"}, tmp_path / "dict.pt")
    cases = [
        ('init = "missing.pt"', "model.init", "missing.pt: no such file"),
        ('init = "notes.txt"', "model.init", "notes.txt: not a model file torch can read"),
        ('init = "list.pt"', "model.init", "list.pt: not a model: expected a fedsim model.pt or a state_dict"),
        ('init = "dict.pt"', "model.init", "entry 'weight' is a str"),
        (f'init = "{run / "model.pt"}"\ninit-sha256 = "{"0" * 64}"', "model.init-sha256", "the file changed since"),
        ('init-sha256 = "abc"', "model.init-sha256", "applies with init"),
    ]
    for init, key, needle in cases:
        scenario = _scenario(tmp_path, init=init)
        out = tmp_path / "out"
        _one_line_error(run_cli("run", str(scenario), "--out", str(out), "--quiet"), scenario, key, needle)
        assert not out.exists()
    # another architecture: the first tensor that does not fit is named, and no round runs
    scenario = _scenario(tmp_path, hidden=16, init=f'init = "{run / "model.pt"}"')
    proc = run_cli("run", str(scenario), "--out", str(tmp_path / "out"), "--quiet")
    _one_line_error(proc, scenario, "model.init", "tensor '0.weight' has shape [32, 64], the model's is [16, 64]")
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_an_earlier_run_is_not_overwritten_by_a_bad_init(tmp_path: Path) -> None:
    out = tmp_path / "run"
    good = _scenario(tmp_path, rounds=1)
    assert run_cli("run", str(good), "--out", str(out), "--quiet").returncode == 0
    before = (out / "metrics.jsonl").read_bytes()
    bad = _scenario(tmp_path, init='init = "missing.pt"', name="bad.toml")
    proc = run_cli("run", str(bad), "--out", str(out), "--overwrite", "--quiet")
    _one_line_error(proc, bad, "model.init", "no such file")
    assert (out / "metrics.jsonl").read_bytes() == before


def test_devices_get_the_architecture_not_the_init_file(tmp_path: Path, finished: tuple[Path, float]) -> None:
    """The Flower ClientApp (and Ray workers) build the model from the scenario sections a train
    message carries: without the init file, which a device never needs (it trains from the
    parameters the server sends)."""
    run, _ = finished
    scenario = load_scenario(_scenario(tmp_path, init=f'init = "{run / "model.pt"}"'))
    sections = client_scenario_sections(scenario)
    assert "init" not in sections["model"] and "init-sha256" not in sections["model"]
    device = scenario_from_sections(json.loads(json.dumps(sections)))
    assert device.model.init is None and device.model.hidden == 32


def test_builtin_initialisation_is_unchanged_by_the_generator_argument() -> None:
    """Built-ins initialise from the run's generator themselves: the same values as before, for
    every built-in (fedsim's initialise() applied to the built module)."""
    from fedsim.models import MODELS, initialise

    cases = {
        "logreg": (DataSpec("classification", (64,), 10), {}),
        "mlp": (DataSpec("classification", (64,), 10), {"hidden": 7}),
        "cnn": (DataSpec("classification", (1, 8, 8), 10), {"channels": (2, 3)}),
        "lstm-lm": (DataSpec("next-token", (6,), 20, pad_id=0), {"hidden": 5, "layers": 1}),
        "transformer-lm": (DataSpec("next-token", (6,), 20, pad_id=0), {"dim": 8, "heads": 2, "layers": 1}),
    }
    for name, (spec, params) in cases.items():
        built = build_model(name, spec=spec, params=params, seed=17)
        plain = MODELS.get(name)(spec, **params)
        initialise(plain, torch.Generator().manual_seed(17))
        assert torch.equal(get_flat(built), get_flat(plain)), name


@pytest.mark.flower
@pytest.mark.slow
def test_warm_start_on_flower_and_ray_equals_in_process(tmp_path: Path, finished: tuple[Path, float]) -> None:
    """The warm start (and an adaptive server optimizer) on Flower's simulation runtime and on Ray."""
    from fedsim.flower.simulation import FlowerSimulation

    run, _ = finished
    overrides = [parse_override(o) for o in (
        "rounds=2", "clients-per-round=5", "data.num-devices=10", 'strategy.server-optimizer="adam"', "strategy.server-lr=0.01",
    )]
    scenario = load_scenario(_scenario(tmp_path, init=f'init = "{run / "model.pt"}"'), overrides)
    expected = run_scenario(scenario)
    got = FlowerSimulation(scenario, run_dir=tmp_path / "flower", progress=False).run()
    assert got.summary["init"] == expected.summary["init"] is not None
    assert torch.allclose(got.params, expected.params, rtol=1e-5, atol=1e-5), (got.params - expected.params).abs().max()
    ray_run = run_scenario(load_scenario(SCENARIOS / "quickstart.toml", [
        *overrides, parse_override('engine.backend="ray"'), parse_override("engine.ray-workers=2"),
        parse_override(f'model.init="{run / "model.pt"}"'), parse_override("model.hidden=32"),
    ]))
    same = run_scenario(load_scenario(SCENARIOS / "quickstart.toml", [
        *overrides, parse_override(f'model.init="{run / "model.pt"}"'), parse_override("model.hidden=32"),
    ]))
    assert torch.equal(ray_run.params, same.params)
