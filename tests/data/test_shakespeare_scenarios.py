"""The Shakespeare scenarios end to end on the fixture plays (tiny LSTMs, a few rounds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsim.data import shakespeare as shk
from fedsim.engine import run_scenario
from fedsim.engine.simulation import build_data
from fedsim.errors import ScenarioError
from fedsim.scenario import load_scenario

from ..conftest import SCENARIOS, run_cli

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "shakespeare"
TINY_LSTM = [(["model", "embedding"], 4), (["model", "hidden"], 8), (["model", "layers"], 1)]


def on_fixture(*extra: tuple[list[str], object]) -> list[tuple[list[str], object]]:
    return [(["data", "path"], str(FIXTURE)), (["data", "min-lines"], 2), *TINY_LSTM, *extra]


@pytest.mark.parametrize("name", ["shakespeare_char.toml", "shakespeare_char_small.toml", "shakespeare_dp_ftrl.toml"])
def test_shipped_scenarios_load(name: str) -> None:
    sc = load_scenario(SCENARIOS / name)
    assert sc.data.dataset == "shakespeare" and sc.model.name == "lstm-lm"


def test_char_scenario_matches_the_tff_task() -> None:
    sc = load_scenario(SCENARIOS / "shakespeare_char.toml")
    assert sc.data.params["level"] == "char" and sc.data.params["seq_length"] == 80
    assert (sc.clients_per_round, sc.client.batch_size, sc.client.local_epochs, sc.client.lr) == (10, 4, 1, 1.0)
    assert sc.strategy.name == "fedavg" and sc.strategy.params["server_lr"] == 1.0
    params = sc.model.params
    assert (params["embedding"], sc.model.hidden, params["layers"]) == (8, 256, 2)


def test_char_run_on_the_fixture(tmp_path: Path) -> None:
    sc = load_scenario(SCENARIOS / "shakespeare_char_small.toml",
                       on_fixture((["rounds"], 2), (["clients-per-round"], 3), (["engine", "eval-every"], 1),
                                  (["data", "max-test"], 50)))
    data = build_data(sc)
    assert data.spec.task == "next-token" and data.spec.num_classes == 90
    assert data.spec.input_shape == (80,) and (data.spec.pad_id, data.spec.oov_ids, data.spec.eos_id) == (0, (1,), 3)
    x, y = data.client_data(0)
    assert x.shape[1] == y.shape[1] == 80 and bool((x[:, 1:] == y[:, :-1]).all())
    result = run_scenario(sc, run_dir=tmp_path / "run")
    assert len(result.metrics) == 2 and 0.0 <= result.summary["accuracy"] <= 1.0


def test_gboard_scenario_on_the_fixture_reaches_its_target_rho(tmp_path: Path) -> None:
    sc = load_scenario(SCENARIOS / "shakespeare_dp_ftrl.toml",
                       on_fixture((["rounds"], 4), (["clients-per-round"], 4), (["data", "vocab-size"], 60),
                                  (["population", "period"], 2), (["strategy", "min-separation"], 1),
                                  (["strategy", "max-participations"], 2)))
    assert sc.strategy.params["target_rho"] == 0.81 and sc.population.availability == "diurnal"
    result = run_scenario(sc, run_dir=tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["accuracy"] is not None and r["rho"] is not None for r in rows)
    assert all(r["epsilon"] is not None and r["loss"] is not None for r in rows)
    assert result.summary["rho"] == pytest.approx(0.81, rel=1e-5)
    # one contribution per device per simulated day: min-separation = rounds per day - 1
    assert sc.strategy.params["min_separation"] == sc.population.period - 1
    data = build_data(sc)
    assert data.spec.num_classes == 64 and data.spec.oov_ids == (shk.OOV,) and data.spec.eos_id == shk.EOS


def test_missing_plays_name_the_install_command(monkeypatch) -> None:
    import importlib.util

    sc = load_scenario(SCENARIOS / "shakespeare_dp_ftrl.toml")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    shk._cached_corpus.cache_clear()
    shk._cached_plays.cache_clear()
    with pytest.raises(ScenarioError) as info:
        build_data(sc)
    assert shk.INSTALL_COMMAND in str(info.value) and "\n" not in str(info.value)


def test_vocabulary_larger_than_corpus_cli_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_cli("run", str(SCENARIOS / "shakespeare_dp_ftrl.toml"), "--set", f"data.path={json.dumps(str(FIXTURE))}",
                   "--set", "data.vocab-size=100000", "--out", str(out))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "vocab-size" in lines[0] and "distinct words" in lines[0], proc.stderr
    assert not (out / "metrics.jsonl").exists()
