"""fedsim on a real Flower deployment: a SuperLink, SuperNodes and ``flwr run`` on 127.0.0.1.

* DP-FTRL end to end: every round completes, the model moves, the run's rho is what
  ``fedsim privacy`` predicts, and the final parameters are the in-process simulator's;
* faults: a SuperNode killed mid-run (the round times out cleanly, the run continues, nothing is
  counted twice), a client replying NaN / wrong shape / norm > C (rejected, the round completes)
  and a ClientApp that fails (its node checks in again); in a DP run every device-level event,
  and the check-in it causes, is in ``private/`` only;
* the device-side participation limit holds across a SuperNode restart (a crash, SIGKILL).

Every process is stopped by PID when the test ends, whatever happens (``harness``).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from fedsim.engine import run_scenario
from fedsim.engine.simulation import Simulation
from fedsim.flower.device import DeviceLedger
from fedsim.privacy.noise import NoiseKey
from fedsim.scenario import load_scenario

from ..conftest import ROOT
from .harness import (
    FlowerCluster,
    check_ran,
    read_run,
    wait_for_log,
    wait_for_round,
    write_scenario,
)

pytestmark = [pytest.mark.flower, pytest.mark.slow, pytest.mark.timeout(420)]


@pytest.fixture
def cluster(shared_cluster: FlowerCluster) -> FlowerCluster:
    """The session's shared cluster: SuperNodes for devices 0 and 1 are running."""
    return shared_cluster


def dp_ftrl_scenario(
    path: Path, *, devices: int, per_round: int, rounds: int, k: int, b: int = 0, z: float = 0.5, seed: int = 7,
    key_file: Path | None = None, strategy: dict[str, Any] | None = None,
) -> Path:
    """A small DP-FTRL scenario on the digits data (logistic regression: quick to train).

    ``key_file``: a fixed noise key (``[privacy] noise-key-file``), to compare with the simulator;
    ``strategy``: more ``[strategy]`` keys.
    """
    table: dict[str, Any] = {
        "name": path.stem,
        "seed": seed,
        "rounds": rounds,
        "clients-per-round": per_round,
        "data": {"dataset": "digits", "num-devices": devices, "partitioner": "iid"},
        "model": {"name": "logreg"},
        "client": {"local-epochs": 1, "batch-size": 32, "lr": 0.1},
        "strategy": {
            "name": "dp-ftrl", "noise-multiplier": z, "clip-norm": 1.0, "server-lr": 1.0, "momentum": 0.5,
            "max-participations": k, "min-separation": b,
        },
        "privacy": {"delta": 1e-5},
    }
    if key_file is not None:
        table["privacy"]["noise-key-file"] = str(key_file)
    table["strategy"].update(strategy or {})
    return write_scenario(path, table)


