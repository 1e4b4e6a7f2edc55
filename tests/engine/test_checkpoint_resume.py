"""Checkpoints and resume: a run killed at an arbitrary point and resumed ends bit-identical to the
same run uninterrupted (parameters, run log, privacy ledger); corrupted checkpoints fall back to
the previous good one; a changed scenario is refused."""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.cli import main
from fedsim.engine import Simulation
from fedsim.engine.checkpoint import (
    CHECKPOINT_DIR,
    CheckpointError,
    CheckpointWarning,
    CorruptCheckpoint,
    decode,
    encode,
    list_checkpoints,
)
from fedsim.privacy.noise import KEY_FILE, NoiseKey
from fedsim.scenario import load_scenario

from ..conftest import ROOT, run_cli

FEDAVGM = f"""
name = "resume-fedavgm"
seed = 7
rounds = {{rounds}}
clients-per-round = 20
[data]
dataset = "digits"
num-devices = 100
partitioner = "dirichlet"
alpha = 1.0
[model]
name = "mlp"
hidden = 32
[client]
local-epochs = {{epochs}}
batch-size = 2
lr = 0.05
[strategy]
name = "{ROOT / 'scripts' / 'fedavgm.py'}:FedAvgM"
momentum = 0.5
[checkpoint]
every = {{every}}
keep = 2
"""

# DP-FTRL: tree-aggregation state, server momentum, (k, b) participation ledgers, privacy ledger
DP_FTRL = """
name = "resume-dp-ftrl"
seed = 11
rounds = {rounds}
clients-per-round = 20
[data]
dataset = "digits"
num-devices = 100
partitioner = "iid"
[model]
name = "mlp"
hidden = 32
[client]
local-epochs = {epochs}
batch-size = 2
lr = 0.05
[strategy]
name = "dp-ftrl"
noise-multiplier = 1.0
clip-norm = 0.5
momentum = 0.9
max-participations = 8
min-separation = 3
[privacy]
delta = 1e-6
{budget}
[checkpoint]
every = {every}
keep = 2
"""

# DP-FedAvg with Poisson sampling: per-round noise and sampled-Gaussian ledger events
DP_FEDAVG = """
name = "resume-dp-fedavg"
seed = 5
rounds = {rounds}
clients-per-round = 20
[data]
dataset = "digits"
num-devices = 100
[model]
name = "logreg"
[client]
local-epochs = {epochs}
batch-size = 4
[strategy]
name = "dp-fedavg"
noise-multiplier = 1.1
clip-norm = 0.5
momentum = 0.5
sampling = "poisson"
[checkpoint]
every = {every}
"""

# the adaptive server optimizers' moments (m, v) in the strategy state: FedAvg + Adagrad,
# DP-FedAvg + Adam, DP-FTRL + Yogi
FEDAVG_ADAGRAD = FEDAVGM.replace(
    'name = "' + str(ROOT / "scripts" / "fedavgm.py") + ':FedAvgM"\nmomentum = 0.5',
    'name = "fedavg"\nserver-optimizer = "adagrad"\nserver-lr = 0.05',
)
DP_FEDAVG_ADAM = DP_FEDAVG.replace("momentum = 0.5", 'server-optimizer = "adam"\nserver-lr = 0.02\nbeta1 = 0.8')
DP_FTRL_YOGI = DP_FTRL.replace("momentum = 0.9", 'server-optimizer = "yogi"\nserver-lr = 0.02\ntau = 0.01')
assert "adagrad" in FEDAVG_ADAGRAD and "adam" in DP_FEDAVG_ADAM and "yogi" in DP_FTRL_YOGI
# adaptive clipping: the clip norm (moved by the noisy counts) in the strategy state
ADAPTIVE = "\ntarget-quantile = 0.5\nclip-lr = 0.3\ncount-noise-multiplier = 2.0"
DP_FTRL_ADAPTIVE = DP_FTRL.replace("min-separation = 3", "min-separation = 3" + ADAPTIVE)
DP_FEDAVG_ADAPTIVE = DP_FEDAVG.replace('sampling = "poisson"', 'sampling = "poisson"' + ADAPTIVE)
assert ADAPTIVE in DP_FTRL_ADAPTIVE and ADAPTIVE in DP_FEDAVG_ADAPTIVE
# deployment-equivalent noise ([privacy] equivalent-cohort): the run's noise scaled by n / N and the
# deployment's ledger, with and without adaptive clipping (its count's noise scaled too)
EQUIVALENT = "delta = 1e-6\nequivalent-cohort = 2000"
DP_FTRL_EQUIVALENT = DP_FTRL.replace("delta = 1e-6", EQUIVALENT)
DP_FTRL_ADAPTIVE_EQUIVALENT = DP_FTRL_ADAPTIVE.replace("delta = 1e-6", EQUIVALENT)
assert EQUIVALENT in DP_FTRL_EQUIVALENT and EQUIVALENT in DP_FTRL_ADAPTIVE_EQUIVALENT


