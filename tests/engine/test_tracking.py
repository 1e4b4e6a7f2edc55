"""[log] tensorboard / mlflow: the trackers log what the public run files hold, read back here
from the event files and the MLflow store; a DP run's withheld values never reach them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsim.api import run
from fedsim.engine.rounds import WITHHELD_KEYS
from fedsim.tracking import MLFLOW_STORE, TrackingError, check_available

from ..conftest import SCENARIOS, tiny_scenario

LOG = {"tensorboard": True, "mlflow": True}
DP = {"name": "dp-ftrl", "target-rho": 0.5, "max-participations": 2, "min-separation": 1}


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _mlflow_run(store: Path, experiment: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} in {store}"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_and_mlflow_hold_the_runs_public_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = run(tiny_scenario("tracked", rounds=3, log=LOG), out=tmp_path / "r")
    rows = _metrics(out.run_dir)
    scalars = _scalars(out.run_dir)
    assert scalars["accuracy"] == [(r["round"], pytest.approx(r["accuracy"])) for r in rows]
    assert [v for _, v in scalars["train_loss"]] == pytest.approx([r["train_loss"] for r in rows])
    assert "rho" not in scalars  # null in a run without DP: not logged

    client, ml = _mlflow_run(out.run_dir / MLFLOW_STORE, "tracked", monkeypatch)
    assert ml.info.status == "FINISHED" and ml.data.tags["fedsim.run_dir"] == str(out.run_dir.resolve())
    assert ml.data.params["client.lr"] == "0.1" and ml.data.params["rounds"] == "3"
    history = client.get_metric_history(ml.info.run_id, "accuracy")
    assert sorted((m.step, m.value) for m in history) == [(r["round"], pytest.approx(r["accuracy"])) for r in rows]
    assert ml.data.metrics["summary.accuracy"] == pytest.approx(out.summary["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(ml.info.run_id)}
    assert artifacts == {"summary.json", "config.toml", "metrics.jsonl", "metrics.png"}


def test_a_dp_run_logs_only_what_it_publishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    log = dict(LOG, **{"mlflow-uri": store.resolve().as_uri(), "mlflow-experiment": "dp-study"})
    out = run(tiny_scenario("dp", rounds=3, strategy=DP, log=log), out=tmp_path / "r")
    assert not (out.run_dir / MLFLOW_STORE).exists()  # mlflow-uri names the store
    private = [json.loads(line) for line in (out.run_dir / "private" / "diagnostics.jsonl").read_text().splitlines()]
    assert all(row["train_loss"] is not None for row in private)  # the exact values exist, privately

    scalars = _scalars(out.run_dir)
    assert not set(WITHHELD_KEYS) & set(scalars)
    assert [v for _, v in scalars["rho"]] == pytest.approx([r["rho"] for r in _metrics(out.run_dir)])

    client, ml = _mlflow_run(store, "dp-study", monkeypatch)
    logged = set(ml.data.metrics)
    assert not set(WITHHELD_KEYS) & logged and "summary.rejected" not in logged
    assert ml.data.metrics["summary.noise_multiplier"] == pytest.approx(out.summary["noise_multiplier"])
    artifacts = {a.path for a in client.list_artifacts(ml.info.run_id)}
    assert "ledger.json" in artifacts and not any(a.startswith(("private", "secret")) for a in artifacts)


def test_a_missing_tracker_package_is_one_line_before_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(TrackingError, match=r"\[log\] mlflow = true needs the mlflow package: pip install -e '.\[tracking\]'"):
        run(SCENARIOS / "quickstart.toml", overrides={"log.mlflow": True}, out=tmp_path / "r")
    assert not (tmp_path / "r").exists()
    check_available(type("Log", (), {"tensorboard": True, "mlflow": False})())  # installed: no error


class _Crash(Exception):
    pass


def test_a_resumed_run_continues_its_mlflow_run_and_tensorboard_hides_replayed_rounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedsim.engine import Simulation
    from fedsim.scenario import load_scenario, scenario_from_dict

    out = tmp_path / "r"
    raw = tiny_scenario("resumed", rounds=5, log=LOG, checkpoint={"every": 2}, **{"output-dir": str(out)})
    sim = Simulation(scenario_from_dict(raw), run_dir=out, progress=False)
    original = sim.run_round

    def run_round(r: int):  # round 4 is trained, then the process "dies" before logging it
        row = original(r)
        if r == 3:
            raise _Crash(r)
        return row

    sim.run_round = run_round  # type: ignore[method-assign]
    with pytest.raises(_Crash):
        sim.run()
    resumed = Simulation(load_scenario(out / "config.toml"), run_dir=out, progress=False)
    assert resumed.resume() == 2  # round 3 was logged, then is replayed
    resumed.run()
    rows = _metrics(out)
    assert [step for step, _ in _scalars(out)["accuracy"]] == [1, 2, 3, 4, 5]
    assert [v for _, v in _scalars(out)["accuracy"]] == pytest.approx([r["accuracy"] for r in rows])
    client, ml = _mlflow_run(out / MLFLOW_STORE, "resumed", monkeypatch)  # one run, continued
    assert ml.info.status == "FINISHED"
    latest = {m.step: m.value for m in sorted(client.get_metric_history(ml.info.run_id, "accuracy"), key=lambda m: m.timestamp)}
    assert latest == {r["round"]: pytest.approx(r["accuracy"]) for r in rows}
