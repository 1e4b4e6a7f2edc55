"""A Flower job's durable state, without a cluster: the bridge's round-ending path and restart.

The rounds are trained in this process (the engine's in-process executor) and ended by the
bridge's own :meth:`FedsimStrategy.end_round` (round owner, job checkpoint, release record, row):
what a ServerApp does after a round's replies arrive. A fresh :class:`FedsimStrategy` of the same
job is what a restarted ServerApp builds; :meth:`FedsimStrategy.resume` is its restart logic.
The same refusals on a real SuperLink: ``tests/flower/test_resume.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedsim.engine.checkpoint import CheckpointError, decode, encode, list_checkpoints
from fedsim.engine.executors import InProcessExecutor
from fedsim.engine.releases import ReleaseError, ReleaseRecord
from fedsim.flower.server_state import ServerState
from fedsim.flower.strategy import FedsimStrategy
from fedsim.privacy.noise import NoiseKey
from fedsim.scenario import scenario_from_dict

from ..conftest import tiny_scenario

FTRL = {"name": "dp-ftrl", "noise-multiplier": 1.0, "clip-norm": 0.5, "max-participations": 4, "min-separation": 0}


def _bridge(tmp_path: Path, job: str = "job", *, rounds: int = 4, out: str = "run", prior: tuple[str, ...] = ()) -> FedsimStrategy:
    scenario = scenario_from_dict(tiny_scenario("job", rounds=rounds, per_round=6, devices=12, strategy=FTRL, **{"output-dir": str(tmp_path / out)}))
    return FedsimStrategy(scenario, run_dir=tmp_path / out, job_id=job, state=ServerState(tmp_path / "state", job), prior_jobs=prior)


def _rounds(bridge: FedsimStrategy, upto: int) -> FedsimStrategy:
    """Open the job (a restart resumes), then train and end rounds up to ``upto``."""
    bridge.resume()
    owner = bridge.owner
    owner.start()
    executor = InProcessExecutor(owner)
    for r in range(owner.next_round, upto):
        plan = owner.begin(r)
        acc = owner.accumulator(plan)
        bridge.end_round(plan, acc, executor.train(plan, acc))
    return bridge


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_job_stopped_after_round_one_continues(tmp_path: Path) -> None:
    """The round-1 checkpoint is written before round 1's row, so the run log's last line is
    ``b""``: ``torch.load(weights_only=True)`` refused it, and a job killed after round 1 could not
    continue ("no usable checkpoint (all fail their checksums)")."""
    first = _rounds(_bridge(tmp_path), 1)
    state = first.state
    assert state is not None
    [(_, path)] = list_checkpoints(state.checkpoints)
    saved = decode(path.read_bytes(), first.auth)
    assert saved["round"] == 1 and saved["metrics"] == {"offset": 0, "last_line": b""}
    restarted = _bridge(tmp_path)
    assert restarted.resume() == 1
    assert [r["round"] for r in _rows(tmp_path / "run")] == [1]
    _rounds(restarted, 4)
    assert [r["round"] for r in _rows(tmp_path / "run")] == [1, 2, 3, 4]
    assert ReleaseRecord.open(state.releases_path, NoiseKey.load(state.key_path)).released == 4


@pytest.mark.parametrize("damage", ["flip", "forge", "delete", "all"])
def test_a_restart_behind_the_release_record_refuses_naming_the_rounds(tmp_path: Path, damage: str) -> None:
    """The newest usable checkpoint older than the rounds that may have been published: refused,
    never replayed (on a real grid the replay's devices decline, and the same noise on an empty
    sum publishes the noise)."""
    bridge = _rounds(_bridge(tmp_path), 3)
    state = bridge.state
    assert state is not None
    (_, newest), (_, older) = list_checkpoints(state.checkpoints)
    if damage == "flip":
        data = bytearray(newest.read_bytes())
        data[-10] ^= 1
        newest.write_bytes(bytes(data))
    elif damage == "forge":  # unkeyed SHA-256 recomputed over a state with a shorter ledger
        saved = decode(newest.read_bytes(), bridge.auth)
        saved["ledger"] = saved["ledger"][:1]
        newest.write_bytes(encode(saved))
    elif damage == "delete":
        newest.unlink()
    else:
        newest.unlink()
        older.unlink()
    log = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    with pytest.raises(ReleaseError) as refusal:
        _bridge(tmp_path).resume()
    message = str(refusal.value)
    assert "\n" not in message
    expected = {
        "flip": "round 3 may have been published",
        "forge": "round 3 may have been published",
        "delete": "round 3 may have been published",
        "all": "rounds 1-3 may have been published",
    }[damage]
    assert message.startswith(f"job 'job': {expected}"), message
    cause = {
        "flip": "ckpt-00000003.pt (authentication failed (MAC mismatch",
        "forge": "ckpt-00000003.pt (not authenticated (an unkeyed checksum",
        "delete": "no later checkpoint in",
        "all": "checkpoint is none",
    }[damage]
    assert cause in message
    assert "prior-jobs='job'" in message and f"state-dir='{tmp_path / 'state'}'" in message
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == log  # nothing published again


def test_a_crash_between_checkpoint_and_record_publishes_the_round_once(tmp_path: Path) -> None:
    """Killed after round 3's checkpoint, before its release was recorded: nothing of round 3 was
    published; the restarted server records it, then publishes its checkpointed row."""
    bridge = _rounds(_bridge(tmp_path), 2)
    owner = bridge.owner

    def crash(row):
        raise RuntimeError("killed")

    owner.commit = crash  # type: ignore[method-assign]
    plan = owner.begin(2)
    acc = owner.accumulator(plan)
    with pytest.raises(RuntimeError, match="killed"):
        bridge.end_round(plan, acc, InProcessExecutor(owner).train(plan, acc))
    state = bridge.state
    assert state is not None and list_checkpoints(state.checkpoints)[0][0] == 3
    pending = json.loads(decode(list_checkpoints(state.checkpoints)[0][1].read_bytes(), bridge.auth)["pending_row"])
    assert ReleaseRecord.open(state.releases_path, NoiseKey.load(state.key_path)).released == 2
    assert len(_rows(tmp_path / "run")) == 2

    restarted = _rounds(_bridge(tmp_path), 4)
    assert restarted.offset == 3
    rows = _rows(tmp_path / "run")
    assert [r["round"] for r in rows] == [1, 2, 3, 4] and rows[2] == pending
    assert ReleaseRecord.open(state.releases_path, NoiseKey.load(state.key_path)).released == 4
    assert [e["round"] for e in restarted.owner.ledger.to_json()] == [0, 1, 2, 3]


def test_a_swapped_job_key_or_changed_data_is_refused(tmp_path: Path) -> None:
    bridge = _rounds(_bridge(tmp_path), 1)
    state = bridge.state
    assert state is not None
    original = state.key_path.read_bytes()
    NoiseKey.generate().save(state.key_path)
    with pytest.raises(ReleaseError, match=r"noise.key is not the key this run was started with"):
        _bridge(tmp_path).resume()
    state.key_path.write_bytes(original)
    other = scenario_from_dict(tiny_scenario("job", rounds=4, per_round=6, devices=11, strategy=FTRL, **{"output-dir": str(tmp_path / "run")}))
    changed = FedsimStrategy(other, run_dir=tmp_path / "run", job_id="job", state=ServerState(tmp_path / "state", "job"))
    with pytest.raises(ReleaseError, match=r"job 'job': the data differ .*number of devices 12 -> 11.*prior-jobs='job'"):
        changed.resume()


def test_a_new_job_counts_the_prior_jobs_rho(tmp_path: Path) -> None:
    old = _rounds(_bridge(tmp_path, "old", out="old"), 3)
    old_rho = old.owner.finish(0.0).summary["rho"]
    new = _rounds(_bridge(tmp_path, "new", rounds=2, out="new", prior=("old",)), 2)
    summary = new.owner.finish(0.0).summary
    assert summary["prior"]["runs"] == ["old"] and summary["prior"]["rounds"] == 3
    assert summary["prior"]["rho"] == pytest.approx(old_rho)
    assert summary["rho"] == pytest.approx(old_rho + summary["prior"]["rho_this_run"])
    assert NoiseKey.load(new.state.key_path) != NoiseKey.load(old.state.key_path)
    assert not torch.equal(new.owner.params, old.owner.params)
    with pytest.raises(CheckpointError, match=r"prior-jobs: job 'nope': no release record"):
        _bridge(tmp_path, "third", out="third", prior=("nope",)).resume()
