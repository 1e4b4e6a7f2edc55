"""``[engine] device``: where client training and the server's streaming sum run.

On a machine without CUDA: ``"auto"`` means the CPU, ``"cuda"`` is a one-line scenario error, and
an explicit ``"cpu"`` run is the default run. The CUDA tests run where torch sees a CUDA device
and are skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch

from clients.sgd import SGDTrainer
from fedsim.engine import Simulation, run_scenario
from fedsim.engine.aggregation import UpdateAccumulator
from fedsim.errors import ScenarioError
from fedsim.models import build_model
from fedsim.privacy.noise import NoiseKey
from fedsim.scenario import EngineConfig, load_scenario, parse_override
from fedsim.tasks import Task
from fedsim.types import CohortChunk, TrainConfig

from ..conftest import SCENARIOS, run_cli
from .test_trainer_paths import CASES, _tasks

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="torch sees no CUDA device")
without_cuda = pytest.mark.skipif(CUDA, reason="checks the behaviour of a machine without CUDA")


def _quick(*extra: str):
    overrides = ["rounds=2", "clients-per-round=10", *extra]
    return load_scenario(SCENARIOS / "quickstart.toml", [parse_override(o) for o in overrides])


@without_cuda
def test_cuda_without_a_cuda_device_is_a_one_line_scenario_error(tmp_path) -> None:
    with pytest.raises(ScenarioError, match=r'engine.device: "cuda" needs a CUDA device and torch sees none'):
        _quick('engine.device="cuda"')
    proc = run_cli("run", str(SCENARIOS / "quickstart.toml"), "--rounds", "1", "--quiet", "--out", str(tmp_path / "r"),
                   "--set", 'engine.device="cuda"', timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith('error: --set: engine.device: "cuda" needs a CUDA device') and 'use "auto"' in lines[0]
    assert not (tmp_path / "r").exists()


def test_unknown_device_names_the_allowed_values() -> None:
    with pytest.raises(ScenarioError, match=r"engine.device: must be one of 'auto', 'cpu', 'cuda', got 'gpu'"):
        _quick('engine.device="gpu"')


@without_cuda
def test_auto_means_the_cpu_here_and_cpu_runs_are_the_default_runs() -> None:
    assert EngineConfig().device == "auto" and EngineConfig().torch_device() == torch.device("cpu")
    sim = Simulation(_quick('engine.device="cpu"'), progress=False)
    assert sim.device == torch.device("cpu") and sim.trainer.device == torch.device("cpu")
    assert sim.scenario.to_dict()["engine"]["device"] == "cpu"
    explicit = sim.run()
    default = run_scenario(_quick())
    assert torch.equal(explicit.params, default.params) and explicit.metrics == default.metrics


@needs_cuda
@pytest.mark.parametrize("name", sorted(CASES))
def test_every_path_on_cuda_equals_the_cpu_loop(name: str) -> None:
    spec, params, paths = CASES[name]
    model = build_model(name, spec=spec, params=params, seed=7).double()
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    tasks = _tasks(spec)
    config = TrainConfig(round=2, lr=0.3, local_epochs=2, batch_size=4, clip_norm=0.05)
    reference = SGDTrainer(model, path="loop")
    reference.objective = Task(spec)
    expected = torch.stack([reference.train_client(flat, t, config).delta for t in tasks])
    for path in paths:
        trainer = SGDTrainer(build_model(name, spec=spec, params=params, seed=7).double(), path=path, workers=1)
        trainer.objective = Task(spec)
        assert trainer.set_device(torch.device("cuda")).type == "cuda"
        chunks = list(trainer.train_cohort(flat, iter(tasks), config, chunk_size=3))
        assert all(c.deltas.device.type == "cuda" and c.losses.device.type == "cpu" for c in chunks)
        got = torch.cat([c.deltas for c in chunks]).cpu()
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-9, msg=f"{name} {path}")


@needs_cuda
def test_server_sum_on_cuda_equals_the_cpu_sum() -> None:
    gen = torch.Generator().manual_seed(0)
    deltas = torch.randn(6, 50, generator=gen)
    deltas[2] *= 100.0  # above the clip bound: rejected on both devices

    def run(device: str):
        acc = UpdateAccumulator(num_params=50, round=0, clip_norm=3.0, weighting="examples", ledger=None,
                                num_devices=10, device=device)
        chunk = CohortChunk(device_ids=torch.arange(6).numpy(), deltas=deltas.to(device),
                            num_examples=torch.tensor([1, 2, 3, 4, 5, 6]), losses=torch.zeros(6))
        acc.add(chunk)
        assert acc.delta_sum.device.type == torch.device(device).type
        return acc.result()

    cpu, cuda = run("cpu"), run("cuda")
    assert cuda.delta_sum.device.type == "cpu" and cuda.rejected == cpu.rejected == {"norm_exceeds_clip": 1}
    torch.testing.assert_close(cuda.delta_sum, cpu.delta_sum, rtol=1e-5, atol=1e-5)


@needs_cuda
def test_a_dp_ftrl_run_on_cuda_is_the_cpu_run_up_to_rounding() -> None:
    run_id = 'privacy.run-id="' + "ab" * 16 + '"'
    key = NoiseKey.generate()

    def run(device: str):
        overrides = ["rounds=3", "clients-per-round=20", f'engine.device="{device}"', run_id]
        return run_scenario(load_scenario(SCENARIOS / "dp_ftrl.toml", [parse_override(o) for o in overrides]), noise_key=key)

    on_cuda, on_cpu = run("cuda"), run("cpu")
    assert on_cuda.params.device.type == "cpu"
    torch.testing.assert_close(on_cuda.params, on_cpu.params, rtol=1e-4, atol=1e-4)
    assert on_cuda.summary["rho"] == on_cpu.summary["rho"]