def _write(tmp_path: Path, template: str, *, rounds: int = 12, epochs: int = 1, every: int = 2, budget: str = "") -> Path:
    path = tmp_path / "scenario.toml"
    path.write_text(template.format(rounds=rounds, epochs=epochs, every=every, budget=budget))
    return path


def _dp_ftrl_budget(rounds: int, stop_after: int) -> tuple[str, float]:
    """A ``max-rho`` line that admits exactly ``stop_after`` DP-FTRL rounds of :data:`DP_FTRL`."""
    from fedsim.privacy.sensitivity import tree_sensitivity_sq_prefixes

    rhos = [sq / 2.0 for sq in tree_sensitivity_sq_prefixes(rounds, 8, 3)]  # z = 1
    assert rhos[stop_after] > rhos[stop_after - 1]
    budget = (rhos[stop_after - 1] + rhos[stop_after]) / 2
    return f"max-rho = {budget!r}", rhos[stop_after - 1]


def _assert_same_run(a: Path, b: Path) -> None:
    """Final parameters, run log and privacy ledger byte for byte; summary up to timings."""
    flat_a = torch.load(a / "model.pt")["flat"]
    flat_b = torch.load(b / "model.pt")["flat"]
    assert torch.equal(flat_a, flat_b), "final parameters differ"
    assert (a / "metrics.jsonl").read_bytes() == (b / "metrics.jsonl").read_bytes(), "metrics.jsonl differs"
    assert (a / "ledger.json").exists() == (b / "ledger.json").exists()
    if (a / "ledger.json").exists():
        assert (a / "ledger.json").read_bytes() == (b / "ledger.json").read_bytes(), "ledger.json differs"
    assert (a / "ledger_equivalent.json").exists() == (b / "ledger_equivalent.json").exists()
    if (a / "ledger_equivalent.json").exists():
        assert (a / "ledger_equivalent.json").read_bytes() == (b / "ledger_equivalent.json").read_bytes(), (
            "ledger_equivalent.json differs")
    sa = json.loads((a / "summary.json").read_text())
    sb = json.loads((b / "summary.json").read_text())
    for s in (sa, sb):
        s.pop("wall_time_s")
        s.pop("strategy")  # a resumed run names the plug-in by its resolved absolute path
        s.pop("noise_key", None)  # the reference was handed the other run's key
    assert sa == sb


def _run(scenario: Path, out: Path, key_of: Path | None = None) -> None:
    """Run ``scenario`` into ``out``; with the secret noise key and run id of run ``key_of`` if it has them."""
    key_file = key_of / KEY_FILE if key_of is not None else None
    key = NoiseKey.load(key_file) if key_file is not None and key_file.exists() else None
    overrides: list = [(["output-dir"], str(out))]
    if key is not None:
        overrides.append((["privacy", "run-id"], load_scenario(key_of / "config.toml").privacy.run_id))
    Simulation(load_scenario(scenario, overrides), run_dir=out, progress=False, noise_key=key).run()


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """The real command line, in this process (exit code, stderr)."""
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


# ----------------------------------------------------------------------------------------------
# the real thing: SIGKILL a subprocess at an arbitrary point, resume through the CLI


