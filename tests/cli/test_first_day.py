"""A new user's first day: the solved noise multiplier is shown and recorded, replacing the
strategy with --set drops its parameters with one note (as sweeps do), a validation error comes
back before the heavy imports, and the output says what it costs and what it assumes."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest

from fedsim.cli import _summary_text, main
from fedsim.errors import ScenarioError, ScenarioNote
from fedsim.scenario import load_scenario, parse_override
from fedsim.sweep import Configuration, plan_sweep

from ..conftest import ROOT, SCENARIOS

QUICK = str(SCENARIOS / "quickstart.toml")
FTRL = str(SCENARIOS / "dp_ftrl.toml")
SMALL = ["--rounds", "2", "--set", "data.num-devices=200", "--set", "clients-per-round=20", "--quiet"]


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------------
# the noise multiplier that target-rho solved


def test_the_solved_noise_multiplier_is_on_screen_and_in_summary_json(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "r"
    code, out, err = _cli(capsys, "run", FTRL, *SMALL, "--set", "strategy.target-rho=0.5", "--out", str(run_dir))
    assert code == 0, err
    summary = json.loads((run_dir / "summary.json").read_text())
    ledger = json.loads((run_dir / "ledger.json").read_text())
    z = summary["noise_multiplier"]
    assert z == ledger[0]["event"]["noise_multiplier"] and z > 1
    assert f"dp_ftrl: noise multiplier {z:.4f} (solved from target-rho = 0.5)" in err  # before the first round
    assert f"noise        multiplier {z:.4f}" in out


def test_a_run_without_dp_has_a_null_noise_multiplier(tmp_path: Path, capsys) -> None:
    code, out, err = _cli(capsys, "run", QUICK, "--rounds", "1", "--quiet", "--out", str(tmp_path / "q"))
    assert code == 0, err
    assert json.loads((tmp_path / "q" / "summary.json").read_text())["noise_multiplier"] is None
    assert "noise multiplier" not in err and "multiplier" not in out


# ------------------------------------------------------------------------------------------------
# --set strategy.name: one behaviour with sweeps


def test_set_strategy_name_drops_the_replaced_strategys_parameters_with_one_note(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "f"
    code, out, err = _cli(capsys, "run", FTRL, *SMALL, "--set", "strategy.name=fedavg", "--out", str(run_dir))
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1
    assert "strategy.name = 'fedavg' replaces 'dp-ftrl'" in notes[0]
    for key in ("noise-multiplier", "clip-norm", "max-participations", "min-separation", "estimator"):
        assert f"strategy.{key}" in notes[0]
    # server momentum applies to FedAvg too: kept
    assert "strategy.momentum" not in notes[0]
    assert tomllib.loads((run_dir / "config.toml").read_text())["strategy"] == {"name": "fedavg", "server-lr": 1.0, "momentum": 0.9}


def test_a_parameter_set_for_the_new_strategy_is_still_checked(capsys) -> None:
    code, _, err = _cli(capsys, "run", FTRL, "--set", "strategy.name=fedavg", "--set", "strategy.noise-multiplier=2")
    assert code == 2
    assert "error: --set: strategy.noise-multiplier: unknown key 'noise-multiplier'" in err


def test_a_target_rho_override_replaces_the_files_noise_multiplier() -> None:
    with pytest.warns(ScenarioNote, match="in favour of the overridden strategy.target-rho: strategy.noise-multiplier"):
        scenario = load_scenario(FTRL, [parse_override("strategy.target-rho=0.5")])
    assert scenario.strategy.params["target_rho"] == 0.5 and "noise_multiplier" not in scenario.strategy.params


def test_without_a_strategy_override_an_unknown_parameter_is_still_an_error(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('name = "s"\n[strategy]\nname = "fedavg"\nnoise-multiplier = 2\n')
    with pytest.raises(ScenarioError, match="unknown key 'noise-multiplier'"):
        load_scenario(path)


def test_a_sweep_drops_them_the_same_way_with_one_note(tmp_path: Path) -> None:
    configs = [Configuration(f"strategy.name={n}", {"strategy.name": n}) for n in ("fedavg", "dp-ftrl")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        specs = plan_sweep(FTRL, configs, seeds=1, out=tmp_path, overrides=[(["rounds"], 2)])
    notes = [str(w.message) for w in caught if issubclass(w.category, ScenarioNote)]
    assert len(notes) == 1 and "fedavg: strategy.clip-norm" in notes[0] and "strategy.noise-multiplier" in notes[0]
    assert specs[0].raw["strategy"] == {"name": "fedavg", "server-lr": 1.0, "momentum": 0.9}  # server momentum applies to FedAvg too
    assert specs[1].raw["strategy"]["noise-multiplier"] == 6.5


# ------------------------------------------------------------------------------------------------
# start-up


def _heavy_modules_after(code: str) -> list[str]:
    heavy = ("torch", "flwr", "ray", "matplotlib")
    probe = code + f"\nimport json, sys\nprint(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_validation_error_comes_back_before_torch_flower_ray_or_plotting_is_imported() -> None:
    code = f"from fedsim.cli import main\nassert main(['run', {QUICK!r}, '--set', 'client.lr=-1']) == 2"
    assert _heavy_modules_after(code) == []


def test_the_summary_says_how_long_the_process_took_besides_the_rounds() -> None:
    summary = {
        "name": "q", "strategy": "fedavg", "rounds": 1, "rounds_planned": 1, "stopped_reason": "completed",
        "accuracy": 0.5, "loss": 1.0, "rho": None, "wall_time_s": 0.3,
    }
    text = _summary_text(summary, "runs/q", process_s=7.94)
    assert "wall time    0.3 s (the rounds); 7.9 s since the process started (start-up, imports, data)" in text


# ------------------------------------------------------------------------------------------------
# DP-FedAvg's fixed cohorts


def test_dp_fedavg_with_fixed_sampling_says_there_is_no_amplification(tmp_path: Path, capsys) -> None:
    dp_fedavg = str(SCENARIOS / "dp_fedavg.toml")
    code, _, err = _cli(capsys, "run", dp_fedavg, *SMALL, "--set", "strategy.sampling=fixed", "--out", str(tmp_path / "f"))
    assert code == 0, err
    assert 'samples a fixed cohort (sampling = "fixed"): no amplification by sampling' in err
    assert 'strategy.sampling = "poisson"' in err
    code, _, err = _cli(capsys, "run", dp_fedavg, *SMALL, "--out", str(tmp_path / "p"))
    assert code == 0, err
    assert "fixed cohort" not in err
