"""The run recorder: a run's files are written by one recorder, ``summary.json`` once.

The Flower bridge adds its part of the summary (``backend``, ``flower``, the participation
ledger) through a summary hook of the engine's recorder, before the one write; it used to
rewrite ``summary.json`` (and merge ``private/summary.json``) after the engine had written them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedsim.engine.executors import InProcessExecutor
from fedsim.engine.recorder import RunFiles
from fedsim.engine.rundir import RunDir
from fedsim.engine.simulation import Simulation
from fedsim.flower.server_state import ServerState
from fedsim.flower.strategy import FedsimStrategy
from fedsim.scenario import scenario_from_dict

from ..conftest import tiny_scenario

FTRL = {"name": "dp-ftrl", "noise-multiplier": 1.0, "clip-norm": 0.5, "max-participations": 4, "min-separation": 0}


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names every :meth:`RunDir.write_json` call writes, in order (the real write still happens)."""
    names: list[str] = []
    original = RunDir.write_json

    def counted(self: RunDir, name: str, data: Any) -> None:
        names.append(name)
        original(self, name, data)

    monkeypatch.setattr(RunDir, "write_json", counted)
    return names


def _bridge(tmp_path: Path) -> FedsimStrategy:
    scenario = scenario_from_dict(
        tiny_scenario("job", rounds=3, per_round=6, devices=12, strategy=FTRL, **{"output-dir": str(tmp_path / "run")})
    )
    return FedsimStrategy(scenario, run_dir=tmp_path / "run", job_id="job", state=ServerState(tmp_path / "state", "job"))


def test_the_flower_bridge_writes_summary_json_once_with_its_part(tmp_path: Path, writes: list[str]) -> None:
    """A job whose rounds all ran (its server stopped before the summary) is finished by a
    restarted server: the summary holds the engine's and the bridge's keys, written once."""
    first = _bridge(tmp_path)
    first.resume()
    owner = first.owner
    owner.start()
    executor = InProcessExecutor(owner)
    for r in range(3):
        plan = owner.begin(r)
        acc = owner.accumulator(plan)
        first.end_round(plan, acc, executor.train(plan, acc))
    assert not (tmp_path / "run" / "summary.json").exists()

    restarted = _bridge(tmp_path)
    seen: list[bool] = []
    restarted.owner.recorder.add_summary_hook(lambda s, p, f: seen.append((tmp_path / "run" / "summary.json").exists()))
    result = restarted.run(None)  # type: ignore[arg-type]  # every round is done: no grid needed
    assert seen == [False]  # the hooks ran before anything was written
    assert writes.count("summary.json") == 1 and writes.count("private/summary.json") == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary == json.loads(json.dumps(result.summary))
    assert summary["backend"] == "flower" and summary["rounds"] == 3 and summary["rho"] > 0
    assert summary["flower"]["job_id"] == "job" and summary["flower"]["resumed_at_round"] == 3
    assert summary["flower"]["no_reply"] is None  # withheld in a DP run
    private = json.loads((tmp_path / "run" / "private" / "summary.json").read_text())
    assert list(private) == ["rejected", "flower"] and private["flower"]["no_reply"] == 0
    assert (tmp_path / "run" / "private" / "participation.json").is_file()
    assert not (tmp_path / "run" / "participation.json").exists()


def test_a_summary_hook_adds_keys_and_files_to_an_in_process_run(tmp_path: Path, writes: list[str]) -> None:
    """Any hook's additions reach ``summary.json``, ``private/summary.json`` and the files it names."""
    sc = scenario_from_dict(tiny_scenario("hooked", rounds=2, per_round=4, devices=8, strategy=FTRL))
    sim = Simulation(sc, run_dir=tmp_path / "run", progress=False)

    def hook(summary: dict[str, Any], private: dict[str, Any], files: RunFiles) -> None:
        summary["extra"] = {"rounds_seen": summary["rounds"]}
        private["extra_exact"] = 7
        files.public["extra.json"] = {"public": True}
        files.private["extra.json"] = {"private": True}

    sim.recorder.add_summary_hook(hook)
    result = sim.run()
    run = tmp_path / "run"
    assert result.summary["extra"] == {"rounds_seen": 2}
    assert json.loads((run / "summary.json").read_text())["extra"] == {"rounds_seen": 2}
    assert json.loads((run / "private" / "summary.json").read_text())["extra_exact"] == 7
    assert json.loads((run / "extra.json").read_text()) == {"public": True}
    assert json.loads((run / "private" / "extra.json").read_text()) == {"private": True}
    assert (run / "private").stat().st_mode & 0o777 == 0o700
    assert writes.count("summary.json") == 1