def test_dp_ftrl_on_supernodes_matches_the_simulator_and_the_privacy_plan(cluster: FlowerCluster, tmp_path: Path) -> None:
    NoiseKey.generate().save(tmp_path / "fixed.key")  # the same noise as the simulator below
    scenario_file = dp_ftrl_scenario(
        tmp_path / "flower-e2e.toml", devices=2, per_round=2, rounds=3, k=3, key_file=tmp_path / "fixed.key"
    )
    out = tmp_path / "run"  # the shared cluster's SuperNodes for devices 0 and 1 run already
    proc = cluster.flwr_run({"scenario": str(scenario_file), "out-dir": str(out), "min-nodes": 2, "round-timeout": 120.0})
    check_ran(proc, cluster)
    run = read_run(out)
    s = run["summary"]
    assert (s["rounds"], s["stopped_reason"], s["backend"]) == (3, "completed", "flower")
    assert [m["round"] for m in run["metrics"]] == [1, 2, 3]
    # exact counts are private in a DP run: null in metrics.jsonl, exact in private/
    assert all(m["clients"] is None and m["train_loss"] is None for m in run["metrics"])
    assert all(m["clients"] == 2 and m["eligible"] == 2 and m["rejected"] == 0 for m in run["diagnostics"])
    assert s["noise_key"]["kind"] == "fixed"
    assert s["flower"]["nodes"] == 2 and s["flower"]["no_reply"] is None and s["flower"]["client_error"] is None
    assert run["private_summary"]["flower"]["no_reply"] == 0 and run["private_summary"]["flower"]["client_error"] == 0

    # the model changed
    scenario = load_scenario(scenario_file)
    initial = Simulation(scenario).params
    final = torch.load(out / "model.pt")["flat"]
    assert (final - initial).norm() > 0.1

    # rho after every round, and the run's rho is the plan's
    plan = subprocess.run(
        [sys.executable, "-m", "fedsim", "privacy", "dp-ftrl", "--noise-multiplier", "0.5", "--rounds", "3",
         "--max-participations", "3", "--min-separation", "0", "--delta", "1e-5", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert plan.returncode == 0, plan.stderr
    predicted = json.loads(plan.stdout)
    rhos = [m["rho"] for m in run["metrics"]]
    assert all(r is not None for r in rhos) and rhos == sorted(rhos)
    assert s["rho"] == pytest.approx(predicted["rho"], rel=1e-9)
    assert rhos[-1] == pytest.approx(predicted["rho"], rel=1e-9)
    assert s["epsilon"] == pytest.approx(predicted["epsilon"], rel=1e-6)
    assert [e["round"] for e in run["ledger"]] == [0, 1, 2]

    # the in-process simulator, same seed, partitions, key and (the job's public) run id: the same model
    assert len(s["run_id"]) == 32 and load_scenario(out / "config.toml").privacy.run_id == s["run_id"]
    expected = run_scenario(replace(scenario, privacy=replace(scenario.privacy, run_id=s["run_id"])))
    assert torch.allclose(final, expected.params, rtol=1e-5, atol=1e-5), (final - expected.params).abs().max()
    for got, want in zip(run["diagnostics"], expected.diagnostics, strict=True):
        assert got["clients"] == want["clients"] and got["eligible"] == want["eligible"]
    for got, want in zip(run["metrics"], expected.metrics, strict=True):
        assert got["accuracy"] == pytest.approx(want["accuracy"], abs=2e-3)
        assert got["rho"] == pytest.approx(want["rho"], rel=1e-12)
    assert "fedsim: round 3/3" in proc.stdout and "rho" in proc.stdout


def test_adaptive_clipping_on_supernodes_matches_the_simulator_and_the_plan(cluster: FlowerCluster, tmp_path: Path) -> None:
    """Adaptive clipping on Flower: the ClientApps report their bits, the server clips and checks
    at each round's clip norm and releases the noisy counts; clip norms, ledger and rho are the
    simulator's and the plan's."""
    NoiseKey.generate().save(tmp_path / "fixed.key")
    scenario_file = dp_ftrl_scenario(
        tmp_path / "flower-adaptive.toml", devices=2, per_round=2, rounds=3, k=3, key_file=tmp_path / "fixed.key",
        strategy={"target-quantile": 0.5, "count-noise-multiplier": 1.0},
    )
    out = tmp_path / "run"
    proc = cluster.flwr_run({"scenario": str(scenario_file), "out-dir": str(out), "min-nodes": 2, "round-timeout": 120.0})
    check_ran(proc, cluster)
    run = read_run(out)
    s = run["summary"]
    assert (s["rounds"], s["stopped_reason"]) == (3, "completed")
    assert all(m["rejected"] == 0 for m in run["diagnostics"])
    clips = [m["clip_norm"] for m in run["metrics"]]
    assert clips[0] == 1.0 and len(set(clips)) == 3
    assert [(e["round"], e["event"]["type"]) for e in run["ledger"]] == [
        (r, k) for r in range(3) for k in ("tree_aggregation", "clipped_count")]
    from fedsim.privacy_cli import plan

    predicted = plan("dp-ftrl", ["--noise-multiplier", "0.5", "--rounds", "3", "--max-participations", "3",
                                 "--min-separation", "0", "--target-quantile", "0.5",
                                 "--count-noise-multiplier", "1.0", "--delta", "1e-5"])
    assert s["rho"] == pytest.approx(predicted["rho"], rel=1e-12)
    scenario = load_scenario(scenario_file)
    expected = run_scenario(replace(scenario, privacy=replace(scenario.privacy, run_id=s["run_id"])))
    assert [m["clip_norm"] for m in expected.metrics] == pytest.approx(clips, rel=1e-6)
    final = torch.load(out / "model.pt")["flat"]
    assert torch.allclose(final, expected.params, rtol=1e-5, atol=1e-5), (final - expected.params).abs().max()


def test_killed_supernode_and_corrupt_replies(cluster: FlowerCluster, tmp_path: Path) -> None:
    """Device 0 is honest, device 1 is killed after round 1, device 2 sends corrupt updates
    (NaN in round 1, a wrongly shaped array in round 2, a norm above the clip bound in round 6)
    and its ClientApp fails in round 3 (an error reply: the node leaves the roster, alive, and
    checks in again a round or two later)."""
    scenario_file = dp_ftrl_scenario(tmp_path / "flower-faults.toml", devices=3, per_round=3, rounds=6, k=6)
    out = tmp_path / "run"  # devices 0 and 1: the shared cluster's SuperNodes
    cluster.start_supernode(2, fault="nan,wrong-shape,error,none,none,exceed-clip")
    name = cluster.start_run({"scenario": str(scenario_file), "out-dir": str(out), "min-nodes": 3, "round-timeout": 30.0})
    wait_for_round(out, 1, timeout=180)
    cluster.kill("node-1", signal.SIGKILL)  # a crash: no goodbye to the SuperLink
    proc = cluster.wait_run(name, timeout=360)
    check_ran(proc, cluster)
    log = proc.stdout

    run = read_run(out)
    s, rows, events = run["summary"], run["diagnostics"], run["events"]
    assert (s["rounds"], s["stopped_reason"]) == (6, "completed")
    # device 2 failed in round 3 and checked in again before round 5 or 6 (the check-in is asked
    # for before round 4 and read when a round begins): a withheld event, like the failure
    failed = [e for e in events if e["event"] == "client_error" and e["device"] == 2]
    assert [e["round"] for e in failed] == [3]
    again = [e for e in events if e["event"] == "checkin"]
    assert [e["device"] for e in again] == [2] and again[0]["round"] in (5, 6)
    assert "checked in as device 2" in again[0]["message"]
    back = again[0]["round"]  # the first round device 2 is on the roster again
    # every corrupt update rejected by reason, every round completed with the honest updates
    assert s["rejected"] is None  # private in a DP run
    assert run["private_summary"]["rejected"] == {"non_finite": 1, "wrong_shape": 1, "norm_exceeds_clip": 1}
    assert [m["rejected"] for m in rows] == [1, 1, 0, 0, 0, 1]
    assert [m["clients"] for m in rows] == [2, 1, 1, 1, 2 if back == 5 else 1, 1]
    assert rows[2]["eligible"] == 2  # the dead node left the roster
    assert rows[3]["eligible"] == 1  # device 2 is off the roster until it has checked in again
    exact = run["private_summary"]["flower"]
    assert exact["client_error"] >= 1 and exact["no_reply"] + exact["client_error"] >= 2
    assert s["flower"]["no_reply"] is None and s["flower"]["client_error"] is None  # exact counts: private
    # device-level events of a DP run are not logged: private/flower-events.jsonl has them
    private_log = "\n".join(e["message"] for e in events)
    for reason in ("non_finite", "wrong_shape", "norm_exceeds_clip"):
        assert reason in private_log and reason not in log
    assert "rejected update(s) of device(s) [2]" in private_log and "device(s) [2]" not in log
    assert {e["event"] for e in events} >= {"wrong_shape", "rejected"}  # NaN: the accumulator's "rejected"
    assert "fault injection" in private_log and "fault injection" not in log
    # nor what follows from them alone: the public record shows each node's first check-in only
    # (no line, no count for device 2's check-in again), the roster as it would be had nothing
    # failed (a node leaves it when it leaves the grid), and private/ has the exact figures
    public_checkins = [line for line in log.splitlines() if "checked in as device" in line]
    assert len(public_checkins) == 3 and sum("as device 2" in line for line in public_checkins) == 1
    assert "did not check in" not in log
    assert s["flower"]["checkins"] == 3 and exact["checkins"] == 4
    left = log.count(") left")
    assert s["flower"]["nodes"] == s["flower"]["devices"] == 3 - left and left <= 1
    assert exact["nodes"] == exact["devices"] == 2
    # nothing counted twice: the server's participation ledger holds exactly the accepted updates,
    # and the privacy ledger one event per round
    counts = {int(d): v["count"] for d, v in run["participation"]["devices"].items()}
    assert counts == {0: 6, 1: 1, **({2: 1} if back == 5 else {})}
    assert sum(counts.values()) == sum(m["clients"] for m in rows)
    assert [e["round"] for e in run["ledger"]] == [0, 1, 2, 3, 4, 5]
    # the devices' own ledgers agree; device 2 failed before recording round 3
    job = s["flower"]["job_id"]
    assert DeviceLedger(cluster.state_dir(0), 0, job).rounds() == [0, 1, 2, 3, 4, 5]
    assert DeviceLedger(cluster.state_dir(2), 2, job).rounds() == [0, 1, *([4] if back == 5 else []), 5]


def test_participation_limit_holds_across_a_supernode_restart(cluster: FlowerCluster, tmp_path: Path) -> None:
    """k = 1: devices 0 and 1 contribute in a first run; device 0's SuperNode crashes and restarts;
    a second server for the same job (a fresh server ledger) asks again, the devices decline."""
    scenario_file = dp_ftrl_scenario(tmp_path / "flower-restart.toml", devices=3, per_round=3, rounds=1, k=1)
    job = {"scenario": str(scenario_file), "job-id": "restart-job", "round-timeout": 120.0}
    # devices 0 and 1: the shared cluster's SuperNodes
    first = cluster.flwr_run({**job, "out-dir": str(tmp_path / "first"), "min-nodes": 2})
    check_ran(first, cluster)
    assert read_run(tmp_path / "first")["diagnostics"][0]["clients"] == 2
    assert DeviceLedger(cluster.state_dir(0), 0, "restart-job").rounds() == [0]

    cluster.kill("node-0", signal.SIGKILL)
    cluster.start_supernode(0)  # same partition-id, same state-dir, new process and node id
    cluster.start_supernode(2)  # a device that has not contributed yet
    second = cluster.flwr_run({**job, "out-dir": str(tmp_path / "second"), "min-nodes": 3})
    check_ran(second, cluster)
    run = read_run(tmp_path / "second")
    row = run["diagnostics"][0]
    assert row["eligible"] == 3  # the new server's own ledger is empty: it asks everyone
    assert row["clients"] == 1  # only device 2 contributes
    assert run["summary"]["flower"]["declined"] is None and run["private_summary"]["flower"]["declined"] == 2
    assert run["participation"]["devices"] == {"2": {"count": 1, "last_round": 1}}
    assert sorted(e["device"] for e in run["events"] if e["event"] == "declined") == [0, 1]
    assert "declined" not in second.stdout  # a DP run does not log device-level events
    assert DeviceLedger(cluster.state_dir(0), 0, "restart-job").rounds() == [0]
    assert DeviceLedger(cluster.state_dir(1), 1, "restart-job").rounds() == [0]
    assert DeviceLedger(cluster.state_dir(2), 2, "restart-job").rounds() == [0]


def test_a_second_claim_of_a_rostered_device_is_refused_and_never_evicts(cluster: FlowerCluster, tmp_path: Path) -> None:
    """An impostor SuperNode claims device 0 while the honest node holds it: refused, counted,
    logged; the honest node keeps training every round and the impostor never trains."""
    scenario_file = dp_ftrl_scenario(tmp_path / "flower-sybil.toml", devices=2, per_round=2, rounds=4, k=4)
    out = tmp_path / "run"  # devices 0 and 1: the shared cluster's SuperNodes
    name = cluster.start_run({"scenario": str(scenario_file), "out-dir": str(out), "min-nodes": 2, "round-timeout": 120.0})
    # the impostor starts once the honest node holds device 0 (a round takes a few seconds: it
    # has the rest of the run to connect and claim)
    wait_for_log(cluster, name, "checked in as device 0", timeout=240)
    impostor_state = tmp_path / "impostor-state"
    cluster.start_supernode(0, name="impostor-0", **{"state-dir": str(impostor_state)})
    proc = cluster.wait_run(name, timeout=400)
    check_ran(proc, cluster)
    run = read_run(out)
    s = run["summary"]
    assert s["rounds"] == 4
    assert s["flower"]["duplicate_claim"] >= 1 and s["flower"]["devices"] == 2
    assert "claim refused (the first claim stands)" in proc.stdout
    assert [d["clients"] for d in run["diagnostics"]] == [2, 2, 2, 2]  # the honest node trained throughout
    assert DeviceLedger(cluster.state_dir(0), 0, s["flower"]["job_id"]).rounds() == [0, 1, 2, 3]
    assert DeviceLedger(impostor_state, 0, s["flower"]["job_id"]).rounds() == []
