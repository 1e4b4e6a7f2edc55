"""``fedsim run --backend flower``: the scenario through Flower's simulation engine (Ray) with the
bridged strategy gives the in-process engine's run; the flag's bad uses are one-line errors."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from fedsim.engine import run_scenario
from fedsim.scenario import load_scenario

from ..conftest import ROOT, SCENARIOS, run_cli
from .harness import MARKER, _marked_pids, die_with_parent


def fedsim_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m fedsim ARGS`` in its own session; afterwards none of its processes (Ray's) survive."""
    marker = uuid.uuid4().hex
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{MARKER: marker})
    proc = subprocess.Popen([sys.executable, "-m", "fedsim", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=die_with_parent)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for _ in range(20):  # Ray's own processes (raylet, workers) must be gone too
            pids = _marked_pids(marker)
            if not pids:
                break
            time.sleep(0.5)
        for pid in _marked_pids(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.flower
@pytest.mark.slow
def test_backend_flower_runs_the_quickstart_like_the_inprocess_engine(tmp_path: Path) -> None:
    out = tmp_path / "flower"
    proc = fedsim_cli("run", str(SCENARIOS / "quickstart.toml"), "--backend", "flower", "--rounds", "2", "--out", str(out),
                      "--json", "--quiet")
    stdout, stderr = proc.stdout, proc.stderr
    assert proc.returncode == 0, stderr[-4000:]
    # Flower's current simulation runtime (no deprecated entry point), and no notice users cannot act on
    assert "deprecat" not in stderr.lower() and "SuperNodes changed" not in stderr, stderr[-4000:]
    summary = json.loads(stdout)
    assert (summary["backend"], summary["rounds"], summary["stopped_reason"]) == ("flower", 2, "completed")
    assert summary["flower"]["nodes"] == 100 and summary["flower"]["no_reply"] == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for name in ("config.toml", "summary.json", "model.pt", "metrics.png", "participation.json"):
        assert (out / name).is_file(), name

    expected = run_scenario(load_scenario(SCENARIOS / "quickstart.toml", [(["rounds"], 2)]))
    final = torch.load(out / "model.pt")["flat"]
    assert torch.allclose(final, expected.params, rtol=1e-5, atol=1e-5), (final - expected.params).abs().max()
    for got, want in zip(rows, expected.metrics, strict=True):
        assert (got["clients"], got["eligible"], got["rejected"]) == (want["clients"], want["eligible"], 0)
        assert got["accuracy"] == pytest.approx(want["accuracy"], abs=2e-3)
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)


@pytest.mark.flower
@pytest.mark.slow
def test_poisson_dp_fedavg_on_flower_reports_the_unamplified_guarantee(tmp_path: Path) -> None:
    """On Flower every sampled device receives its own train message, so devices and network
    observers learn the Poisson cohort that amplification by sampling assumes secret: the ServerApp
    records and reports each round without amplification (rho as ever, epsilon from rho alone),
    and says so. The in-process engine, whose cohort never leaves the server, keeps the amplified
    epsilon of the same rounds."""
    out = tmp_path / "flower"
    rounds, devices, per_round = 2, 8, 4  # q = 0.5
    sets = ["--rounds", str(rounds), "--set", f"data.num-devices={devices}", "--set", f"clients-per-round={per_round}"]
    proc = fedsim_cli("run", str(SCENARIOS / "dp_fedavg.toml"), "--backend", "flower", *sets, "--out", str(out), "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)
    assert (summary["backend"], summary["rounds"]) == ("flower", rounds)

    def plan(*extra: str) -> dict:
        made = run_cli("privacy", "dp-fedavg", "--noise-multiplier", "1.3", "--rounds", str(rounds), "--delta", "1e-6",
                       "--json", *extra)
        assert made.returncode == 0, made.stderr
        return json.loads(made.stdout)

    unamplified, amplified = plan(), plan("--sampling-rate", "0.5")
    assert amplified["epsilon"] < 0.9 * unamplified["epsilon"]  # amplification would matter here
    # what the ServerApp wrote and printed: the unamplified guarantee, and why
    assert summary["rho"] == pytest.approx(unamplified["rho"], rel=1e-12)
    assert summary["epsilon"] == pytest.approx(unamplified["epsilon"], rel=1e-9)
    assert summary["flower"]["cohort_secret"] is False
    ledger = json.loads((out / "ledger.json").read_text())
    assert [e["event"]["type"] for e in ledger] == ["gaussian"] * rounds
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["epsilon"] == pytest.approx(unamplified["epsilon"], rel=1e-9)
    assert "every sampled device receives its own train message" in proc.stderr
    assert "without amplification by sampling" in proc.stderr

    # the in-process engine: the cohort stays secret, epsilon is amplified
    scenario = load_scenario(
        SCENARIOS / "dp_fedavg.toml", [(["rounds"], rounds), (["data", "num-devices"], devices), (["clients-per-round"], per_round)]
    )
    expected = run_scenario(scenario)
    assert [type(e).__name__ for _, e in expected.ledger.events()] == ["SampledGaussianEvent"] * rounds
    assert expected.summary["rho"] == pytest.approx(summary["rho"], rel=1e-12)
    assert expected.summary["epsilon"] == pytest.approx(amplified["epsilon"], rel=1e-9)


def test_backend_flag_errors_are_one_line(tmp_path: Path) -> None:
    bad = run_cli("run", str(SCENARIOS / "quickstart.toml"), "--backend", "grpc")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "--backend" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    resume = run_cli("run", "--resume", str(tmp_path), "--backend", "flower")
    assert resume.returncode == 2 and resume.stderr.strip() == "error: --backend flower cannot be combined with --resume"
    in_file = run_cli("run", str(SCENARIOS / "quickstart.toml"), "--set", 'engine.backend="ray-cluster"')
    assert in_file.returncode == 2 and "engine.backend" in in_file.stderr and "'flower'" in in_file.stderr


@pytest.mark.flower
@pytest.mark.slow
def test_privacy_budget_stops_a_flower_run_where_it_stops_the_inprocess_run(tmp_path: Path) -> None:
    from fedsim.flower.simulation import FlowerSimulation
    from fedsim.privacy.noise import NoiseKey

    NoiseKey.generate().save(tmp_path / "fixed.key")  # both engines add the same noise
    overrides = [
        (["privacy", "noise-key-file"], str(tmp_path / "fixed.key")), (["privacy", "run-id"], "cd" * 16),
        (["rounds"], 6), (["clients-per-round"], 4), (["data", "num-devices"], 8), (["privacy", "max-rho"], 10.0),
        (["strategy", "noise-multiplier"], 1.0), (["strategy", "max-participations"], 6), (["strategy", "min-separation"], 0),
    ]
    scenario = load_scenario(SCENARIOS / "dp_ftrl.toml", overrides)
    expected = run_scenario(scenario)
    assert 0 < expected.summary["rounds"] < 6, "the budget must stop this run early"
    got = FlowerSimulation(scenario, run_dir=tmp_path / "run", progress=False).run()
    s = got.summary
    assert (s["rounds"], s["stopped_reason"]) == (expected.summary["rounds"], expected.summary["stopped_reason"])
    assert s["rho"] == pytest.approx(expected.summary["rho"], rel=1e-12) and s["rho"] <= 10.0
    assert torch.allclose(got.params, expected.params, rtol=1e-5, atol=1e-5)
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    assert [e["round"] for e in ledger] == list(range(s["rounds"]))


@pytest.mark.flower
@pytest.mark.slow
def test_flower_runs_a_user_model_and_dataset_from_files(tmp_path: Path) -> None:
    """The ClientApp loads its own device's data and the user's model through the same contract."""
    from fedsim.flower.simulation import FlowerSimulation

    overrides = [(["rounds"], 2), (["clients-per-round"], 3), (["data", "users"], 5)]
    scenario = load_scenario(SCENARIOS / "custom_workload.toml", overrides)
    expected = run_scenario(scenario)
    got = FlowerSimulation(scenario, run_dir=tmp_path / "run", progress=False).run()
    assert got.summary["num_devices"] == 5 and got.summary["flower"]["nodes"] == 5
    # the devices train with the per-client loop, the in-process engine with vmap: equal up to float32 rounding
    assert torch.allclose(got.params, expected.params, rtol=1e-5, atol=1e-5), (got.params - expected.params).abs().max()
    for a, b in zip(got.metrics, expected.metrics, strict=True):
        assert a["clients"] == b["clients"] == 3
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=2e-3)


@pytest.mark.flower
def test_a_flower_run_that_fails_is_a_one_line_error_and_leaves_no_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An app Flower cannot run (no [tool.flwr.app]): `flwr run` fails, fedsim says why on one line."""
    from fedsim.flower import simulation

    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text('[project]\nname = "broken"\nversion = "1.0.0"\n', encoding="utf-8")
    monkeypatch.setattr(simulation, "APP_DIR", app)
    scenario = load_scenario(SCENARIOS / "quickstart.toml", [(["rounds"], 1)])
    before = {int(p.name) for p in _children()}
    with pytest.raises(simulation.FlowerRunError) as failed:
        simulation.FlowerSimulation(scenario, run_dir=tmp_path / "run", progress=False).run()
    message = str(failed.value)
    assert "\n" not in message and message.startswith("--backend flower: the Flower simulation ended without a result")
    assert not (tmp_path / "run" / "summary.json").exists()
    assert {int(p.name) for p in _children()} <= before  # the SuperLink and `flwr run` are gone


def _children() -> list[os.DirEntry]:
    """This process's live child processes (from /proc)."""
    me = str(os.getpid())
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[1] == me and fields[0] != "Z":
            out.append(entry)
    return out
