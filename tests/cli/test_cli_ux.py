"""What a new user meets first: run directories are never lost, errors name the flag and suggest
the key, the output says what its numbers mean, and the command line starts without heavy imports.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedsim.cli import _summary_text, main
from fedsim.errors import ScenarioError, closest_match, unknown_key_message
from fedsim.scenario import load_scenario, scenario_from_dict

from ..conftest import ROOT, SCENARIOS, run_cli

QUICK = str(SCENARIOS / "quickstart.toml")


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _snapshot(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


# ------------------------------------------------------------------------------------------------
# run-directory protection


def test_an_earlier_run_is_refused_kept_intact_and_replaced_only_with_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    code, _, _ = _cli(capsys, "run", QUICK, "--rounds", "2", "--out", str(run), "--quiet")
    assert code == 0 and (run / "summary.json").is_file()
    before = _snapshot(run)

    # the case: the same scenario with another learning rate, same directory
    code, out, err = _cli(capsys, "run", QUICK, "--rounds", "2", "--out", str(run), "--set", "client.lr=0.05")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: {run} already holds a finished run")
    for choice in ("--out", "--overwrite"):
        assert choice in err
    assert "--resume" not in err  # a finished run has nothing to resume
    assert _snapshot(run) == before  # nothing touched

    code, _, err = _cli(capsys, "run", QUICK, "--rounds", "3", "--out", str(run), "--quiet", "--overwrite")
    assert code == 0 and f"removed the earlier run in {run}" in err
    assert json.loads((run / "summary.json").read_text())["rounds"] == 3
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


def test_an_unfinished_run_is_refused_too_and_resume_cannot_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text('name = "x"\n')  # a run that crashed before its summary
    code, _, err = _cli(capsys, "run", QUICK, "--out", str(run))
    assert code == 2 and "already holds an unfinished run" in err and "no checkpoint to resume from" in err
    assert "--resume" not in err  # nothing to resume from
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "ckpt-00000002.pt").write_bytes(b"")  # an unfinished run with a checkpoint
    code, _, err = _cli(capsys, "run", QUICK, "--out", str(run))
    assert code == 2 and f"--resume {run} to continue it from its checkpoints" in err
    code, _, err = _cli(capsys, "run", "--resume", str(run), "--overwrite")
    assert code == 2 and "--overwrite cannot be combined with --resume" in err


def test_a_directory_that_is_not_a_run_is_never_removed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, _, err = _cli(capsys, "run", QUICK, "--out", str(mine), "--overwrite")
    assert code == 2 and err.count("\n") == 1 and "holds no fedsim run" in err
    assert (mine / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, _ = _cli(capsys, "run", QUICK, "--rounds", "1", "--out", str(empty), "--quiet")
    assert code == 0 and (empty / "summary.json").is_file()


def test_make_demo_runs_twice() -> None:
    makefile = (ROOT / "Makefile").read_text()
    demo = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "--overwrite" in demo and "--out runs/demo" in demo


# ------------------------------------------------------------------------------------------------
# the resolved config.toml


def test_config_of_a_digits_run_has_no_synthetic_only_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert _cli(capsys, "run", QUICK, "--rounds", "1", "--out", str(run), "--quiet")[0] == 0
    config = tomllib.loads((run / "config.toml").read_text())
    for key in ("num-features", "num-classes", "examples-per-device"):
        assert key not in config["data"], key
    assert config["data"]["dataset"] == "digits" and config["data"]["alpha"] == 1.0
    assert "ray-address" not in config["engine"] and "period" not in config["population"]
    # still a complete scenario: it loads back to the same one
    assert load_scenario(run / "config.toml") == load_scenario(QUICK, [(["output-dir"], str(run)), (["rounds"], 1)])


def test_config_of_a_synthetic_run_keeps_its_keys() -> None:
    sc = scenario_from_dict({"name": "s", "data": {"dataset": "synthetic", "num-features": 20, "num-devices": 30}})
    data = sc.to_dict()["data"]
    assert data["num-features"] == 20 and data["num-classes"] == 10 and data["examples-per-device"] == 64
    assert "partitioner" not in data and "alpha" not in data and "test-fraction" not in data


# ------------------------------------------------------------------------------------------------
# errors that help


def test_closest_match_and_message() -> None:
    assert closest_match("lrr", ["lr", "batch-size", "local-epochs"]) == "lr"
    assert closest_match("local_epochs", ["lr", "local-epochs"]) == "local-epochs"
    assert closest_match("colour", ["lr", "trainer"]) is None
    assert closest_match("noise", ["noise-multiplier", "max-grad-norm"]) == "noise-multiplier"
    assert closest_match("max", ["max-grad-norm", "max-participations"]) is None  # two candidates
    msg = unknown_key_message("lrr", ["trainer", "lr"], extra={"parameters of trainer 'sgd'": ["workers", "batched"]})
    assert msg == "unknown key 'lrr' (did you mean 'lr'?); allowed: lr, trainer; parameters of trainer 'sgd': batched, workers"


@pytest.mark.parametrize(
    ("override", "key", "guess", "listed"),
    [
        # the case: the section's own keys and the trainer's parameters, all listed
        ("client.lrr=0.1", "client.lrr", "lr", ["batch-size", "local-epochs", "lr", "trainer", "batched", "workers"]),
        ("client.batchsize=4", "client.batchsize", "batch-size", ["batch-size"]),
        ("client.worker=2", "client.worker", "workers", ["workers"]),
        ("data.alphaa=1", "data.alphaa", "alpha", ["alpha", "dataset", "num-devices", "partitioner", "test-fraction"]),
        ("strategy.server-lrr=1", "strategy.server-lrr", "server-lr", ["name", "server-lr"]),
        ("round=3", "round", "rounds", ["clients-per-round", "rounds", "seed"]),
        ("engine.thread=2", "engine.thread", "threads", ["backend", "chunk-size", "threads"]),
    ],
)
def test_unknown_keys_list_every_allowed_key_and_suggest_one(
    capsys: pytest.CaptureFixture[str], override: str, key: str, guess: str, listed: list[str]
) -> None:
    code, _, err = _cli(capsys, "run", QUICK, "--set", override)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --set: {key}: unknown key ")
    assert f"(did you mean '{guess}'?)" in err
    for name in listed:
        assert name in err, name


def test_unknown_strategy_name_suggests_the_registered_one(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"strategy\.name: unknown strategy 'dp-ftlr' \(did you mean 'dp-ftrl'\?\); known: "):
        scenario_from_dict({"name": "x", "strategy": {"name": "dp-ftlr"}}, source="s.toml")


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--rounds", "-5"], "error: --rounds: must be >= 1, got -5"),
        (["--rounds", "0"], "error: --rounds: must be >= 1, got 0"),
        (["--seed", "-1"], "error: --seed: must be >= 0, got -1"),
        (["--out", ""], "error: --out: must be a directory path, got ''"),
        (["--set", "rounds=-5"], "error: --set: rounds: must be >= 1, got -5"),
    ],
)
def test_errors_name_the_flag_the_user_typed(capsys: pytest.CaptureFixture[str], args: list[str], line: str) -> None:
    code, _, err = _cli(capsys, "run", QUICK, *args)
    assert code == 2 and err == line + "\n"


def test_noise_multiplier_help_and_error_say_the_same(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["privacy", "dp-ftrl", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(a finite number >= 1e-06)" in help_text
    code, _, err = _cli(capsys, "privacy", "dp-ftrl", "--noise-multiplier", "0", "--rounds", "10", "--delta", "1e-6",
                        "--max-participations", "1", "--min-separation", "0")
    assert code == 2 and "--noise-multiplier must be a finite number >= 1e-06" in err


# ------------------------------------------------------------------------------------------------
# output that explains itself


def test_sampled_dp_fedavg_says_rho_ignores_amplification(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, "run", str(SCENARIOS / "dp_fedavg.toml"), "--rounds", "3", "--out", str(tmp_path / "r"), "--quiet")
    assert code == 0 and "rho ignores the amplification by sampling; epsilon includes it" in out
    code, out, _ = _cli(capsys, "run", str(SCENARIOS / "dp_ftrl.toml"), "--rounds", "3", "--out", str(tmp_path / "t"), "--quiet")
    assert code == 0 and "rho (zCDP)" in out and "amplification" not in out


def test_example_level_privacy_is_shown() -> None:
    summary = {
        "name": "o", "strategy": "fedavg", "rounds": 1, "rounds_planned": 1, "stopped_reason": "completed",
        "accuracy": 0.5, "loss": 1.0, "rho": None, "wall_time_s": 1.0,
        "example_level": {"epsilon": 14.95, "delta": 1e-6},
    }
    text = _summary_text(summary, "runs/o")
    assert "user-level   none (no DP strategy)" in text
    assert "example-level epsilon 14.950 at delta=1e-06" in text


# ------------------------------------------------------------------------------------------------
# start-up cost: heavy packages are imported only by the commands that need them

HEAVY = ("torch", "flwr", "ray", "matplotlib", "opacus", "scipy", "sklearn")


def _imported_after(code: str) -> list[str]:
    probe = code + f"\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_command_line_imports_no_heavy_package() -> None:
    assert _imported_after("import fedsim.cli\nfedsim.cli.build_parser()") == []


@pytest.mark.parametrize(
    "argv",
    [
        ["dp-ftrl", "--noise-multiplier", "7", "--rounds", "200", "--max-participations", "2", "--min-separation", "50"],
        ["dp-ftrl", "--target-rho", "0.5", "--rounds", "100", "--max-participations", "2", "--min-separation", "10"],
        ["dp-fedavg", "--noise-multiplier", "1", "--rounds", "100", "--sampling-rate", "0.01"],
    ],
)
def test_fedsim_privacy_imports_no_torch_flower_ray_or_plotting(argv: list[str]) -> None:
    code = f"from fedsim.cli import main\nassert main(['privacy', *{argv!r}, '--delta', '1e-6', '--json']) == 0"
    assert _imported_after(code) == ["scipy"]  # the (epsilon, delta) conversions need scipy, nothing else


def test_help_is_one_real_process_without_errors() -> None:
    proc = run_cli("run", "--help", timeout=120)
    assert proc.returncode == 0 and "--overwrite" in proc.stdout


# ------------------------------------------------------------------------------------------------
# fedsim check-strategy: the contract suite on a user's own strategy

BROKEN = '''
import torch
from fedsim.strategy import Strategy


class Frozen(Strategy):
    """Breaks the contract: aggregate ignores every update."""

    def aggregate(self, *, round, params, batch):
        return params.clone()
'''


def test_check_strategy_runs_the_contract_suite_on_a_file(tmp_path: Path) -> None:
    (tmp_path / "frozen.py").write_text(BROKEN)
    proc = run_cli("check-strategy", "frozen.py:Frozen", "-x", cwd=tmp_path, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "test_aggregate_shape_finite_and_empty_round" in proc.stdout and "frozen.py:Frozen" in proc.stdout


def test_check_strategy_bad_spec_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(capsys, "check-strategy", str(tmp_path / "missing.py") + ":X")
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err
    code, _, err = _cli(capsys, "check-strategy", "fedsim.types:TrainConfig")
    assert code == 2 and "is not a fedsim.strategy.Strategy subclass" in err


def test_accountant_shows_no_opacus_order_warning() -> None:
    import warnings

    from fedsim.privacy.accountant import sampled_gaussian_epsilon

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Opacus warns here: the best order is the grid's smallest
        eps = sampled_gaussian_epsilon(0.5, 0.5, 1000, 1e-6)
    assert eps > 100


def test_progress_bar_shows_each_rounds_own_accuracy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import functools
    import re

    import tqdm.auto

    # tqdm redraws at most every 0.1 s by default: a fast machine runs all 30 rounds within one
    # interval and draws no intermediate frame; the engine's bar (tqdm.auto.tqdm, looked up when
    # the run starts) is made to draw every update
    monkeypatch.setattr(tqdm.auto, "tqdm", functools.partial(tqdm.auto.tqdm, mininterval=0, miniters=1))
    run = tmp_path / "run"
    code, _, err = _cli(capsys, "run", QUICK, "--out", str(run))
    assert code == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    frames = re.findall(r"\| (\d+)/30 \[[^\]]*acc=([0-9.]+)", err)
    assert any(int(k) < 30 for k, _ in frames), err  # intermediate frames were drawn
    for k, acc in frames:
        assert acc == f"{rows[int(k) - 1]['accuracy']:.4g}", (k, acc)
