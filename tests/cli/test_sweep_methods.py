"""``fedsim sweep --config 'LABEL: ...' --last-evals N``: named methods in tables and plots, the
deployment-equivalent guarantee beside the run's, and accuracy as the mean of the last evaluations."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import tomli_w

from fedsim.cli import main as cli_main
from fedsim.sweep import SweepError, combine, parse_config, plan_sweep, run_sweep, sweep_figures
from tests.conftest import tiny_scenario

METHODS = [
    "DP-FTRL (tree): strategy.mechanism=tree",
    "clip-only: strategy.noise-multiplier=1e-6, privacy.equivalent-cohort=0",
    "FedAvg: strategy.name=fedavg, privacy.equivalent-cohort=0",
]


def test_parse_config_reads_a_label_and_toml_values() -> None:
    assert parse_config("clip-only: strategy.noise-multiplier=1e-6, privacy.equivalent-cohort=0") == (
        "clip-only", {"strategy.noise-multiplier": 1e-6, "privacy.equivalent-cohort": 0})
    assert parse_config("base:") == ("base", {})
    assert parse_config("x: data.public-plays=[\"a\", \"b\"]") == ("x", {"data.public-plays": ["a", "b"]})
    for bad in ("no label", ": a=1", "x: a", "x: a=1, a=2"):
        with pytest.raises(SweepError):
            parse_config(bad)


def test_methods_cross_the_grid_under_their_names() -> None:
    configs = combine([("DP-FTRL (tree)", {"strategy.mechanism": "tree"})], [{"strategy.target-rho": 0.2}, {}][:1])
    (c,) = configs
    assert c.method == "DP-FTRL (tree)" and c.name == "dp-ftrl-tree__strategy.target-rho=0.2"
    assert c.label == "DP-FTRL (tree), target-rho 0.2"
    assert c.overrides == {"strategy.mechanism": "tree", "strategy.target-rho": 0.2}
    with pytest.raises(SweepError, match="also a --grid key"):
        combine([("a", {"strategy.target-rho": 1.0})], [{"strategy.target-rho": 0.2}])


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("methods")
    raw = tiny_scenario("methods", rounds=4, per_round=8, devices=40,
                        strategy={"name": "dp-ftrl", "target-rho": 0.81, "clip-norm": 0.5, "max-participations": 2,
                                  "min-separation": 1, "momentum": 0.0},
                        privacy={"equivalent-cohort": 1000})
    (tmp / "s.toml").write_text(tomli_w.dumps(raw))
    argv = ["sweep", str(tmp / "s.toml"), "--out", str(tmp / "out"), "--workers", "1", "--quiet", "--last-evals", "2"]
    for method in METHODS:
        argv += ["--config", method]
    assert cli_main(argv) == 0
    return tmp / "out"


def test_the_table_names_methods_and_gives_both_guarantees(swept: Path) -> None:
    table = (swept / "results.md").read_text()
    head, _, *rows = table.splitlines()
    assert "accuracy (mean of the last 2 evaluations)" in head
    assert "rho (zCDP) of the run" in head and "deployment-equivalent rho" in head
    assert [r.split(" | ")[0].strip("| ") for r in rows] == ["DP-FTRL (tree)", "clip-only", "FedAvg"]
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[-3] == "0.81" and float(cells[4]) > 1000  # the deployment's rho; the run's own is huge
    assert "for 1,000 clients" in cells[1]
    assert [c.strip() for c in rows[2].strip("|").split("|")][4:8] == ["-", "-", "-", "-"]  # FedAvg: no DP


def test_accuracy_is_the_mean_of_the_last_evaluations(swept: Path) -> None:
    rows = list(csv.DictReader((swept / "runs.csv").open()))
    tree = next(r for r in rows if r["configuration"] == "DP-FTRL (tree)")
    metrics = [json.loads(line) for line in (Path(tree["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    last = [m["accuracy"] for m in metrics if m["accuracy"] is not None][-2:]
    assert float(tree["accuracy_last2"]) == pytest.approx(sum(last) / 2)
    assert float(tree["equivalent_rho"]) == pytest.approx(0.81, rel=1e-6) and tree["run_id"]
    results = list(csv.DictReader((swept / "results.csv").open()))
    assert float(results[0]["accuracy_mean"]) == pytest.approx(sum(last) / 2)
    assert results[0]["method"] == "DP-FTRL (tree)"


def test_the_plots_use_method_names_and_the_deployments_rho(swept: Path) -> None:
    configs = [c for m in METHODS for c in combine([parse_config(m)], [])]
    specs = plan_sweep(swept.parent / "s.toml", configs, seeds=1, out=swept)
    result = run_sweep(specs, swept, workers=1, progress=False, last_evals=2)  # all complete: skipped
    assert result.skipped == len(specs)
    by_round, by_rho = sweep_figures(result)
    try:
        assert [t.get_text() for t in by_round.axes[0].get_legend().get_texts()] == [
            "DP-FTRL (tree)", "clip-only", "FedAvg"]
        ax = by_rho.axes[0]
        assert ax.get_xlabel().startswith("deployment-equivalent rho (zCDP) for 1,000 clients per round")
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == ["DP-FTRL (tree)", "clip-only (no deployment rho)", "FedAvg (no DP)"]
        (tree,) = [line for line in ax.lines if line.get_label() == "DP-FTRL (tree)"]
        assert list(tree.get_xdata()) == pytest.approx([0.81], rel=1e-6)
        assert ax.get_xscale() == "linear" and [t.get_text() for t in ax.get_xticklabels()] == ["0.81"]
    finally:
        plt.close(by_round)
        plt.close(by_rho)
