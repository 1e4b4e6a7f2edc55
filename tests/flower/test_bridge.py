"""The Flower bridge's pieces, in process: record conversion and its rejections, the train
instruction, the device's on-disk participation ledger, the ServerApp's run config."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from fedsim.errors import ScenarioError
from fedsim.flower.client_app import device_limit, faults_of
from fedsim.flower.device import DeviceLedger, durable_dirs
from fedsim.flower.protocol import (
    TrainInstruction,
    client_scenario_sections,
    scenario_from_sections,
)
from fedsim.flower.records import ParamLayout, RecordError
from fedsim.flower.server_app import ServerOptions
from fedsim.models import build_model, get_flat
from fedsim.scenario import load_scenario
from fedsim.strategy import ParticipationLimit
from fedsim.types import TrainConfig

from ..conftest import SCENARIOS


@pytest.fixture
def mlp() -> torch.nn.Module:
    return build_model("mlp", num_features=8, num_classes=3, hidden=5, seed=1)


def test_flat_vector_round_trips_through_a_named_array_record(mlp: torch.nn.Module) -> None:
    layout = ParamLayout.of(mlp)
    flat = get_flat(mlp)
    record = layout.to_arrays(flat)
    assert list(record.keys()) == [name for name, _ in mlp.named_parameters()]
    assert record["0.weight"].numpy().shape == (5, 8)
    # it is a PyTorch state dict for a Flower user
    mlp2 = build_model("mlp", num_features=8, num_classes=3, hidden=5, seed=2)
    mlp2.load_state_dict(record.to_torch_state_dict())
    assert torch.equal(get_flat(mlp2), flat)
    assert torch.equal(layout.to_flat(record), flat)
    assert layout.to_flat(record).dtype == torch.float32


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda r, lay: r.pop("2.bias"), "wrong_shape"),
        (lambda r, lay: r.__setitem__("extra", Array(np.zeros(1, np.float32))), "wrong_shape"),
        (lambda r, lay: r.__setitem__("0.weight", Array(np.zeros((8, 5), np.float32))), "wrong_shape"),
        (lambda r, lay: r.__setitem__("0.bias", Array(np.zeros(5, np.float64))), "wrong_dtype"),
        (lambda r, lay: r.__setitem__("0.bias", Array(np.zeros(5, np.int32))), "wrong_dtype"),
        # a header that lies: declared (5,) float32, payload (6,) float32
        (lambda r, lay: r.__setitem__("0.bias", Array("float32", (5,), "numpy.ndarray", _npy(np.zeros(6, np.float32)))), "wrong_shape"),
        (lambda r, lay: r.__setitem__("0.bias", Array("float32", (5,), "numpy.ndarray", b"not an npy file")), "malformed_record"),
    ],
)
def test_malformed_arrays_are_rejected_with_a_reason(mlp: torch.nn.Module, mutate, reason: str) -> None:
    layout = ParamLayout.of(mlp)
    record = layout.to_arrays(get_flat(mlp))
    mutate(record, layout)
    with pytest.raises(RecordError) as info:
        layout.to_flat(record)
    assert info.value.reason == reason


def test_a_non_array_record_is_malformed(mlp: torch.nn.Module) -> None:
    with pytest.raises(RecordError) as info:
        ParamLayout.of(mlp).to_flat(ConfigRecord({"x": 1}))
    assert info.value.reason == "malformed_record"


def test_train_instruction_round_trips_through_a_config_record() -> None:
    scenario = load_scenario(SCENARIOS / "dp_ftrl.toml")
    sections = client_scenario_sections(scenario)
    for train, limit in [
        (TrainConfig(round=4, lr=0.05, local_epochs=2, batch_size=8, clip_norm=0.5), ParticipationLimit(7, 13)),
        (TrainConfig(round=0, lr=0.1, local_epochs=1, batch_size=16), None),
        (TrainConfig(round=1, lr=0.1, local_epochs=1, batch_size=16), ParticipationLimit(None, 3)),
    ]:
        sent = TrainInstruction(12, 2**62 + 5, train, limit, "job-1", sections)
        got = TrainInstruction.from_config(sent.to_config())
        assert got == sent
    # the device rebuilds the same data, model and trainer sections (and nothing else)
    rebuilt = scenario_from_sections(json.loads(json.dumps(sections)))
    assert (rebuilt.seed, rebuilt.data, rebuilt.model, rebuilt.client) == (
        scenario.seed, scenario.data, scenario.model, scenario.client
    )


def test_a_malformed_instruction_raises() -> None:
    good = TrainInstruction(0, 1, TrainConfig(0, 0.1, 1, 16), None, "j", {"name": "x"}).to_config()
    for key, value in [("round", "zero"), ("lr", "fast"), ("device-id", 1.5), ("scenario", "[1, 2]")]:
        bad = ConfigRecord({**dict(good), key: value})
        with pytest.raises(ValueError):
            TrainInstruction.from_config(bad)
    missing = ConfigRecord({k: v for k, v in good.items() if k != "task-seed"})
    with pytest.raises(ValueError, match="task-seed"):
        TrainInstruction.from_config(missing)


def test_device_ledger_enforces_k_and_b_and_survives_a_new_process_view(tmp_path: Path) -> None:
    limit = ParticipationLimit(max_participations=2, min_separation=1)
    ledger = DeviceLedger(tmp_path, device_id=3, job_id="job/A")
    assert ledger.claim(0, limit)
    assert not ledger.claim(1, limit)  # one round strictly between is required
    assert not ledger.claim(0, limit)  # a second reply for round 0 would be a second contribution
    # what a restarted SuperNode (a new process) sees: the same file
    again = DeviceLedger(tmp_path, device_id=3, job_id="job/A")
    assert again.rounds() == [0]
    assert again.claim(2, limit)
    assert not again.claim(4, limit)  # k = 2 reached
    assert DeviceLedger(tmp_path, 3, "job/A").rounds() == [0, 2]
    assert again.path.parent == tmp_path / "device-3" and again.path.name == "job_A.json"
    # another job, another device: independent
    assert DeviceLedger(tmp_path, 3, "job-B").claim(4, limit)
    assert DeviceLedger(tmp_path, 4, "job/A").claim(4, limit)
    # no limit: once per round, recorded
    free = DeviceLedger(tmp_path, 5, "j")
    assert all(free.claim(r, None) for r in range(3)) and free.rounds() == [0, 1, 2]
    assert not free.claim(1, None)


def _fsynced_paths(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record the path behind every file descriptor passed to ``os.fsync`` (then fsync it)."""
    seen: list[Path] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        seen.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def test_a_device_claim_makes_its_directories_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new ``device-N/`` (and a new state directory) is only on disk once its parent is fsynced:
    the first claim fsyncs both parents before it returns, and so does every later claim (a
    directory left by a crash between mkdir and fsync exists but may not be durable)."""
    state = tmp_path / "node" / "state"
    seen = _fsynced_paths(monkeypatch)
    ledger = DeviceLedger(state, device_id=7, job_id="job")
    assert ledger.claim(0, None)
    device_dir = state / "device-7"
    assert device_dir in seen  # the ledger file's own rename (atomic_write_text)
    assert state in seen  # device-7's entry
    assert state.parent in seen and tmp_path in seen  # the new state directory's entry, and node/'s
    seen.clear()
    assert DeviceLedger(state, 7, "job").claim(1, None)
    assert {device_dir, state, state.parent} <= set(seen)


def test_durable_dirs_creates_and_fsyncs_from_the_top_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _fsynced_paths(monkeypatch)
    durable_dirs(tmp_path / "a" / "b" / "c", top=tmp_path / "a")
    assert (tmp_path / "a" / "b" / "c").is_dir()
    assert set(seen) == {tmp_path, tmp_path / "a", tmp_path / "a" / "b"}
    with pytest.raises(ValueError, match="not"):
        durable_dirs(tmp_path / "x", top=tmp_path / "y")


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=2, node_config=node_config, state=RecordDict(), run_config={})


def test_device_limit_is_the_stricter_of_server_and_node_config() -> None:
    server = ParticipationLimit(5, 2)
    assert device_limit(server, _context({"partition-id": 0})) == server
    assert device_limit(server, _context({"max-participations": 3})) == ParticipationLimit(3, 2)
    assert device_limit(server, _context({"min-separation": 9})) == ParticipationLimit(5, 9)
    assert device_limit(None, _context({"max-participations": 1})) == ParticipationLimit(1, 0)
    assert device_limit(None, _context({})) is None
    with pytest.raises(ValueError, match="max-participations"):
        device_limit(server, _context({"max-participations": -1}))


def test_fault_injection_config_is_validated() -> None:
    assert faults_of(_context({})) == ("none",)
    assert faults_of(_context({"fault": "nan, wrong-shape,exceed-clip"})) == ("nan", "wrong-shape", "exceed-clip")
    assert faults_of(_context({"fault": "none,error"})) == ("none", "error")
    with pytest.raises(ValueError, match="unknown"):
        faults_of(_context({"fault": "nan,explode"}))


def test_server_options_from_run_config() -> None:
    opts = ServerOptions.from_run_config(
        {"scenario": "scenarios/dp_ftrl.toml", "rounds": 3, "round-timeout": 30, "min-nodes": 2, "other": "x"}
    )
    assert (opts.rounds, opts.round_timeout, opts.min_nodes, opts.seed) == (3, 30.0, 2, -1)
    scenario = opts.load()
    assert scenario.rounds == 3 and scenario.strategy.name == "dp-ftrl"
    assert ServerOptions.from_run_config({"seed": 5, "out-dir": "/tmp/x"}).load().seed == 5
    for bad, key in [({"rounds": "3"}, "rounds"), ({"min-nodes": 0}, "min-nodes"), ({"round-timeout": -1.0}, "round-timeout")]:
        with pytest.raises(ScenarioError, match=key):
            ServerOptions.from_run_config(bad)
    with pytest.raises(ScenarioError, match="not found"):
        ServerOptions.from_run_config({"scenario": "no/such.toml"}).load()


def test_array_record_sizes_match_the_model(mlp: torch.nn.Module) -> None:
    layout = ParamLayout.of(mlp)
    assert layout.num_params == sum(p.numel() for p in mlp.parameters())
    with pytest.raises(ValueError):
        layout.to_arrays(torch.zeros(layout.num_params + 1))
    assert isinstance(layout.to_arrays(torch.zeros(layout.num_params)), ArrayRecord)


def test_the_bridge_accounts_poisson_rounds_without_amplification() -> None:
    """Flower sends every sampled device its own message: the bridge's round owner records a
    Poisson-sampled DP-FedAvg round unamplified, and its budget check stops where that figure
    would exceed ``max-epsilon`` (the in-process engine's amplified round still fits)."""
    from fedsim.engine.rounds import RoundOwner
    from fedsim.flower.strategy import FedsimStrategy
    from fedsim.privacy.events import GaussianEvent, SampledGaussianEvent

    # one round at z = 1.3, delta = 1e-6: epsilon 3.63 unamplified, 3.12 amplified at q = 0.5
    overrides = [
        (["rounds"], 2), (["data", "num-devices"], 8), (["clients-per-round"], 4), (["privacy", "max-epsilon"], 3.4),
    ]
    scenario = load_scenario(SCENARIOS / "dp_fedavg.toml", overrides)
    inprocess = RoundOwner(scenario, checkpoints=False)
    assert isinstance(inprocess.round_event(0), SampledGaussianEvent)
    assert inprocess.begin(0) is not None

    bridge = FedsimStrategy(scenario).owner
    assert bridge.round_event(0) == GaussianEvent(1.3)
    assert bridge.begin(0) is None
    assert bridge.stopped_reason.startswith("privacy budget: round 1 would reach epsilon=3.634 > max-epsilon=3.4")
