"""Bad scenario input: one-line error naming file, key and what is allowed; exit 2; nothing run."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsim.errors import ScenarioError
from fedsim.scenario import load_scenario, parse_override, scenario_from_dict

from ..conftest import SCENARIOS, run_cli

GOOD = """
name = "t"
rounds = 2
clients-per-round = 5
[data]
num-devices = 10
[client]
lr = 0.1
[strategy]
name = "fedavg"
"""


DP = GOOD.replace('name = "fedavg"', 'name = "dp-fedavg"\nnoise-multiplier = 1.0\nclip-norm = 0.5')


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "key", "needle"),
    [
        (GOOD.replace("rounds = 2", "rounds = 2\ncolour = 1"), "colour", "unknown key 'colour'; allowed: "),
        (GOOD.replace("[data]", "[data]\nshards = 3"), "data.shards", "allowed: alpha, dataset"),
        (GOOD.replace("rounds = 2", 'rounds = "two"'), "rounds", "must be an integer"),
        (GOOD.replace("lr = 0.1", 'lr = "fast"'), "client.lr", "must be a number"),
        (GOOD.replace("lr = 0.1", "lr = -0.1"), "client.lr", "must be > 0"),
        (GOOD.replace("clients-per-round = 5", "clients-per-round = 11"), "clients-per-round", "<= data.num-devices"),
        (GOOD.replace("[data]", "[data]\npartitioner = \"dirichlet\"\nalpha = 0"), "data.alpha", "must be > 0"),
        (GOOD.replace("[data]", "[data]\npartitioner = \"shards\""), "data.partitioner", "one of 'iid', 'dirichlet'"),
        (GOOD.replace('name = "fedavg"', 'name = "fedprox"'), "strategy.name", "known: "),
        (GOOD + "server-lr = -1\n", "strategy", "server-lr must be > 0"),
        (GOOD.replace("rounds = 2", "rounds = 0"), "rounds", "must be >= 1"),
        (GOOD + '[privacy]\nrun-id = "abc"\n', "privacy.run-id", "must be 32 hex digits"),
        (GOOD + '[privacy]\nrun-id = "' + "g" * 32 + '"\n', "privacy.run-id", "must be 32 hex digits"),
        # fuzzing: values that used to run forever, overflow or end in a traceback
        (GOOD.replace("rounds = 2", "rounds = 100000000000000000000000"), "rounds", "must be <= 10000000"),
        (DP.replace("clip-norm = 0.5", "clip-norm = 1e308"), "strategy", "clip-norm must be a number in (0, 1e+06], got 1e+308"),
        (DP.replace("clip-norm = 0.5", "clip-norm = 1e308").replace("noise-multiplier = 1.0", "noise-multiplier = 10.0"),
         "strategy", "clip-norm must be a number in (0, 1e+06]"),
        (DP.replace("clip-norm = 0.5", "clip-norm = 1e5").replace("noise-multiplier = 1.0", "noise-multiplier = 1e5"),
         "strategy", "noise-multiplier x clip-norm (the noise standard deviation) must be <= 1e+09, got 100000 x 100000"),
        (DP.replace("noise-multiplier = 1.0", "target-rho = 1e-20"), "strategy", "the solved noise-multiplier x clip-norm"),
        (GOOD.replace("lr = 0.1", 'lr = 0.1\ntrainer = "opacus"\nmax-grad-norm = 1e308'), "client",
         "max-grad-norm must be a number in (0, 1e+06]"),
        (GOOD.replace("lr = 0.1", 'lr = 0.1\ntrainer = "opacus"\nnoise-multiplier = 1e300'), "client",
         "noise-multiplier x max-grad-norm (the noise standard deviation) must be <= 1e+09"),
        (GOOD.replace("[data]", "[engine]\nmax-weight-share = 0\n[data]"), "engine.max-weight-share", "must be a number in (0, 1]"),
    ],
)
def test_invalid_values_name_file_key_and_allowed(tmp_path: Path, text: str, key: str, needle: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    msg = str(info.value)
    assert str(path) in msg
    assert needle in msg
    assert f": {key}:" in msg


def test_unknown_strategy_parameter_lists_allowed(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"strategy\.bogus: unknown key 'bogus'; allowed: name; parameters of strategy 'fedavg': beta1, beta2, momentum, server-lr, server-optimizer, tau$"):
        load_scenario(_write(tmp_path, GOOD + "bogus = 1\n"))


def test_malformed_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="invalid TOML"):
        load_scenario(_write(tmp_path, "name = [unclosed"))
    with pytest.raises(ScenarioError, match="scenario file not found"):
        load_scenario(tmp_path / "missing.toml")


def test_override_parsing_and_attribution() -> None:
    assert parse_override("client.lr=0.05") == (["client", "lr"], 0.05)
    assert parse_override("strategy.name=dp-ftrl") == (["strategy", "name"], "dp-ftrl")
    with pytest.raises(ScenarioError, match="key=value"):
        parse_override("client.lr")
    raw = {"name": "x", "data": {"num-devices": 10}, "clients-per-round": 2}
    with pytest.raises(ScenarioError, match=r"^--set: client\.lr: must be > 0"):
        scenario_from_dict(raw, source="f.toml", overrides=[parse_override("client.lr=-1")])


@pytest.mark.parametrize(
    "args",
    [
        ["--set", "client.lr=-1"],
        ["--set", "client.colour=red"],
        ["--set", "clients-per-round=1000"],
        ["--set", "data.alpha=0", "--set", "data.partitioner=dirichlet"],
        ["--rounds", "0"],
        ["--rounds", "100000000000000000000000"],
        ["--set", "strategy.name=dp-fedavg", "--set", "strategy.clip-norm=1e308", "--set", "strategy.noise-multiplier=10"],
    ],
)
def test_cli_exit_2_one_line_no_traceback_nothing_run(tmp_path: Path, args: list[str]) -> None:
    out = tmp_path / "run"
    proc = run_cli("run", str(SCENARIOS / "quickstart.toml"), "--out", str(out), "--quiet", *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_cli_missing_file_exit_2(tmp_path: Path) -> None:
    proc = run_cli("run", str(tmp_path / "nope.toml"))
    assert proc.returncode == 2
    assert "nope.toml: scenario file not found" in proc.stderr


def test_cli_bad_flag_type_exit_2() -> None:
    proc = run_cli("run", str(SCENARIOS / "quickstart.toml"), "--rounds", "many")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_every_shipped_scenario_validates() -> None:
    files = sorted(SCENARIOS.glob("*.toml"))
    assert files
    for path in files:
        load_scenario(path)


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "directory", "huge"])
def test_noise_key_file_must_be_a_small_regular_file(tmp_path: Path, kind: str) -> None:
    """``noise-key-file = "/dev/zero"`` used to read until memory ran out, and a FIFO blocks a
    plain read forever: only a regular file of at most a few KB is read (one line, exit 2)."""
    import os

    if kind == "dev-zero":
        key = Path("/dev/zero")
    elif kind == "fifo":
        key = tmp_path / "key.fifo"
        os.mkfifo(key)
    elif kind == "directory":
        key = tmp_path / "keys"
        key.mkdir()
    else:
        key = tmp_path / "huge.key"
        key.write_text("fedsim-noise-key-v1:" + "ab" * 5_000_000)
    out = tmp_path / "run"
    proc = run_cli("run", str(SCENARIOS / "dp_fedavg.toml"), "--out", str(out), "--quiet", "--rounds", "2",
                   "--set", f"privacy.noise-key-file={key}", timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: [privacy] noise-key-file: {key}: "), proc.stderr
    assert ("too large" if kind == "huge" else "not a regular file") in lines[0]
    assert not (out / "metrics.jsonl").exists()


def test_a_run_whose_model_becomes_non_finite_says_so(tmp_path: Path) -> None:
    """A run whose global model overflows (here a server step of 1e38) used to finish every
    round and report ``loss: null`` beside its privacy figures. It stops after the round that
    broke it: summary.json says why, the command prints one error line and exits 1."""
    import json

    for name, scenario, extra in (
        ("fedavg", "quickstart.toml", ["--set", "strategy.server-lr=1e38"]),
        ("dp", "dp_ftrl.toml", ["--set", "strategy.server-lr=1e38", "--rounds", "4"]),
    ):
        out = tmp_path / name
        proc = run_cli("run", str(SCENARIOS / scenario), "--out", str(out), "--quiet", *extra)
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()  # start notes (a DP run's noise multiplier), then the error
        errors = [line for line in lines if line.startswith("error: ")]
        assert errors == lines[-1:] and errors[0].startswith("error: non-finite model: after round 1 "), proc.stderr
        summary = json.loads((out / "summary.json").read_text())
        assert summary["rounds"] == 1 and summary["stopped_reason"].startswith("non-finite model: after round 1 ")
        assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