def _kill_and_resume(tmp_path: Path, scenario: Path, rounds: int) -> str:
    ref, victim = tmp_path / "ref", tmp_path / "victim"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # both processes share one fixed noise key file, so the reference adds the same noise
    NoiseKey.generate().save(tmp_path / "fixed.key")
    # ... and one run id: the public id that, with the key, determines a run's noise
    cmd = [
        sys.executable, "-m", "fedsim", "run", str(scenario), "--quiet", "--set", f"privacy.noise-key-file={tmp_path / 'fixed.key'}",
        "--set", f"privacy.run-id={secrets.token_hex(16)}",
    ]
    reference = subprocess.Popen([*cmd, "--out", str(ref)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc = subprocess.Popen([*cmd, "--out", str(victim)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    chance = random.SystemRandom()
    target = chance.randint(3, rounds // 2)  # rows in the run log before the kill
    deadline = time.monotonic() + 120
    while _lines(victim / "metrics.jsonl") < target and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    t0 = time.monotonic()
    while _lines(victim / "metrics.jsonl") < target + 1 and time.monotonic() - t0 < 0.2:
        time.sleep(0.002)  # one round's duration ...
    round_time = time.monotonic() - t0
    time.sleep(chance.uniform(0.0, round_time))  # ... and a random point within the next
    assert proc.poll() is None, "the run finished before it could be killed: make rounds longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    where = f"killed after {_lines(victim / 'metrics.jsonl')} logged rounds (target {target})"
    assert _lines(victim / "metrics.jsonl") < rounds, where
    assert not (victim / "summary.json").exists(), where

    resumed = run_cli("run", "--resume", str(victim), "--quiet")
    assert resumed.returncode == 0, f"{where}: {resumed.stderr}"
    assert "resuming" in resumed.stderr
    assert reference.wait(timeout=120) == 0, reference.stderr.read() if reference.stderr else ""
    if reference.stderr:
        reference.stderr.close()
    _assert_same_run(ref, victim)
    return f"{where}; {resumed.stderr.strip().splitlines()[-1]}"


@pytest.mark.slow
def test_sigkill_mid_round_then_resume_is_bit_identical_fedavgm(tmp_path: Path) -> None:
    """FedAvgM: server momentum, participation ledgers and the run log survive a SIGKILL."""
    rounds = 40
    scenario = _write(tmp_path, FEDAVGM, rounds=rounds, epochs=3, every=2)
    info = _kill_and_resume(tmp_path, scenario, rounds)
    print(info)


@pytest.mark.slow
def test_sigkill_mid_round_then_resume_is_bit_identical_dp_ftrl_with_budget(tmp_path: Path) -> None:
    """DP-FTRL: tree state and privacy ledger survive a SIGKILL; replayed rounds reuse their noise
    (identical ledger and parameters), and the max-rho guard stops at the same round."""
    rounds, stop_after = 40, 29
    budget, rho = _dp_ftrl_budget(rounds, stop_after)
    scenario = _write(tmp_path, DP_FTRL, rounds=rounds, epochs=3, every=2, budget=budget)
    info = _kill_and_resume(tmp_path, scenario, stop_after)
    print(info)
    for run in ("ref", "victim"):
        summary = json.loads((tmp_path / run / "summary.json").read_text())
        assert summary["rounds"] == stop_after and summary["rho"] == rho
        assert f"round {stop_after + 1} would reach" in summary["stopped_reason"]
        assert len(json.loads((tmp_path / run / "ledger.json").read_text())) == stop_after


@pytest.mark.slow
def test_sigkill_mid_round_then_resume_is_bit_identical_dp_ftrl_blt(tmp_path: Path) -> None:
    """DP-FTRL with BLT noise: the float64 buffers survive a SIGKILL and replayed rounds reuse
    their noise (identical parameters, run log and ledger)."""
    rounds = 30
    blt = DP_FTRL.replace('name = "dp-ftrl"', 'name = "dp-ftrl"\nmechanism = "blt"')
    scenario = _write(tmp_path, blt, rounds=rounds, epochs=3, every=2, budget="")
    print(_kill_and_resume(tmp_path, scenario, rounds))
    ledger = json.loads((tmp_path / "victim" / "ledger.json").read_text())
    assert len(ledger) == rounds and ledger[0]["event"]["type"] == "matrix_factorization"


# ----------------------------------------------------------------------------------------------
# in-process: a crash inside a round (state mutated in memory, nothing persisted)


class _Crash(Exception):
    pass


def _crash_in_round(sim: Simulation, crash_round: int) -> None:
    """Let ``run_round(crash_round)`` do all its work, then die before the row is logged."""
    original = sim.run_round

    def run_round(r: int):
        row = original(r)
        if r == crash_round:
            raise _Crash(r)
        return row

    sim.run_round = run_round  # type: ignore[method-assign]


@pytest.mark.parametrize(
    ("template", "crash_round"),
    [
        (FEDAVGM, 0), (FEDAVGM, 3), (FEDAVGM, 4), (FEDAVGM, 9), (DP_FTRL, 5), (DP_FEDAVG, 7),
        (FEDAVG_ADAGRAD, 5), (DP_FEDAVG_ADAM, 6), (DP_FTRL_YOGI, 7),
        (DP_FTRL_ADAPTIVE, 5), (DP_FEDAVG_ADAPTIVE, 7), (DP_FTRL_EQUIVALENT, 5), (DP_FTRL_ADAPTIVE_EQUIVALENT, 7),
    ],
    ids=[
        "fedavgm-0", "fedavgm-3", "fedavgm-4", "fedavgm-9", "dp-ftrl-5", "dp-fedavg-7",
        "fedavg-adagrad-5", "dp-fedavg-adam-6", "dp-ftrl-yogi-7",
        "dp-ftrl-adaptive-5", "dp-fedavg-adaptive-7", "dp-ftrl-equivalent-5", "dp-ftrl-adaptive-equivalent-7",
    ],
)
def test_crash_inside_a_round_then_resume_is_bit_identical(tmp_path: Path, template: str, crash_round: int) -> None:
    scenario = _write(tmp_path, template, rounds=10, every=2)
    out = tmp_path / "crashed"
    sim = Simulation(load_scenario(scenario, [(["output-dir"], str(out))]), run_dir=out, progress=False)
    _crash_in_round(sim, crash_round)
    with pytest.raises(_Crash):
        sim.run()
    assert _lines(out / "metrics.jsonl") == crash_round
    _run(scenario, tmp_path / "ref", key_of=out)  # the same secret key: the same noise
    resumed = Simulation(load_scenario(out / "config.toml"), run_dir=out, progress=False)
    if crash_round < 2:
        with pytest.warns(CheckpointWarning, match="no checkpoint"):
            assert resumed.resume() == 0
    else:
        assert resumed.resume() == crash_round - crash_round % 2
    resumed.run()
    _assert_same_run(tmp_path / "ref", out)


def test_max_rho_guard_holds_across_resume(tmp_path: Path) -> None:
    """Crash in the round just before the budget stop, and resume a run that already stopped:
    the guard stops before the same round, and the ledger never holds more than the budget."""
    rounds, stop_after = 16, 9
    budget, rho = _dp_ftrl_budget(rounds, stop_after)
    scenario = _write(tmp_path, DP_FTRL, rounds=rounds, every=2, budget=budget)
    out = tmp_path / "run"
    sim = Simulation(load_scenario(scenario, [(["output-dir"], str(out))]), run_dir=out, progress=False)
    _crash_in_round(sim, stop_after - 1)  # the last round that fits, done in memory, then lost
    with pytest.raises(_Crash):
        sim.run()
    _run(scenario, tmp_path / "ref", key_of=out)
    assert len(sim.ledger) == stop_after  # spent in memory before the crash ...
    resumed = Simulation(load_scenario(out / "config.toml"), run_dir=out, progress=False)
    assert resumed.resume() == 8
    assert len(resumed.ledger) == 8  # ... and not counted twice: the ledger is the checkpoint's
    result = resumed.run()
    assert result.summary["rounds"] == stop_after and result.summary["rho"] == rho
    assert len(result.ledger) == stop_after
    _assert_same_run(tmp_path / "ref", out)
    # resuming the stopped run again spends nothing more and stops at the same place
    again = Simulation(load_scenario(out / "config.toml"), run_dir=out, progress=False)
    again.resume()
    result = again.run()
    assert result.summary["rounds"] == stop_after and "max-rho" in result.summary["stopped_reason"]
    _assert_same_run(tmp_path / "ref", out)


def test_checkpoint_holds_strategy_population_and_log_position(tmp_path: Path) -> None:
    scenario = _write(tmp_path, FEDAVGM, rounds=6, every=2)
    out = tmp_path / "run"
    _run(scenario, out)
    ckpts = list_checkpoints(out / CHECKPOINT_DIR)
    assert [r for r, _ in ckpts] == [6, 4]  # keep = 2: the oldest (round 2) was pruned
    assert not list((out / CHECKPOINT_DIR).glob("*.tmp"))
    state = decode(ckpts[0][1].read_bytes())
    assert state["round"] == 6
    assert state["strategy"]["buffer"].shape == state["params"].shape
    assert state["population"]["server_ledger"]["count"].sum() == 6 * 20
    assert state["metrics"]["offset"] == (out / "metrics.jsonl").stat().st_size
    assert state["ledger"] is None  # FedAvgM releases nothing that needs accounting
    saved = torch.load(out / "model.pt")["flat"]
    assert torch.equal(state["params"], saved)


# ----------------------------------------------------------------------------------------------
# corruption


def _finished_run(tmp_path: Path, rounds: int = 8) -> tuple[Path, Path]:
    scenario = _write(tmp_path, FEDAVGM, rounds=rounds, every=2)
    _run(scenario, tmp_path / "ref")
    _run(scenario, tmp_path / "run")
    return tmp_path / "ref", tmp_path / "run"


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "garbage"])
def test_corrupted_newest_checkpoint_falls_back_to_previous_with_warning(tmp_path: Path, damage: str) -> None:
    ref, run = _finished_run(tmp_path)
    (newest_round, newest), (prev_round, _) = list_checkpoints(run / CHECKPOINT_DIR)
    data = bytearray(newest.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(os.urandom(len(data)))
    newest.write_bytes(bytes(data))
    (run / "summary.json").unlink()
    sim = Simulation(load_scenario(run / "config.toml"), run_dir=run, progress=False)
    with pytest.warns(CheckpointWarning, match=rf"{newest.name} is unusable \(.*\); falling back"):
        assert sim.resume() == prev_round
    assert newest_round == prev_round + 2
    sim.run()
    _assert_same_run(ref, run)


def test_corrupted_checkpoint_detected_by_checksum() -> None:
    blob = encode({"round": 3, "params": torch.arange(5.0), "population": {"count": np.arange(4)}})
    state = decode(blob)
    assert state["round"] == 3 and torch.equal(state["params"], torch.arange(5.0))
    assert isinstance(state["population"]["count"], np.ndarray) and state["population"]["count"].tolist() == [0, 1, 2, 3]
    bad = bytearray(blob)
    bad[-1] ^= 1
    with pytest.raises(CorruptCheckpoint, match="checksum mismatch"):
        decode(bytes(bad))
    with pytest.raises(CorruptCheckpoint, match="truncated"):
        decode(blob[:-1])
    with pytest.raises(CorruptCheckpoint, match="not a fedsim checkpoint"):
        decode(b"PK\x03\x04" + blob)


def test_unsupported_state_is_refused_when_saving_naming_the_key() -> None:
    with pytest.raises(TypeError, match=r"state\.strategy\.opt: cannot store object"):
        encode({"round": 1, "strategy": {"opt": object()}})


def test_all_checkpoints_corrupt_starts_over_and_still_matches(tmp_path: Path) -> None:
    ref, run = _finished_run(tmp_path, rounds=6)
    for _, path in list_checkpoints(run / CHECKPOINT_DIR):
        path.write_bytes(path.read_bytes()[:50])
    sim = Simulation(load_scenario(run / "config.toml"), run_dir=run, progress=False)
    with pytest.warns(CheckpointWarning) as record:
        assert sim.resume() == 0
    messages = [str(w.message) for w in record]
    assert sum("unusable" in m for m in messages) == 2
    assert any("no usable checkpoint" in m and "starting over" in m for m in messages)
    sim.run()
    _assert_same_run(ref, run)


def test_run_log_modified_after_checkpoint_is_refused(tmp_path: Path) -> None:
    _, run = _finished_run(tmp_path, rounds=4)
    rows = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(rows[:2]))  # lost rows the checkpoint relies on
    sim = Simulation(load_scenario(run / "config.toml"), run_dir=run, progress=False)
    with pytest.raises(CheckpointError, match="metrics.jsonl does not extend the run log"):
        sim.resume()


# ----------------------------------------------------------------------------------------------
# the command line: changed scenarios are refused, naming the keys


def test_resume_with_changed_scenario_is_refused_naming_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scenario = _write(tmp_path, FEDAVGM, rounds=4, every=2)
    run = tmp_path / "run"
    assert _cli(capsys, "run", str(scenario), "--out", str(run), "--quiet")[0] == 0
    before = (run / "metrics.jsonl").read_bytes()

    # through a real process once: exit code 2, one line, no traceback
    proc = run_cli("run", "--resume", str(run), "--set", "client.lr=0.5", "--seed", "3")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: --resume: ")
    assert "differs from the run in" in proc.stderr and "client.lr, seed" in proc.stderr

    other = tmp_path / "other.toml"
    other.write_text(scenario.read_text().replace("rounds = 4", "rounds = 5").replace("momentum = 0.5", "momentum = 0.6"))
    code, err = _cli(capsys, "run", str(other), "--resume", str(run))
    assert code == 2 and err.count("\n") == 1 and "rounds, strategy.momentum" in err

    # the recorded config edited by hand after the checkpoint: the checkpoint itself refuses
    config = run / "config.toml"
    config.write_text(config.read_text().replace("lr = 0.05", "lr = 0.07"))
    code, err = _cli(capsys, "run", "--resume", str(run))
    assert code == 2
    assert err.count("\n") == 1 and "different scenario; differing keys: client.lr" in err
    assert (run / "metrics.jsonl").read_bytes() == before  # nothing was touched

    # the same scenario (and a neutral key: checkpoint frequency) is accepted
    config.write_text(config.read_text().replace("lr = 0.07", "lr = 0.05"))
    code, err = _cli(capsys, "run", str(scenario), "--resume", str(run), "--set", "checkpoint.every=1", "--quiet")
    assert code == 0, err
    assert "resuming" in err and "after round 4 of 4" in err
    assert (run / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run"], "error: run: a scenario file is required (or --resume RUN_DIR)"),
        (["run", "--resume", "/nonexistent/run"], "no such run directory"),
        (["run", "--resume", "RUN", "--out", "elsewhere"], "--out cannot be combined with --resume"),
        (["run", "--resume", "EMPTY"], "not a run directory (no config.toml)"),
    ],
)
def test_resume_usage_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str) -> None:
    (tmp_path / "EMPTY").mkdir()
    args = [a if a not in ("RUN", "EMPTY") else str(tmp_path / a) for a in args]
    code, err = _cli(capsys, *args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err


def test_checkpoint_from_before_a_new_scenario_key_still_resumes(tmp_path: Path) -> None:
    """A key added to the scenario format later (at its default) does not block a resume; a
    recorded key that now has a non-default value does."""
    from fedsim.engine.checkpoint import checkpoint_path

    ref, run = _finished_run(tmp_path, rounds=6)
    path = checkpoint_path(run / CHECKPOINT_DIR, 6)
    state = decode(path.read_bytes())
    del state["scenario"]["engine"]["max-update-norm"]  # as if written before the key existed
    path.write_bytes(encode(state))
    sim = Simulation(load_scenario(run / "config.toml"), run_dir=run, progress=False)
    assert sim.resume() == 6
    sim.run()
    _assert_same_run(ref, run)
    state["scenario"]["engine"]["max-update-norm"] = 5.0
    path.write_bytes(encode(state))
    sim = Simulation(load_scenario(run / "config.toml"), run_dir=run, progress=False)
    with pytest.raises(CheckpointError, match="differing keys: engine.max-update-norm"):
        sim.resume()
