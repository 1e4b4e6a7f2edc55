"""One key store for a run's ``secret/noise.key`` and a Flower job's ``noise.key``."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsim.engine.checkpoint import CheckpointError
from fedsim.engine.keystore import KeyStore
from fedsim.engine.simulation import Simulation
from fedsim.flower.server_state import ServerState
from fedsim.privacy.noise import KEY_FILE, NoiseKey
from fedsim.scenario import scenario_from_dict

from ..conftest import tiny_scenario


def test_a_new_key_is_drawn_saved_private_and_read_back(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "secret" / "noise.key")
    key, fresh = store.open_or_create(started=False, where="here", missing="gone")
    assert fresh and store.path.stat().st_mode & 0o777 == 0o600 and store.path.parent.stat().st_mode & 0o777 == 0o700
    again, fresh = store.open_or_create(started=True, where="here", missing="gone")
    assert not fresh and again._material == key._material
    assert store.reload(where="here", missing="gone")._material == key._material


def test_a_started_run_without_its_key_refuses_in_one_line(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "noise.key")
    with pytest.raises(CheckpointError, match=r"noise\.key: the key is gone$"):
        store.open_or_create(started=True, where="here", missing="the key is gone")
    with pytest.raises(CheckpointError, match=r"noise\.key: the key is gone$"):
        store.reload(where="here", missing="the key is gone")
    store.path.write_text("not a key")
    with pytest.raises(CheckpointError, match=r"^here: "):
        store.load("here")


def test_the_engine_and_a_flower_job_keep_their_keys_in_the_one_store(tmp_path: Path) -> None:
    """A keyed in-process run writes ``secret/noise.key`` through its key store; a Flower job's
    state keeps its ``noise.key`` through the same class (same modes, same refusals)."""
    strategy = {"name": "dp-fedavg", "noise-multiplier": 1.0, "clip-norm": 0.5}
    sim = Simulation(scenario_from_dict(tiny_scenario("keyed", rounds=1, strategy=strategy)), run_dir=tmp_path / "run", progress=False)
    assert isinstance(sim.key_store, KeyStore) and sim.key_store.path == tmp_path / "run" / KEY_FILE
    sim.run()
    assert NoiseKey.load(tmp_path / "run" / KEY_FILE)._material == sim.noise_source.key._material
    state = ServerState(tmp_path / "state", "job")
    key, fresh = state.key()
    assert fresh and isinstance(state.keys, KeyStore) and state.keys.path == state.key_path
    assert state.keys.load("job")._material == key._material
