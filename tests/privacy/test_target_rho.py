"""``[strategy] target-rho``: the noise multiplier is solved before the run, the run ends at that rho."""

from __future__ import annotations

import pytest

from fedsim.engine import run_scenario
from fedsim.errors import ScenarioError
from fedsim.privacy.calibration import calibrate_noise_multiplier
from fedsim.scenario import scenario_from_dict
from strategies.dp_fedavg import DPFedAvg
from strategies.dp_ftrl import DPFTRL

from ..conftest import SCENARIOS, run_cli


def tiny(strategy: dict, rounds: int = 12) -> dict:
    return {
        "name": "target_rho",
        "rounds": rounds,
        "clients-per-round": 10,
        "data": {"dataset": "synthetic", "num-devices": 40, "examples-per-device": 8, "num-features": 6},
        "model": {"name": "logreg"},
        "client": {"batch-size": 8},
        "strategy": strategy,
    }


@pytest.mark.parametrize(
    "strategy",
    [
        {"name": "dp-ftrl", "target-rho": 0.81, "max-participations": 3, "min-separation": 3},
        {"name": "dp-ftrl", "target-rho": 2.63, "max-participations": 2, "min-separation": 1, "restart-every": 6},
        {"name": "dp-fedavg", "target-rho": 0.81, "max-participations": 3, "min-separation": 3},
        {"name": "dp-fedavg", "target-rho": 0.81, "sampling": "poisson"},
    ],
)
def test_final_rho_equals_target(strategy: dict) -> None:
    result = run_scenario(scenario_from_dict(tiny(strategy)))
    assert result.summary["rho"] == pytest.approx(strategy["target-rho"], rel=1e-5)
    assert result.summary["rho"] <= strategy["target-rho"] * (1 + 1e-12)


def test_noise_equals_the_planning_code() -> None:
    s = DPFTRL(target_rho=0.81, max_participations=6, min_separation=313)
    z = calibrate_noise_multiplier(0.81, "dp-ftrl", rounds=2000, max_participations=6, min_separation=313)
    assert s.calibrated_noise_multiplier(num_rounds=2000) == z
    # the published Gboard figure: z = 7 over T = 2000 with (6, 313) gives rho = 0.81
    assert z == pytest.approx(7.0, rel=0.01)
    assert DPFedAvg(target_rho=1.0).calibrated_noise_multiplier(num_rounds=8) == pytest.approx(2.0, rel=1e-5)


def test_noise_multiplier_and_target_are_exclusive() -> None:
    with pytest.raises(ValueError, match="noise-multiplier or target-rho, not both"):
        DPFTRL(noise_multiplier=3.0, target_rho=1.0)
    with pytest.raises(ValueError, match="target-rho must be a finite number > 0"):
        DPFedAvg(target_rho=-1.0)


def test_unreachable_target_fails_before_the_run() -> None:
    raw = tiny({"name": "dp-ftrl", "target-rho": 1e20, "max-participations": 1})
    with pytest.raises(ScenarioError, match=r"strategy: target-rho = 1e\+20 over 12 rounds: .*every noise multiplier"):
        scenario_from_dict(raw)


def test_unreachable_target_cli_one_line_exit_2(tmp_path) -> None:
    out = tmp_path / "run"
    text = (SCENARIOS / "dp_ftrl.toml").read_text().replace("noise-multiplier = 6.5", "target-rho = 1e30")
    path = tmp_path / "s.toml"
    path.write_text(text)
    proc = run_cli("run", str(path), "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "target-rho" in lines[0] and lines[0].startswith("error:"), proc.stderr
    assert not out.exists()
