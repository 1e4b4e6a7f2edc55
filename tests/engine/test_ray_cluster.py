"""A real Ray cluster: a head and a worker node started as separate ``ray start`` processes.

The cluster listens on 127.0.0.1 with one CPU per node, so ``engine.ray-workers = 0`` places one
actor on each node. A DP-FTRL run and a small ``fedsim sweep`` go through ``engine.ray-address``
and must give exactly the in-process results. Each node runs ``ray start --block`` in a session
of its own, and the fixture stops it by signalling that session's process group (all of the
node's Ray processes), which is what ``ray stop`` does limited to this cluster (``ray stop``
itself stops every Ray runtime of this user on the machine), also when a test fails.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedsim.engine import Simulation, run_scenario
from fedsim.privacy.noise import NoiseKey
from fedsim.scenario import load_scenario, parse_override
from fedsim.sweep import plan_sweep, run_sweep

from ..cli.test_sweep import grid_configs
from ..conftest import ROOT, SCENARIOS, run_cli

ray = pytest.importorskip("ray")

RAY = Path(sys.executable).with_name("ray")
pytestmark = pytest.mark.skipif(not RAY.exists(), reason="the `ray` command is not installed beside this Python")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen) -> None:
    """Stop one ``ray start --block`` node and everything it started: its own process group
    (the node was started in a new session), SIGTERM first, SIGKILL for whatever is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break  # nothing of the group is left
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        time.sleep(1.0)  # let the group's other members act on the signal


def _wait_for_nodes(address: str, n: int, timeout: float = 90.0) -> None:
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run([str(RAY), "status", "--address", address], capture_output=True, text=True, timeout=60)
        if out.returncode == 0 and out.stdout.count("node_") >= n:
            return
        seen = out.stdout + out.stderr
        time.sleep(1.0)
    raise RuntimeError(f"the Ray cluster at {address} did not report {n} nodes: {seen}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``ray start --head`` and ``ray start --address`` on 127.0.0.1; yields the head's address."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    temp = tmp_path_factory.mktemp("ray")
    # Ray's session directory holds Unix sockets, whose paths are limited to 107 bytes: a short
    # directory of its own (the pytest temp path is longer under pytest-xdist, popen-gw0/...)
    sessions = Path(tempfile.mkdtemp(prefix="fedsim-ray-"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0", RAY_USAGE_STATS_ENABLED="0")
    common = ["--num-cpus", "1", "--num-gpus", "0", "--block", "--disable-usage-stats"]
    nodes: list[subprocess.Popen] = []
    logs = [(temp / "head.log").open("w"), (temp / "worker.log").open("w")]
    try:
        nodes.append(subprocess.Popen(
            [str(RAY), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
             "--include-dashboard", "false", "--temp-dir", str(sessions), *common],
            stdout=logs[0], stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True,
        ))
        _wait_for_nodes(address, 1)
        nodes.append(subprocess.Popen(
            [str(RAY), "start", "--address", address, "--node-ip-address", "127.0.0.1", *common],
            stdout=logs[1], stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True,
        ))
        _wait_for_nodes(address, 2)
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for proc in reversed(nodes):
            _stop(proc)
        for f in logs:
            f.close()
        shutil.rmtree(sessions, ignore_errors=True)


def _dp_ftrl(backend: str, *extra: str):
    # one secret key and one public run id for both runs: the same noise (a run id is fresh per run otherwise)
    overrides = ["rounds=2", "clients-per-round=24", "engine.chunk-size=6", f'engine.backend="{backend}"',
                 f'privacy.run-id="{"0123456789abcdef" * 2}"', *extra]
    return load_scenario(SCENARIOS / "dp_ftrl.toml", [parse_override(o) for o in overrides])


def test_dp_ftrl_on_a_two_node_cluster_equals_in_process(cluster: str) -> None:
    key = NoiseKey.generate()
    sim = Simulation(_dp_ftrl("ray", f'engine.ray-address="{cluster}"'), progress=False, noise_key=key)
    assert sim.ray is not None
    via_cluster = sim.run()
    assert not ray.is_initialized()  # the run connected to the cluster and disconnected at its end
    in_process = run_scenario(_dp_ftrl("inprocess"), noise_key=key)
    assert torch.equal(via_cluster.params, in_process.params)
    assert via_cluster.metrics == in_process.metrics
    assert via_cluster.summary["rho"] == in_process.summary["rho"] is not None
    assert len(via_cluster.metrics) == 2  # a DP run withholds per-round counts from its public metrics


def test_sweep_through_engine_ray_address_equals_in_process_sweep(cluster: str, tmp_path: Path) -> None:
    grid = ("--grid", "client.lr=0.1,0.3")
    base = ("rounds=2", "clients-per-round=12", "engine.chunk-size=4")

    def rows(out: Path) -> tuple[list[dict[str, str]], list[list[dict]]]:
        found = list(csv.DictReader((out / "runs.csv").read_text(encoding="utf-8").splitlines()))
        metrics = []
        for row in found:
            run_dir = Path(row.pop("run_dir"))
            row.pop("wall_time_s")
            lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
            metrics.append([{k: v for k, v in json.loads(ln).items() if "time" not in k} for ln in lines if ln])
        assert len(found) == 2 and all(len(m) == 2 for m in metrics)
        return found, metrics

    # the command line, every run training on the cluster
    sets = [a for o in (*base, 'engine.backend="ray"', f'engine.ray-address="{cluster}"') for a in ("--set", o)]
    proc = run_cli("sweep", str(SCENARIOS / "quickstart.toml"), *grid, "--out", str(tmp_path / "cluster"),
                   "--workers", "1", "--quiet", *sets, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # the same sweep in this process
    configs, keys = grid_configs(grid[1])
    specs = plan_sweep(SCENARIOS / "quickstart.toml", configs, seeds=1, out=tmp_path / "inprocess",
                       overrides=[parse_override(o) for o in base], check_grid_keys=keys)
    run_sweep(specs, tmp_path / "inprocess", workers=1, progress=False, echo=lambda _: None)
    assert rows(tmp_path / "cluster") == rows(tmp_path / "inprocess")
