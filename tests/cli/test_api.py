"""The Python API (``fedsim.run``, ``fedsim.plan``): the README's example runs as written, the
results match the run directory and the command line, and ``import fedsim`` stays light."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import fedsim
from fedsim.engine.rundir import RunDirExists
from fedsim.errors import ScenarioError, ScenarioNote

from ..conftest import ROOT, SCENARIOS, tiny_scenario


def readme_python_example() -> str:
    """The ```python block of the README's "From Python" section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### From Python", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "README.md: no ```python block in 'From Python'"
    return match.group(1)


def test_the_readme_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "scenarios").symlink_to(SCENARIOS)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_python_example(), "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    result, plan = namespace["result"], namespace["plan"]
    run_dir = tmp_path / "runs" / "from-python"
    assert result.run_dir == Path("runs/from-python") and run_dir.is_dir()
    assert result.summary == json.loads((run_dir / "summary.json").read_text())
    assert result.summary["rounds"] == 2 and result.scenario.client.lr == 0.05
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert result.metrics == lines
    df = namespace["df"]
    assert list(df.index) == [1, 2] and df["accuracy"].tolist() == [row["accuracy"] for row in lines]
    assert plan["noise_multiplier"] == pytest.approx(6.98323, abs=1e-5)
    assert "6.983" in out


def test_run_takes_a_dict_and_refuses_an_earlier_run_unless_overwrite(tmp_path: Path) -> None:
    raw = tiny_scenario(rounds=2)
    first = fedsim.run(raw, out=tmp_path / "r")
    assert first.summary["rounds"] == 2 and len(first.metrics) == 2
    with pytest.raises(RunDirExists, match="already holds a finished run"):
        fedsim.run(raw, out=tmp_path / "r")
    again = fedsim.run(first.scenario, overrides={"rounds": 1}, out=tmp_path / "r", overwrite=True)
    assert again.summary["rounds"] == 1


def test_bad_overrides_raise_the_command_lines_message(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"--set: client.lr: must be > 0, got -1"):
        fedsim.run(SCENARIOS / "quickstart.toml", overrides={"client.lr": -1}, out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_replacing_the_strategy_drops_its_parameters_with_a_note(tmp_path: Path) -> None:
    with pytest.warns(ScenarioNote, match="strategy.noise-multiplier"):
        out = fedsim.run(SCENARIOS / "dp_ftrl.toml", overrides={"strategy.name": "fedavg", "rounds": 1,
                                                                 "data.num-devices": 100, "clients-per-round": 10},
                         out=tmp_path / "f")
    assert out.summary["strategy"] == "fedavg" and out.summary["noise_multiplier"] is None


def _cli_json(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "fedsim", "privacy", *args, "--json"], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize(
    ("mechanism", "kwargs", "argv"),
    [
        ("dp-ftrl", dict(target_rho=0.81, rounds=2000, max_participations=6, min_separation=313, delta=1e-10),
         ["--target-rho", "0.81", "--rounds", "2000", "--max-participations", "6", "--min-separation", "313",
          "--delta", "1e-10"]),
        ("dp-fedavg", dict(noise_multiplier=1.0, rounds=1000, sampling_rate=0.01, delta=1e-6),
         ["--noise-multiplier", "1", "--rounds", "1000", "--sampling-rate", "0.01", "--delta", "1e-6"]),
        ("dp-ftrl", dict(noise_multiplier=2.0, rounds=40, max_participations=2, min_separation=9, delta=1e-6,
                         noise_mechanism="banded"),
         ["--noise-multiplier", "2", "--rounds", "40", "--max-participations", "2", "--min-separation", "9",
          "--delta", "1e-6", "--mechanism", "banded"]),
    ],
)
def test_plan_gives_what_the_privacy_command_prints(mechanism: str, kwargs: dict, argv: list[str]) -> None:
    assert fedsim.plan(mechanism, **kwargs) == _cli_json(mechanism, *argv)


def test_plan_bad_input_is_a_value_error_with_the_commands_message() -> None:
    with pytest.raises(ValueError, match=r"--delta must be in the open interval \(0, 1\)"):
        fedsim.plan("dp-fedavg", noise_multiplier=1.0, rounds=10, delta=2.0)
    with pytest.raises(ValueError, match="invalid choice: 'dp-sgd'"):
        fedsim.plan("dp-sgd", noise_multiplier=1.0, rounds=10, delta=1e-6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fedsim.plan("dp-fedavg", noise_multiplier=1.0, rounds=10, max_participations=8, min_separation=3, delta=1e-6)
    assert any("effective max participations 3" in str(w.message) for w in caught)


def test_import_fedsim_stays_light() -> None:
    probe = (
        "import sys, fedsim\n"
        "assert callable(fedsim.run) and callable(fedsim.plan)\n"
        "print(sorted(m for m in ('torch', 'flwr', 'ray', 'matplotlib', 'numpy', 'scipy', 'pandas') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
