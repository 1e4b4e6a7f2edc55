"""DP-FTRL under Flower's SecAgg+ on a real deployment (a SuperLink, SuperNodes, ``flwr run``).

* the secure-aggregation run's model is the clear run's (the in-process simulator's, same key,
  seed and run id) up to the quantisation error, whose bound is asserted after round 1 (both
  start from the same model: the devices' updates are the same until quantised); rho is the
  plan's; the server never received an individual update (no array entry in any reply the
  ServerApp's grid delivered, and what the accumulator received was one sum per round);
* a SuperNode killed mid-round: a cohort of two cannot reconstruct the masks, so the round sums
  nothing; it is ended once with the strategy's noise (one ledger event, one release, one row),
  never released twice, and the run goes on;
* bad SecAgg+ parameters are one-line errors before anything runs.

The deployment tests share the session's cluster (SuperNodes for devices 0 and 1).
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from fedsim.engine import run_scenario
from fedsim.engine.checkpoint import CheckpointKey, decode
from fedsim.errors import ScenarioError
from fedsim.flower.device import DeviceLedger
from fedsim.flower.secagg import SecAggRound, quantisation_margin
from fedsim.flower.strategy import FedsimStrategy
from fedsim.privacy.noise import NoiseKey
from fedsim.scenario import FlowerConfig, load_scenario, scenario_from_dict

from ..conftest import run_cli
from .harness import FlowerCluster, check_ran, read_run, write_scenario


def secagg_table(name: str, *, rounds: int, k: int, **flower_keys: Any) -> dict[str, Any]:
    """DP-FTRL on two devices (digits, logistic regression) with ``[flower] secure-aggregation``."""
    return {
        "name": name,
        "seed": 7,
        "rounds": rounds,
        "clients-per-round": 2,
        "data": {"dataset": "digits", "num-devices": 2, "partitioner": "iid"},
        "model": {"name": "logreg"},
        "client": {"local-epochs": 1, "batch-size": 32, "lr": 0.1},
        "strategy": {
            "name": "dp-ftrl", "noise-multiplier": 0.5, "clip-norm": 1.0, "server-lr": 1.0, "momentum": 0.5,
            "max-participations": k, "min-separation": 0,
        },
        "privacy": {"delta": 1e-5},
        "flower": {"secure-aggregation": True, **flower_keys},
    }


@pytest.mark.flower
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_secure_dp_ftrl_is_the_clear_run_up_to_the_quantisation_error(
    shared_cluster: FlowerCluster, tmp_path: Path
) -> None:
    key_file = tmp_path / "fixed.key"
    NoiseKey.generate().save(key_file)  # the same noise as the in-process run below
    table = secagg_table("secagg", rounds=2, k=2)
    table["privacy"]["noise-key-file"] = str(key_file)
    scenario_file = write_scenario(tmp_path / "secagg.toml", table)
    out, state_dir = tmp_path / "run", tmp_path / "server-state"
    proc = shared_cluster.flwr_run(
        {"scenario": str(scenario_file), "out-dir": str(out), "state-dir": str(state_dir), "job-id": "secagg",
         "min-nodes": 2, "round-timeout": 120.0}
    )
    check_ran(proc, shared_cluster)
    run = read_run(out)
    s = run["summary"]
    assert (s["rounds"], s["stopped_reason"]) == (2, "completed")
    # the server never held an individual update: no reply carried an array (masked vectors are
    # bytes), and each round the accumulator got one sum of two devices' updates
    sa = s["flower"]["secure_aggregation"]
    assert sa["protocol"] == "SecAgg+ (Flower)" and sa["arrays_received"] == 0
    exact = run["private_summary"]["flower"]
    assert exact["secagg_rounds"] == 2 and exact["secagg_failed"] == 0
    assert [m["clients"] for m in run["diagnostics"]] == [2, 2]
    assert all(m["train_loss"] is None for m in run["diagnostics"])  # no device sends its loss
    # four SecAgg+ stages per device and round, each a message and a reply
    assert exact["traffic"]["device_rounds"] == 4 and exact["traffic"]["messages_received"] == 16
    assert s["flower"]["traffic"] is None  # exact figures of a DP run: private

    # rho is the plan's, one ledger event per round
    scenario = load_scenario(scenario_file)
    expected = run_scenario(
        replace(
            scenario,
            privacy=replace(scenario.privacy, run_id=s["run_id"]),
            checkpoint=replace(scenario.checkpoint, every=1, keep=2),
        ),
        run_dir=tmp_path / "clear",
    )
    assert s["rho"] == pytest.approx(expected.summary["rho"], rel=1e-12)
    assert [e["round"] for e in run["ledger"]] == [0, 1]

    # after round 1 both runs started from the same model and the devices' clipped updates are
    # the clear run's: each quantised update is within 2 * margin of it (the device clips to
    # C - margin, then stochastic rounding moves it by less than margin), so the round's sum is
    # within 2 * n * margin and the model (server lr 1, fixed denominator n = 2, the first step
    # of momentum SGD is the update itself) within 2 * n * margin / n; plus float rounding (the
    # in-process engine trains the cohort as one batch)
    auth = CheckpointKey.of(NoiseKey.load(key_file))
    secure_1 = decode((state_dir / "secagg" / "checkpoints" / "ckpt-00000001.pt").read_bytes(), auth)["params"]
    clear_1 = decode((tmp_path / "clear" / "checkpoints" / "ckpt-00000001.pt").read_bytes(), auth)["params"]
    margin = quantisation_margin(1.0, scenario.flower.secagg_quantization_range, secure_1.numel())
    bound = 2 * 2 * margin / 2
    err = float((secure_1 - clear_1).double().norm())
    assert 0 < err <= bound + 1e-5, (err, bound)
    # the final model: the same, the round-1 difference carried through one more round of training
    final = torch.load(out / "model.pt")["flat"]
    assert float((final - expected.params).double().norm()) <= 10 * (bound + 1e-5)


@pytest.mark.flower
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_supernode_killed_mid_round_leaves_the_round_unsummed_and_released_once(
    shared_cluster: FlowerCluster, tmp_path: Path
) -> None:
    table = secagg_table("secagg-kill", rounds=3, k=3)
    del table["flower"]  # turned on by the deployment's run config instead
    scenario_file = write_scenario(tmp_path / "secagg-kill.toml", table)
    out, state_dir = tmp_path / "run", tmp_path / "server-state"
    name = shared_cluster.start_run(
        {"scenario": str(scenario_file), "out-dir": str(out), "state-dir": str(state_dir), "job-id": "secagg-kill",
         "min-nodes": 2, "round-timeout": 15.0, "secure-aggregation": True}
    )
    # device 1 is killed once it has claimed round 2 in its ledger: it took part in SecAgg+'s
    # first two stages and is training (or has sent its masked vector)
    deadline = time.monotonic() + 240
    while 1 not in DeviceLedger(shared_cluster.state_dir(1), 1, "secagg-kill").rounds():
        assert time.monotonic() < deadline, shared_cluster.log(name)[-3000:]
        time.sleep(0.05)
    shared_cluster.kill("node-1", signal.SIGKILL)
    proc = shared_cluster.wait_run(name, timeout=300)
    check_ran(proc, shared_cluster)
    run = read_run(out)
    s = run["summary"]
    assert (s["rounds"], s["stopped_reason"]) == (3, "completed")
    assert s["flower"]["secure_aggregation"]["protocol"] == "SecAgg+ (Flower)"
    rows = run["diagnostics"]
    assert rows[0]["clients"] == 2
    assert rows[1]["clients"] == 0  # SecAgg+ could not reconstruct the masks: nothing summed
    assert rows[2]["clients"] == 0  # one device left: no secure sum of one
    exact = run["private_summary"]["flower"]
    assert exact["secagg_rounds"] == 1 and exact["secagg_failed"] == 2
    events = [e for e in run["events"] if e["event"] == "secagg_failed"]
    assert [e["round"] for e in events] == [2, 3]
    # device-level facts of a DP run are private, Flower's own SecAgg+ log lines too
    assert "nothing summed" not in proc.stdout and "missed a SecAgg+ stage" not in proc.stdout
    assert "halted" not in proc.stdout and "Insufficient available nodes" not in proc.stdout
    flower_lines = [e["message"] for e in run["events"] if e["event"] == "secagg_log"]
    assert "Secure aggregation halted." in flower_lines
    # each round ended once: one privacy event, one metrics row and one release each
    assert [e["round"] for e in run["ledger"]] == [0, 1, 2]
    assert [m["round"] for m in run["metrics"]] == [1, 2, 3]
    releases = (state_dir / "secagg-kill" / "releases.jsonl").read_text().splitlines()
    released = [json.loads(line).get("round") for line in releases]
    assert sorted(r for r in released if r is not None) == [1, 2, 3]
    # the server's ledger holds what was summed: round 1's two devices
    counts = {int(d): v["count"] for d, v in run["participation"]["devices"].items()}
    assert counts == {0: 1, 1: 1}


@pytest.mark.flower
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_bad_secagg_parameters_stop_the_server_before_anything_is_sent(shared_cluster: FlowerCluster, tmp_path: Path) -> None:
    table = secagg_table("secagg-bad", rounds=1, k=1, **{"secagg-threshold": 3})
    scenario_file = write_scenario(tmp_path / "bad.toml", table)
    proc = shared_cluster.flwr_run({"scenario": str(scenario_file), "out-dir": str(tmp_path / "run"), "min-nodes": 2})
    assert "flower.secagg-threshold: must be <= the cohort (clients-per-round = 2), got 3" in proc.stdout
    assert "checked in" not in proc.stdout and "Traceback" not in proc.stdout
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("flower_keys", "message"),
    [
        ({"secagg-threshold": 3}, "flower.secagg-threshold: must be <= the cohort (clients-per-round = 2), got 3"),
        ({"secagg-modulus": 0}, "flower.secagg-modulus: must be a power of 2, at most 2**32 (4294967296), got 0"),
        ({"secagg-modulus": 3 * 2**20}, "flower.secagg-modulus: must be a power of 2"),
        ({"secagg-modulus": 2**22}, "flower.secagg-modulus: must be > secagg-quantization-range (4194304), got 4194304"),
        ({"secagg-modulus": 2**23}, "would wrap around: clients-per-round (2) x secagg-quantization-range (4194304) must be < secagg-modulus (8388608)"),
        ({"secagg-shares": 2}, "flower.secagg-shares: must be 0 (every member of the cohort) or >= 3, got 2"),
        ({"secagg-shares": 5, "secagg-threshold": 5}, "flower.secagg-threshold: must be < secagg-shares (5), got 5"),
        ({"secagg-threshold": 1}, "flower.secagg-threshold: must be 0 (a majority of the shares) or >= 2, got 1"),
        ({"secagg-clipping-range": 0.0}, "flower.secagg-clipping-range: must be > 0"),
        ({"secagg-quantization-range": 2**31}, "flower.secagg-quantization-range: must be an integer in [2, 2**30]"),
    ],
)
def test_bad_secagg_parameters_are_one_line_errors(flower_keys: dict[str, Any], message: str) -> None:
    table = secagg_table("bad", rounds=1, k=1, **flower_keys)
    with pytest.raises(ScenarioError) as err:
        scenario_from_dict(table)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("flower_keys", "message"),
    [
        ({"secagg-threshold": 3}, "flower.secagg-threshold: must be <= the cohort (clients-per-round = 2), got 3"),
        ({"secagg-modulus": 0}, "flower.secagg-modulus: must be a power of 2, at most 2**32 (4294967296), got 0"),
    ],
)
def test_the_cli_refuses_bad_secagg_parameters_in_one_line(tmp_path: Path, flower_keys: dict[str, Any], message: str) -> None:
    table = secagg_table("bad", rounds=1, k=1, **flower_keys)
    proc = run_cli("run", str(write_scenario(tmp_path / "bad.toml", table)), "--out", str(tmp_path / "run"))
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "run").exists()


def test_secure_aggregation_needs_a_cohort_uniform_weights_and_a_fine_enough_quantisation(tmp_path: Path) -> None:
    table = secagg_table("one", rounds=1, k=1)
    table["clients-per-round"] = 1
    with pytest.raises(ScenarioError, match="clients-per-round: secure aggregation needs a cohort of at least 2"):
        scenario_from_dict(table)
    fedavg = secagg_table("fedavg", rounds=1, k=1)
    fedavg["strategy"] = {"name": "fedavg"}
    with pytest.raises(ScenarioError, match="flower.secure-aggregation: .* weights them by examples"):
        FedsimStrategy(scenario_from_dict(fedavg))
    # adaptive clipping needs each client's clipped bit, which secure aggregation does not sum
    adaptive = secagg_table("adaptive", rounds=1, k=1)
    adaptive["strategy"].update({"target-quantile": 0.5, "count-noise-multiplier": 5.0})
    with pytest.raises(ScenarioError, match="flower.secure-aggregation: .* adaptive clipping"):
        FedsimStrategy(scenario_from_dict(adaptive))
    # a quantisation too coarse for the model: its rounding alone could exceed the clip bound
    coarse = secagg_table("coarse", rounds=1, k=1, **{"secagg-quantization-range": 16})
    with pytest.raises(ScenarioError, match=r"flower.secagg-quantization-range: the quantisation step moves an update by up to 3\.\d+ \(L2, 650 parameters\)"):
        FedsimStrategy(scenario_from_dict(coarse))


def test_secagg_round_parameters_follow_the_cohort() -> None:
    cfg = FlowerConfig(secure_aggregation=True)
    two = SecAggRound.resolve(cfg, 2, 1.0)
    assert isinstance(two, SecAggRound) and (two.shares, two.threshold, two.clipping_range) == (2, 2, 1.0)
    assert isinstance(SecAggRound.resolve(cfg, 1, 1.0), str)  # no secure sum of one update
    five = SecAggRound.resolve(FlowerConfig(secure_aggregation=True, secagg_shares=4), 9, 0.5)
    assert isinstance(five, SecAggRound) and (five.shares, five.threshold) == (5, 3)  # shares made odd, majority
    wrap = SecAggRound.resolve(FlowerConfig(secure_aggregation=True, secagg_quantization_range=2**30), 4, 1.0)
    assert isinstance(wrap, str) and "wrap around" in wrap
    # the margin: stochastic rounding moves each coordinate by less than 2 r / Q
    assert quantisation_margin(1.0, 2**22, 650) == pytest.approx(2 / 2**22 * 650**0.5, rel=2e-6)
