"""A run with ``[privacy] equivalent-cohort``: the run's guarantee and the deployment's, apart, in every
file the run writes and on the console; the errors that refuse a deployment the run cannot stand for."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w

import fedsim
from fedsim.cli import main as cli_main
from fedsim.engine.rundir import metrics_figure
from fedsim.scenario import scenario_from_dict
from tests.conftest import tiny_scenario

ROUNDS, N, BIG = 6, 8, 6500
DP = {"name": "dp-ftrl", "target-rho": 0.81, "clip-norm": 0.5, "max-participations": 2, "min-separation": 2,
      "momentum": 0.0}


def _raw(**privacy) -> dict:
    return tiny_scenario("equivalent", rounds=ROUNDS, per_round=N, devices=40, strategy=dict(DP),
                         privacy={"equivalent-cohort": BIG, **privacy})


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("equivalent") / "run"
    return fedsim.run(_raw(), out=out)


def test_the_run_reports_its_own_guarantee_and_the_deployments_apart(run) -> None:
    plan = fedsim.plan("dp-ftrl", target_rho=0.81, rounds=ROUNDS, max_participations=2, min_separation=2, delta=1e-6,
                       equivalent_cohort=BIG, clients_per_round=N)
    s = run.summary
    # the run as it ran: the simulation's multiplier z n / N, and its (huge) rho, as planned
    assert s["noise_multiplier"] == pytest.approx(plan["noise_multiplier"])
    assert s["rho"] == pytest.approx(plan["rho"], rel=1e-9) and s["rho"] > 1000
    # the deployment's: rho = the target, z the solved one
    assert s["equivalent_rho"] == pytest.approx(0.81, rel=1e-6) == plan["equivalent_rho"]
    assert s["equivalent_epsilon"] == pytest.approx(plan["equivalent_epsilon"])
    eq = s["equivalent"]
    assert eq["cohort"] == BIG and eq["population"] is None and eq["clients_per_round"] == N
    assert eq["noise_multiplier"] == pytest.approx(plan["equivalent"]["noise_multiplier"])
    assert eq["min_population"] == BIG * 3  # b + 1 = 3 = ceil(6 / 2)
    assert "not about this run" in eq["statement"]


def test_metrics_and_ledgers_keep_the_two_apart(run) -> None:
    rows = run.metrics
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert all(r["equivalent_rho"] < 1 < r["rho"] for r in rows)
    assert rows[-1]["equivalent_rho"] == pytest.approx(0.81, rel=1e-6)
    assert rows[-1]["rho"] == run.summary["rho"]
    run_dir = Path(run.run_dir)
    ledger = json.loads((run_dir / "ledger.json").read_text())
    equivalent = json.loads((run_dir / "ledger_equivalent.json").read_text())
    z_run, z_dep = run.summary["noise_multiplier"], run.summary["equivalent"]["noise_multiplier"]
    assert [e["event"]["noise_multiplier"] for e in ledger] == pytest.approx([z_run] * ROUNDS)
    assert {e["event"]["noise_multiplier"] for e in equivalent["events"]} == {z_dep}
    assert equivalent["rho"] == run.summary["equivalent_rho"] and len(equivalent["events"]) == ROUNDS
    config = tomllib.loads((run_dir / "config.toml").read_text())
    assert config["privacy"]["equivalent-cohort"] == BIG


def test_the_plot_gives_the_deployments_rho_its_own_labelled_panel(run) -> None:
    import matplotlib.pyplot as plt

    fig = metrics_figure(run.metrics, "equivalent")
    try:
        labels = [ax.get_ylabel() for ax in fig.axes]
        assert "rho (zCDP) of this run" in labels
        assert any(label.startswith("deployment-equivalent rho") and "not this run" in label for label in labels)
    finally:
        plt.close(fig)


def test_without_the_key_nothing_changes(tmp_path: Path) -> None:
    raw = tiny_scenario("plain", rounds=2, per_round=N, devices=40, strategy=dict(DP))
    result = fedsim.run(raw, out=tmp_path / "run")
    assert "equivalent_rho" not in result.metrics[-1] and "equivalent" not in result.summary
    assert not (tmp_path / "run" / "ledger_equivalent.json").exists()
    assert "equivalent-cohort" not in tomllib.loads((tmp_path / "run" / "config.toml").read_text())["privacy"]


def test_the_console_labels_the_deployments_guarantee(tmp_path: Path, capsys) -> None:
    path = tmp_path / "s.toml"
    path.write_text(tomli_w.dumps(_raw()))
    assert cli_main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "(rho and epsilon above: this run as it ran)" in out
    assert "deployment-equivalent  rho 0.8100" in out and "not about this run" in out
    assert "deployment-equivalent noise: multiplier" in out


def test_adaptive_clipping_combines_and_both_ledgers_hold_the_counts(tmp_path: Path) -> None:
    raw = _raw()
    raw["strategy"]["target-quantile"] = 0.5
    result = fedsim.run(raw, out=tmp_path / "run")
    plan = fedsim.plan("dp-ftrl", target_rho=0.81, rounds=ROUNDS, max_participations=2, min_separation=2, delta=1e-6,
                       equivalent_cohort=BIG, clients_per_round=N, target_quantile=0.5)
    s = result.summary
    # the deployment's guarantee includes its clipped-count queries: the target, as planned
    assert s["equivalent_rho"] == pytest.approx(0.81, rel=1e-6) and s["equivalent_rho"] == pytest.approx(
        plan["equivalent_rho"], rel=1e-9)
    assert s["rho"] == pytest.approx(plan["rho"], rel=1e-9)
    eq = s["equivalent"]
    assert eq["count_noise_multiplier"] == pytest.approx(plan["equivalent"]["count_noise_multiplier"])
    assert eq["simulated_count_noise_multiplier"] == pytest.approx(eq["count_noise_multiplier"] * N / BIG)
    run_dir = Path(result.run_dir)
    ledger = json.loads((run_dir / "ledger.json").read_text())
    equivalent = json.loads((run_dir / "ledger_equivalent.json").read_text())
    for events, zb in ((ledger, eq["simulated_count_noise_multiplier"]),
                       (equivalent["events"], eq["count_noise_multiplier"])):
        counts = [e["event"] for e in events if e["event"]["type"] == "clipped_count"]
        assert len(events) == 2 * ROUNDS and len(counts) == ROUNDS
        assert [c["noise_multiplier"] for c in counts] == pytest.approx([zb] * ROUNDS)
    clips = [r["clip_norm"] for r in result.metrics]
    assert len(set(clips)) > 1  # the clip norm moves


def test_the_console_names_the_deployments_count_noise(tmp_path: Path, capsys) -> None:
    raw = _raw()
    raw["strategy"].update({"target-quantile": 0.5, "count-rho-fraction": 0.1})
    path = tmp_path / "s.toml"
    path.write_text(tomli_w.dumps(raw))
    assert cli_main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet", "--rounds", "1"]) == 0
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "adaptive clipping: the clipped count's noise multiplier" in out and f"x {N} / {BIG:,})" in out


GIVEN = {**{k: v for k, v in DP.items() if k != "target-rho"}, "noise-multiplier": 3.0}
FEDAVG_DP = {**{k: v for k, v in DP.items() if k not in ("name", "momentum")}, "name": "dp-fedavg",
             "sampling": "poisson"}


@pytest.mark.parametrize(("strategy", "privacy", "key", "message"), [
    (DP, {"equivalent-cohort": 4}, "privacy", "equivalent-cohort = 4 is smaller than the simulated cohort"),
    ({"name": "fedavg"}, {"equivalent-cohort": BIG}, "privacy.equivalent-cohort", "needs a DP strategy"),
    (DP, {"equivalent-cohort": BIG, "equivalent-population": 10_000}, "privacy",
     "equivalent-population = 10000 cannot supply equivalent-cohort = 6500 clients in each of 6 rounds"),
    (FEDAVG_DP, {"equivalent-cohort": BIG}, "privacy", "equivalent-population must be stated"),
    (DP, {"equivalent-population": 100}, "privacy.equivalent-population", "without equivalent-cohort"),
    ({**GIVEN, "noise-multiplier": 1e-4}, {"equivalent-cohort": BIG}, "privacy",
     "noise-multiplier = 0.0001 scaled to the simulation (0.0001 x clients-per-round 8 / equivalent-cohort 6500)"),
    ({**GIVEN, "target-quantile": 0.5, "count-noise-multiplier": 1e-4}, {"equivalent-cohort": BIG}, "privacy",
     "count-noise-multiplier = 0.0001 scaled to the simulation"),
])
def test_bad_equivalents_are_refused_naming_the_key(strategy: dict, privacy: dict, key: str, message: str) -> None:
    from fedsim.errors import ScenarioError

    raw = tiny_scenario("bad", rounds=ROUNDS, per_round=N, devices=40, strategy=dict(strategy), privacy=privacy)
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict(raw, source="s.toml")
    assert info.value.key == key and message in str(info.value)
    assert "\n" not in str(info.value)


def test_the_command_line_refuses_a_small_equivalent_cohort_with_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(tomli_w.dumps(_raw()))
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim", "run", str(path), "--set", "privacy.equivalent-cohort=5", "--out",
         str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "equivalent-cohort = 5 is smaller than the simulated cohort (clients-per-round = 8)" in lines[0]
