"""backend = "ray": the same run as the in-process engine, cohort blocks trained on Ray actors."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator

import pytest
import torch

from fedsim.engine import Simulation, run_scenario
from fedsim.errors import FedsimError
from fedsim.privacy.noise import NoiseKey
from fedsim.scenario import load_scenario, parse_override

from ..conftest import SCENARIOS

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _scenario(backend: str, *extra: str):
    overrides = ["rounds=3", "clients-per-round=30", "engine.chunk-size=8", f'engine.backend="{backend}"', *extra]
    return load_scenario(SCENARIOS / "quickstart.toml", [parse_override(o) for o in overrides])


def test_ray_run_equals_in_process_run(local_ray: None) -> None:
    # Dirichlet digits: unequal data sizes; 30 clients in blocks of 8 spread over 2 workers
    ray_sim = Simulation(_scenario("ray"), progress=False)
    assert ray_sim.ray is not None
    via_ray = ray_sim.run()
    in_process = run_scenario(_scenario("inprocess"))
    assert torch.equal(via_ray.params, in_process.params)
    assert via_ray.metrics == in_process.metrics
    assert [m["clients"] for m in via_ray.metrics] == [30, 30, 30]
    assert ray_sim.ray.num_workers == 0  # actors stopped at the end of the run
    assert ray.is_initialized()  # the runtime the test started is left alone


def test_ray_dp_round_with_clipping_equals_in_process(local_ray: None) -> None:
    dp = [
        'strategy.name="dp-fedavg"', "strategy.noise-multiplier=0.5", "strategy.clip-norm=0.3",
        f'privacy.run-id="{secrets.token_hex(16)}"',
    ]
    key = NoiseKey.generate()  # a DP run draws a fresh secret key and run id: compare both under one of each
    via_ray = run_scenario(_scenario("ray", *dp), noise_key=key)
    in_process = run_scenario(_scenario("inprocess", *dp), noise_key=key)
    assert torch.equal(via_ray.params, in_process.params)
    assert via_ray.summary["rho"] == in_process.summary["rho"] is not None


def test_more_workers_than_cluster_cpus_is_a_clear_error(local_ray: None) -> None:
    sim = Simulation(_scenario("ray", "engine.ray-workers=3"), progress=False)
    with pytest.raises(FedsimError, match="engine.ray-workers: 3 workers need 3 CPUs, the Ray cluster has 2"):
        sim.run()


def test_unreachable_cluster_address_is_a_one_line_error(tmp_path) -> None:
    from ..conftest import run_cli

    proc = run_cli(
        "run", str(SCENARIOS / "quickstart.toml"), "--backend", "ray", "--rounds", "1", "--quiet",
        "--out", str(tmp_path / "r"), "--set", 'engine.ray-address="127.0.0.1:1"', timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: engine.ray-address: cannot reach '127.0.0.1:1'")


def test_ray_trains_user_models_and_datasets_from_files(local_ray: None, tmp_path) -> None:
    import numpy as np

    # a user's model and dataset (vmap path), and a language model on a data file (loop path)
    custom = ["rounds=2", "clients-per-round=10", "data.users=12", "engine.chunk-size=4"]
    rng = np.random.default_rng(0)
    seqs = rng.integers(1, 10, size=(60, 6))
    np.savez(tmp_path / "lm.npz", x=seqs, y=np.roll(seqs, -1, axis=1), user_id=np.arange(60) % 8)
    (tmp_path / "lm.toml").write_text(
        'name = "lm"\nrounds = 2\nclients-per-round = 6\n[data]\ndataset = "lm.npz"\npad-id = 0\n'
        '[model]\nname = "lstm-lm"\nhidden = 8\n[engine]\nchunk-size = 4\n',
        encoding="utf-8",
    )
    for path, extra in ((SCENARIOS / "custom_workload.toml", custom), (tmp_path / "lm.toml", [])):
        def run(backend: str, path=path, extra=extra):
            sc = load_scenario(path, [parse_override(o) for o in [*extra, f'engine.backend="{backend}"']])
            return run_scenario(sc)

        via_ray, in_process = run("ray"), run("inprocess")
        assert torch.equal(via_ray.params, in_process.params)
        assert via_ray.metrics == in_process.metrics


def test_ray_run_with_adaptive_clipping_equals_in_process(local_ray: None) -> None:
    """Adaptive clipping on Ray: the same bits, noisy counts and clip norms as in-process."""
    dp = [
        'strategy.name="dp-fedavg"', "strategy.noise-multiplier=0.5", "strategy.clip-norm=0.3",
        "strategy.target-quantile=0.5", "strategy.count-noise-multiplier=3.0",
        f'privacy.run-id="{secrets.token_hex(16)}"',
    ]
    key = NoiseKey.generate()
    via_ray = run_scenario(_scenario("ray", *dp), noise_key=key)
    in_process = run_scenario(_scenario("inprocess", *dp), noise_key=key)
    assert torch.equal(via_ray.params, in_process.params)
    clips = [m["clip_norm"] for m in via_ray.metrics]
    assert clips == [m["clip_norm"] for m in in_process.metrics] and clips[0] == 0.3 and len(set(clips)) == 3
    assert via_ray.ledger == in_process.ledger and len(via_ray.ledger) == 6


def test_ray_equivalent_cohort_run_equals_in_process(local_ray: None) -> None:
    """Deployment-equivalent noise on Ray (with adaptive clipping, whose count is scaled too): the
    same parameters, run log and both guarantees as in-process."""
    dp = [
        'strategy.name="dp-fedavg"', "strategy.noise-multiplier=2.0", "strategy.clip-norm=0.3",
        "strategy.target-quantile=0.5", "strategy.count-noise-multiplier=3.0", "privacy.equivalent-cohort=3000",
        f'privacy.run-id="{secrets.token_hex(16)}"',
    ]
    key = NoiseKey.generate()
    via_ray = run_scenario(_scenario("ray", *dp), noise_key=key)
    in_process = run_scenario(_scenario("inprocess", *dp), noise_key=key)
    assert torch.equal(via_ray.params, in_process.params)
    assert via_ray.metrics == in_process.metrics
    assert via_ray.summary["noise_multiplier"] == pytest.approx(2.0 * 30 / 3000)
    for key_ in ("rho", "equivalent_rho", "equivalent"):
        assert via_ray.summary[key_] == in_process.summary[key_] is not None
    assert via_ray.summary["equivalent"]["count_noise_multiplier"] == 3.0
    assert via_ray.summary["equivalent_rho"] < 1 < via_ray.summary["rho"]
