"""A deployed ServerApp killed mid-job and restarted continues the job, never restarts it.

Real processes on 127.0.0.1 (``harness``): a SuperLink, two SuperNodes, ``flwr run``. The
ServerApp process is killed (SIGKILL: no chance to clean up) once the first of four rounds is
published (the round-1 checkpoint, whose run-log line is empty, must load); a second ``flwr run``
of the same job (same ``job-id``, same run directory and so the same server state directory)
resumes from the job's checkpoint: it runs only the remaining rounds, its privacy ledger holds
each round once, it reports the job's cumulative rho (the plan's for four rounds) and it reuses
the job's key. With its newest checkpoint damaged, a third run of the job refuses in one line:
round 4 was published and its state is gone, so running it again would release it with other
inputs. A new job draws a new key, never writes over the earlier job's run directory, and counts
the earlier job's rho when its run config names it in ``prior-jobs``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsim.flower.device import DeviceLedger
from fedsim.flower.server_state import ServerState
from fedsim.privacy.noise import NoiseKey

from ..conftest import ROOT
from .harness import (
    FlowerCluster,
    check_ran,
    read_run,
    run_id_of,
    wait_for_received,
    wait_for_round,
)
from .test_deploy import dp_ftrl_scenario

pytestmark = [pytest.mark.flower, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture
def cluster(shared_cluster: FlowerCluster) -> FlowerCluster:
    """The session's shared cluster: SuperNodes for devices 0 and 1 are running."""
    return shared_cluster


def _serverapp_pids(cluster: FlowerCluster) -> list[int]:
    """Live ServerApp processes of this cluster."""
    return cluster.serverapp_pids()


def _kill_serverapp(cluster: FlowerCluster, timeout: float = 30.0) -> None:
    pids = _serverapp_pids(cluster)
    assert pids, "no ServerApp process to kill"
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while _serverapp_pids(cluster) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _serverapp_pids(cluster)


def _plan(rounds: int, k: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "fedsim", "privacy", "dp-ftrl", "--noise-multiplier", "0.5", "--rounds", str(rounds),
         "--max-participations", str(k), "--min-separation", "0", "--delta", "1e-5", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_killed_server_resumes_its_job_and_a_new_job_draws_a_new_key(cluster: FlowerCluster, tmp_path: Path) -> None:
    scenario_file = dp_ftrl_scenario(tmp_path / "flower-resume.toml", devices=2, per_round=2, rounds=4, k=4)
    out = tmp_path / "run"
    job = {"scenario": str(scenario_file), "out-dir": str(out), "job-id": "resume-job", "min-nodes": 2, "round-timeout": 120.0}
    # devices 0 and 1: the shared cluster's SuperNodes

    first = cluster.start_run(job)
    wait_for_round(out, 1, timeout=300)
    # a crash mid-job, while round 2 is in flight: once both nodes hold their round-2 message
    # (a ServerApp killed while it pushes a message's content leaves Flower 1.42 SuperNodes
    # retrying the pull until the run times out, then holding a task whose late reply they push
    # in place of the next run's reply)
    run_id = run_id_of(cluster, first)
    for node in ("node-0", "node-1"):
        wait_for_received(cluster, node, run_id, 2, timeout=120)
    _kill_serverapp(cluster)
    cluster.kill(first)
    state = ServerState(out / "server-state", "resume-job")
    key_before = state.key_path.read_bytes()
    assert state.key_path.stat().st_mode & 0o777 == 0o600 and state.path.stat().st_mode & 0o777 == 0o700
    done_before = len([line for line in (out / "metrics.jsonl").read_text().splitlines() if line])
    assert 1 <= done_before < 4
    rho_before = json.loads((out / "metrics.jsonl").read_text().splitlines()[done_before - 1])["rho"]

    second = cluster.flwr_run(job, timeout=400)
    check_ran(second, cluster)
    assert "resumed after round" in second.stdout
    run = read_run(out)
    s = run["summary"]
    assert (s["rounds"], s["stopped_reason"]) == (4, "completed")
    assert s["flower"]["resumed_at_round"] >= done_before
    # every round released once: one row and one ledger event per round
    assert [m["round"] for m in run["metrics"]] == [1, 2, 3, 4]
    assert [d["round"] for d in run["diagnostics"]] == [1, 2, 3, 4]
    assert [e["round"] for e in run["ledger"]] == [0, 1, 2, 3]
    # the job's cumulative rho: the plan's for four rounds, not two rounds' worth
    predicted = _plan(4, 4)
    assert s["rho"] == pytest.approx(predicted["rho"], rel=1e-9)
    assert run["metrics"][-1]["rho"] == pytest.approx(predicted["rho"], rel=1e-9)
    assert run["metrics"][done_before - 1]["rho"] == rho_before < s["rho"]
    # the same key, which appears in no public file
    assert state.key_path.read_bytes() == key_before
    secret = NoiseKey.load(state.key_path)._material.hex()
    for name in ("config.toml", "metrics.jsonl", "summary.json", "ledger.json"):
        assert secret not in (out / name).read_text()
    assert secret not in second.stdout
    # each device contributed at most once per round
    for device in (0, 1):
        rounds = DeviceLedger(cluster.state_dir(device), device, "resume-job").rounds()
        assert rounds == sorted(set(rounds)) and set(rounds) <= {0, 1, 2, 3}

    # the newest checkpoint damaged: round 4 was published and cannot be run again; refused
    published = {name: (out / name).read_bytes() for name in ("metrics.jsonl", "model.pt", "ledger.json")}
    newest = sorted((state.path / "checkpoints").glob("ckpt-*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:-7])
    refused = cluster.flwr_run(job, timeout=300)
    assert "job 'resume-job': round 4 may have been published" in refused.stdout, refused.stdout[-3000:]
    assert "ckpt-00000004.pt (truncated" in refused.stdout and "prior-jobs='resume-job'" in refused.stdout
    assert "Traceback" not in refused.stdout  # one line, not a traceback
    assert {name: (out / name).read_bytes() for name in published} == published

    # a new job never writes over this job's run directory
    metrics_bytes = (out / "metrics.jsonl").read_bytes()
    intruder = cluster.flwr_run({**job, "job-id": "another-job", "rounds": 1}, timeout=300)
    assert "already holds" in intruder.stdout, intruder.stdout[-3000:]
    assert (out / "metrics.jsonl").read_bytes() == metrics_bytes
    assert not ServerState(out / "server-state", "another-job").exists()

    # a new job draws a new key, and counts the abandoned job's rho (prior-jobs, same state-dir)
    out2 = tmp_path / "run2"
    third = cluster.flwr_run(
        {**job, "job-id": "another-job", "out-dir": str(out2), "rounds": 1, "state-dir": str(state.root), "prior-jobs": "resume-job"},
        timeout=300,
    )
    check_ran(third, cluster)
    other = ServerState(state.root, "another-job")
    assert NoiseKey.load(other.key_path) != NoiseKey.load(state.key_path)
    new = read_run(out2)["summary"]
    assert new["flower"]["resumed_at_round"] == 0
    assert new["prior"]["runs"] == ["resume-job"] and new["prior"]["rounds"] == 4
    assert new["prior"]["rho"] == pytest.approx(s["rho"], rel=1e-9)
    assert new["rho"] == pytest.approx(s["rho"] + new["prior"]["rho_this_run"], rel=1e-9)
