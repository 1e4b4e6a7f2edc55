"""``fedsim privacy`` planning CLI: exact commands, JSON keys, errors, warnings."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedsim import privacy_cli

ROOT = Path(__file__).resolve().parents[2]

GBOARD = ["dp-ftrl", "--noise-multiplier", "7", "--rounds", "2000", "--max-participations", "6",
          "--min-separation", "313", "--delta", "1e-10"]
FEDAVG_SAMPLED = ["dp-fedavg", "--noise-multiplier", "1", "--rounds", "1000", "--sampling-rate",
                  "0.01", "--delta", "1e-6"]
FEDAVG_CAPPED = ["dp-fedavg", "--noise-multiplier", "1", "--rounds", "1000",
                 "--max-participations", "5", "--delta", "1e-6"]
REQUIRED_KEYS = {"rho", "epsilon", "epsilon_rdp", "delta", "noise_multiplier"}


def _parser():
    """A stand-in for the main CLI: plain argparse + add_parser."""
    parser = argparse.ArgumentParser(prog="fedsim")
    sub = parser.add_subparsers(dest="command", required=True)
    privacy_cli.add_parser(sub)
    return parser


def _run(argv, capsys):
    try:
        args = _parser().parse_args(["privacy", *argv])
        code = args.func(args)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_gboard_json(capsys):
    code, out, err = _run([*GBOARD, "--json"], capsys)
    assert code == 0 and err == ""
    data = json.loads(out)
    assert set(data) >= REQUIRED_KEYS
    assert round(data["rho"], 3) == 0.806
    assert round(data["epsilon_rdp"], 2) == 8.90
    assert round(data["epsilon"], 2) == 8.53
    assert data["delta"] == 1e-10
    assert data["noise_multiplier"] == 7.0
    assert data["sensitivity_sq"] == 79
    assert data["effective_max_participations"] == 6


def test_gboard_table(capsys):
    code, out, err = _run(GBOARD, capsys)
    assert code == 0 and err == ""
    lines = out.strip().splitlines()
    values = {line[:20].strip(): line[20:].strip() for line in lines}
    assert values["rho (zCDP)"] == "0.806122"
    assert values["epsilon_rdp"].startswith("8.8985")
    assert values["epsilon"].startswith("8.5261")
    # aligned: every value starts in the same column
    starts = {len(line) - len(line[20:].lstrip()) for line in lines}
    assert len(starts) == 1


def test_restart_every(capsys):
    code, out, _ = _run([*GBOARD, "--restart-every", "500", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["restart_every"] == 500
    assert data["sensitivity_sq"] == 52
    assert data["rho"] == 52 / 98


def test_fedavg_sampled(capsys):
    code, out, err = _run([*FEDAVG_SAMPLED, "--json"], capsys)
    assert code == 0 and err == ""
    data = json.loads(out)
    assert set(data) >= REQUIRED_KEYS
    assert data["rho"] == 500.0  # unamplified bound
    assert data["epsilon"] == pytest.approx(2.4367, abs=1e-4)  # amplified (Opacus RDP)
    assert data["sampling_rate"] == 0.01


def test_fedavg_capped(capsys):
    code, out, _ = _run([*FEDAVG_CAPPED, "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["rho"] == 2.5
    assert data["sensitivity_sq"] == 5
    # without --max-participations and without sampling, every round counts
    code, out, _ = _run(["dp-fedavg", "--noise-multiplier", "10", "--rounds", "50", "--delta",
                         "1e-6", "--json"], capsys)
    assert json.loads(out)["rho"] == 50 / 200


def test_target_rho(capsys):
    argv = [a for a in GBOARD if a not in ("--noise-multiplier", "7")]
    code, out, _ = _run([*argv, "--target-rho", "0.81", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["rho"] <= 0.81
    assert data["noise_multiplier"] == pytest.approx((79 / (2 * 0.81)) ** 0.5, rel=2e-6)
    assert data["target_rho"] == 0.81
    code, out, _ = _run(["dp-fedavg", "--target-rho", "0.5", "--rounds", "100",
                         "--max-participations", "4", "--delta", "1e-6", "--json"], capsys)
    assert code == 0
    assert json.loads(out)["noise_multiplier"] == pytest.approx(2.0, rel=2e-6)


def test_infeasible_k_warns(capsys):
    argv = [*GBOARD, "--json"]
    argv[argv.index("6")] = "10"
    code, out, err = _run(argv, capsys)
    assert code == 0
    assert err.startswith("warning:") and "effective max participations 7" in err
    assert len(err.strip().splitlines()) == 1
    assert json.loads(out)["effective_max_participations"] == 7


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["dp-ftrl", "--noise-multiplier", "0", "--rounds", "10", "--max-participations", "1",
          "--min-separation", "0", "--delta", "1e-6"], "--noise-multiplier"),
        (["dp-ftrl", "--noise-multiplier", "-2", "--rounds", "10", "--max-participations", "1",
          "--min-separation", "0", "--delta", "1e-6"], "--noise-multiplier"),
        (["dp-ftrl", "--noise-multiplier", "nan", "--rounds", "10", "--max-participations", "1",
          "--min-separation", "0", "--delta", "1e-6"], "--noise-multiplier"),
        (["dp-ftrl", "--noise-multiplier", "1", "--rounds", "0", "--max-participations", "1",
          "--min-separation", "0", "--delta", "1e-6"], "--rounds"),
        (["dp-ftrl", "--noise-multiplier", "1", "--rounds", "10", "--max-participations", "0",
          "--min-separation", "0", "--delta", "1e-6"], "--max-participations"),
        (["dp-ftrl", "--noise-multiplier", "1", "--rounds", "10", "--max-participations", "1",
          "--min-separation", "-1", "--delta", "1e-6"], "--min-separation"),
        (["dp-ftrl", "--noise-multiplier", "1", "--rounds", "10", "--max-participations", "1",
          "--min-separation", "0", "--delta", "1"], "--delta"),
        (["dp-ftrl", "--noise-multiplier", "1", "--rounds", "10", "--max-participations", "1",
          "--min-separation", "0", "--delta", "0"], "--delta"),
        (["dp-ftrl", "--noise-multiplier", "1", "--rounds", "10", "--max-participations", "1",
          "--min-separation", "0", "--delta", "1e-6", "--restart-every", "0"], "--restart-every"),
        (["dp-ftrl", "--target-rho", "0", "--rounds", "10", "--max-participations", "1",
          "--min-separation", "0", "--delta", "1e-6"], "--target-rho"),
        (["dp-fedavg", "--noise-multiplier", "1", "--rounds", "10", "--sampling-rate", "0",
          "--delta", "1e-6"], "--sampling-rate"),
        (["dp-fedavg", "--noise-multiplier", "1", "--rounds", "10", "--sampling-rate", "1.5",
          "--delta", "1e-6"], "--sampling-rate"),
        (["dp-fedavg", "--noise-multiplier", "1", "--rounds", "ten", "--delta", "1e-6"], "--rounds"),
        (["dp-fedavg", "--noise-multiplier", "1", "--rounds", "10"], "--delta"),
        (["dp-fedavg", "--rounds", "10", "--delta", "1e-6"], "--noise-multiplier"),
        (["dp-fedavg", "--noise-multiplier", "1", "--rounds", "100000000000000000000000", "--delta", "1e-6"],
         "--rounds must be an integer in 1..10000000"),
        (["dp-ftrl", "--noise-multiplier", "1", "--target-rho", "1", "--rounds", "10",
          "--max-participations", "1", "--min-separation", "0", "--delta", "1e-6"], "--target-rho"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, flag, capsys):
    code, out, err = _run(argv, capsys)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert flag in lines[0]
    assert "Traceback" not in err


def test_missing_mechanism(capsys):
    code, _, err = _run([], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _main_cli_wires_privacy() -> bool:
    try:
        from fedsim.cli import build_parser
    except Exception:
        return False
    try:
        parser = build_parser()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) and "privacy" in action.choices:
                return True
    except Exception:
        return False
    return False


@pytest.mark.parametrize("module", ["fedsim.privacy_cli", "fedsim"])
def test_subprocess_exact_commands(module):
    if module == "fedsim" and not _main_cli_wires_privacy():
        pytest.skip("fedsim/cli.py does not register the privacy subcommand yet")
    base = [sys.executable, "-m", module, "privacy"]
    res = subprocess.run([*base, *GBOARD, "--json"], capture_output=True, text=True, env=_env(),
                         cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert round(data["rho"], 3) == 0.806 and round(data["epsilon_rdp"], 2) == 8.90
    for argv in (FEDAVG_SAMPLED, FEDAVG_CAPPED):
        res = subprocess.run([*base, *argv, "--json"], capture_output=True, text=True,
                             env=_env(), cwd=ROOT, timeout=120)
        assert res.returncode == 0, res.stderr
        assert set(json.loads(res.stdout)) >= REQUIRED_KEYS
    target = [a for a in GBOARD if a not in ("--noise-multiplier", "7")]
    res = subprocess.run([*base, *target, "--target-rho", "0.81", "--json"], capture_output=True,
                         text=True, env=_env(), cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["rho"] <= 0.81
    res = subprocess.run([*base, "dp-ftrl", "--noise-multiplier", "-1", "--rounds", "10",
                          "--max-participations", "1", "--min-separation", "0", "--delta", "0.5"],
                         capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=120)
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr.strip().splitlines() == [
        "error: --noise-multiplier must be a finite number >= 1e-06 (got -1.0)"
    ]


# ----------------------------------------------------------------------------------------------
# fedsim privacy keygen PATH [--force]


def test_keygen_writes_a_fresh_owner_only_key_and_never_replaces_one(tmp_path, capsys):
    import stat

    from fedsim.privacy.noise import NoiseKey

    path = tmp_path / "keys" / "research.key"
    code, out, err = _run(["keygen", str(path)], capsys)
    assert code == 0 and err == ""
    assert str(path.resolve()) in out and "noise-key-file" in out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    key = NoiseKey.load(path)
    assert key.bits == 256 and path.read_text().split(":")[1].strip() not in out  # never printed
    before = path.read_bytes()
    code, out, err = _run(["keygen", str(path)], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and "exists" in err and "--force" in err
    assert path.read_bytes() == before
    code, _, err = _run(["keygen", str(path), "--force"], capsys)
    assert code == 0 and err == ""
    assert NoiseKey.load(path) != key and stat.S_IMODE(path.stat().st_mode) == 0o600
    # two fresh keys differ (256 bits from secrets each)
    other = tmp_path / "other.key"
    assert _run(["keygen", str(other)], capsys)[0] == 0 and NoiseKey.load(other) != NoiseKey.load(path)
    # bad paths: one line, exit 2
    for bad, needle in ((tmp_path, "is a directory"), (Path("/proc/no-such-dir/k.key"), "cannot write")):
        code, out, err = _run(["keygen", str(bad)], capsys)
        assert code == 2 and err.count("\n") == 1 and needle in err, err


def test_keygen_is_documented_in_help_and_readme():
    help_text = subprocess.run([sys.executable, "-m", "fedsim", "privacy", "--help"], capture_output=True,
                               text=True, cwd=ROOT, env=_env(), check=True).stdout
    assert "keygen" in help_text
    keygen_help = subprocess.run([sys.executable, "-m", "fedsim", "privacy", "keygen", "--help"], capture_output=True,
                                 text=True, cwd=ROOT, env=_env(), check=True).stdout
    assert "--force" in keygen_help and "0600" in keygen_help
    assert "fedsim privacy keygen" in (ROOT / "README.md").read_text()
