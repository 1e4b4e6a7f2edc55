"""``fedsim sweep``: grid expansion, validation before any run, results files, resume."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from fedsim.errors import ScenarioError
from fedsim.sweep import (
    Configuration,
    SweepError,
    expand_grid,
    parse_grid,
    plan_sweep,
    run_sweep,
)

from ..conftest import run_cli

TINY = """
name = "tiny"
seed = 3
rounds = 4
clients-per-round = 5

[data]
dataset = "synthetic"
num-devices = 20
examples-per-device = 8
num-features = 5
num-classes = 3

[model]
name = "logreg"

[client]
batch-size = 8
lr = 0.2

[strategy]
name = "dp-ftrl"
target-rho = 1.0
clip-norm = 0.5
max-participations = 2
min-separation = 1
estimator = "efficient"
"""


@pytest.fixture
def scenario(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def grid_configs(*flags: str) -> tuple[list[Configuration], list[str]]:
    grid = [parse_grid(f) for f in flags]
    return [Configuration(", ".join(f"{k}={v}" for k, v in c.items()), c) for c in expand_grid(grid)], [k for k, _ in grid]


def test_parse_and_expand_grid() -> None:
    assert parse_grid("strategy.target-rho=0.81,2.63") == ("strategy.target-rho", [0.81, 2.63])
    assert parse_grid("strategy.name=fedavg,dp-ftrl") == ("strategy.name", ["fedavg", "dp-ftrl"])
    assert parse_grid("rounds=3") == ("rounds", [3])
    combos = expand_grid([("a", [1, 2]), ("b.c", ["x", "y", "z"])])
    assert len(combos) == 6
    assert combos[:3] == [{"a": 1, "b.c": "x"}, {"a": 1, "b.c": "y"}, {"a": 1, "b.c": "z"}]
    for bad in ("strategy.name", "=1,2", "a..b=1", "a=1,,2", "a=1,1"):
        with pytest.raises(SweepError):
            parse_grid(bad)
    with pytest.raises(SweepError, match="given twice"):
        expand_grid([("a", [1]), ("a", [2])])


def test_plan_drops_parameters_a_strategy_does_not_take(scenario: Path, tmp_path: Path) -> None:
    configs, keys = grid_configs("strategy.name=fedavg,dp-fedavg,dp-ftrl", "strategy.target-rho=0.5,2.0")
    specs = plan_sweep(scenario, configs, seeds=2, out=tmp_path / "sweep", check_grid_keys=keys)
    names = list(dict.fromkeys(s.config.name for s in specs))
    # fedavg takes no target-rho: its two grid points are one configuration
    assert len(names) == 5 and len(specs) == 10
    fedavg = [s for s in specs if s.raw["strategy"]["name"] == "fedavg"]
    assert len(fedavg) == 2 and fedavg[0].config.overrides == {"strategy.name": "fedavg"}
    assert set(fedavg[0].raw["strategy"]) <= {"name", "server-lr"}
    assert {s.seed for s in specs} == {3, 4}
    avg = [s for s in specs if s.raw["strategy"]["name"] == "dp-fedavg"]
    assert {s.raw["strategy"]["target-rho"] for s in avg} == {0.5, 2.0}
    assert "estimator" not in avg[0].raw["strategy"]  # a DP-FTRL-only parameter
    assert all(s.noise_multiplier > 0 for s in specs if s.raw["strategy"]["name"] != "fedavg")
    assert all(s.run_dir.parent.parent == tmp_path / "sweep" for s in specs)
    assert not (tmp_path / "sweep").exists()  # planning runs nothing


def test_unknown_or_invalid_grid_key_fails_before_any_run(scenario: Path, tmp_path: Path) -> None:
    configs, keys = grid_configs("strategy.target-rhoo=0.5,2.0")
    with pytest.raises(SweepError, match="--grid strategy.target-rhoo: unknown key"):
        plan_sweep(scenario, configs, seeds=1, out=tmp_path / "s", check_grid_keys=keys)
    configs, keys = grid_configs("client.lrr=0.1,0.2")
    with pytest.raises(ScenarioError, match="client.lrr"):
        plan_sweep(scenario, configs, seeds=1, out=tmp_path / "s", check_grid_keys=keys)
    configs, keys = grid_configs("client.lr=0.1,-1")
    with pytest.raises(ScenarioError, match=r"--grid: client.lr: must be > 0"):
        plan_sweep(scenario, configs, seeds=1, out=tmp_path / "s", check_grid_keys=keys)
    assert not (tmp_path / "s").exists()


def test_sweep_results_and_resume(scenario: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    configs, keys = grid_configs("strategy.name=fedavg,dp-ftrl", "strategy.target-rho=0.5,2.0")
    specs = plan_sweep(scenario, configs, seeds=2, out=out, check_grid_keys=keys)
    lines: list[str] = []
    result = run_sweep(specs, out, workers=1, progress=False, echo=lines.append)
    assert not result.failed and result.skipped == 0
    assert len([ln for ln in lines if ln.startswith("done")]) == len(specs) == 6
    for spec in specs:
        assert (spec.run_dir / "summary.json").is_file() and (spec.run_dir / "metrics.jsonl").is_file()
    rows = list(csv.DictReader((out / "results.csv").read_text(encoding="utf-8").splitlines()))
    assert len(rows) == 3
    by_rho = {r["strategy.target-rho"]: r for r in rows if r["strategy.name"] == "dp-ftrl"}
    for target in ("0.5", "2.0"):
        assert float(by_rho[target]["rho"]) == pytest.approx(float(target), rel=1e-5)
        assert by_rho[target]["seeds"] == "2" and float(by_rho[target]["accuracy_sd"]) >= 0
    fedavg = next(r for r in rows if r["strategy.name"] == "fedavg")
    assert fedavg["rho"] == "" and fedavg["noise_multiplier"] == ""
    # the mean over seeds is the mean of the runs' summaries
    accs = [json.loads((s.run_dir / "summary.json").read_text())["accuracy"] for s in specs if s.config.name == specs[0].config.name]
    assert float(rows[0]["accuracy_mean"]) == pytest.approx(sum(accs) / len(accs))
    runs = list(csv.DictReader((out / "runs.csv").read_text(encoding="utf-8").splitlines()))
    assert len(runs) == 6 and {r["seed"] for r in runs} == {"3", "4"}
    md = (out / "results.md").read_text()
    assert md.count("\n") == 2 + 3 and "± " in md and "strategy.target-rho=0.5" in md
    assert (out / "accuracy_vs_round.png").stat().st_size > 0 and (out / "accuracy_vs_rho.png").stat().st_size > 0

    # resume: everything complete is skipped, files untouched
    stamps = {s.run_dir: (s.run_dir / "summary.json").stat().st_mtime_ns for s in specs}
    again = run_sweep(specs, out, workers=1, progress=False, echo=lines.append)
    assert again.skipped == 6 and not again.failed
    assert all((s.run_dir / "summary.json").stat().st_mtime_ns == stamps[s.run_dir] for s in specs)
    # an interrupted run (no summary.json) and a run of a changed scenario are run again
    (specs[1].run_dir / "summary.json").unlink()
    changed = plan_sweep(scenario, configs, seeds=2, out=out, overrides=[(["rounds"], 3)], check_grid_keys=keys)
    third = run_sweep(changed[:2], out, workers=1, progress=False, echo=lines.append)
    assert third.skipped == 0 and json.loads((changed[0].run_dir / "summary.json").read_text())["rounds"] == 3
    fourth = run_sweep(specs[2:], out, workers=1, progress=False, echo=lines.append)
    assert fourth.skipped == 4
    # a sweep directory moved elsewhere (or assembled from several machines) is still complete
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    fifth = run_sweep(plan_sweep(scenario, configs, seeds=2, out=moved, check_grid_keys=keys)[2:], moved,
                      workers=1, progress=False, echo=lines.append)
    assert fifth.skipped == 4


def test_cli_parallel_workers_one_line_per_run(scenario: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    proc = run_cli("sweep", str(scenario), "--grid", "strategy.name=fedavg,dp-ftrl", "--seeds", "2",
                   "--out", str(out), "--workers", "2", "--quiet")
    assert proc.returncode == 0, proc.stderr
    done = [ln for ln in proc.stderr.splitlines() if ln.startswith("done")]
    assert len(done) == 4 and any("rho 1" in ln for ln in done)
    assert "| strategy.name=dp-ftrl |" in proc.stdout
    assert (out / "results.md").read_text() == proc.stdout
    again = run_cli("sweep", str(scenario), "--grid", "strategy.name=fedavg,dp-ftrl", "--seeds", "2",
                    "--out", str(out), "--quiet")
    assert again.returncode == 0 and "4 of 4 runs already complete" in again.stderr
    assert not [ln for ln in again.stderr.splitlines() if ln.startswith("done")]


def test_cli_unknown_grid_key_exit_2_nothing_run(scenario: Path, tmp_path: Path) -> None:
    out = tmp_path / "bad"
    proc = run_cli("sweep", str(scenario), "--grid", "strategy.name=fedavg,dp-ftrl", "--grid", "data.num-devicez=1,2",
                   "--out", str(out))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "num-devicez" in lines[0], proc.stderr
    assert not out.exists()
