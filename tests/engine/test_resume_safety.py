"""A published round is never released again with different inputs (the in-process engine).

The release record (``private/releases.jsonl``: ``fedsim.engine.releases``) is the run's
high-water mark: written and fsynced before a round's row is published. A resume may re-execute
rounds below it (after a crash between checkpoints, a corrupt newest checkpoint, or with
checkpoints off) only if each reproduces what it released; changed data, a swapped key, a
forged checkpoint or a record cut back are refused, in one line, before anything is published.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.cli import main
from fedsim.data.fingerprint import data_fingerprint
from fedsim.engine import Simulation
from fedsim.engine.checkpoint import (
    CHECKPOINT_DIR,
    MAGIC,
    CheckpointError,
    CheckpointKey,
    CheckpointWarning,
    decode,
    encode,
    list_checkpoints,
)
from fedsim.engine.releases import RELEASES_FILE, ReleaseError, ReleaseRecord
from fedsim.privacy.noise import KEY_FILE, NoiseKey
from fedsim.scenario import load_scenario

from ..conftest import run_cli

RECORD = Path("private") / RELEASES_FILE

DP_FEDAVG = """
name = "safety"
seed = 3
rounds = {rounds}
clients-per-round = {per_round}
[data]
dataset = "{dataset}"
{data}
[model]
name = "logreg"
[client]
local-epochs = 1
batch-size = 4
lr = 0.1
[strategy]
name = "dp-fedavg"
noise-multiplier = 1.0
clip-norm = 0.5
[checkpoint]
every = {every}
"""


def _scenario(tmp_path: Path, *, rounds: int = 4, every: int = 0, dataset: str = "digits", data: str = "num-devices = 40",
              per_round: int = 8, name: str = "scenario.toml") -> Path:
    path = tmp_path / name
    path.write_text(DP_FEDAVG.format(rounds=rounds, every=every, dataset=dataset, data=data, per_round=per_round))
    return path


def _sim(scenario: Path, out: Path, key: NoiseKey | None = None) -> Simulation:
    return Simulation(load_scenario(scenario, [(["output-dir"], str(out))]), run_dir=out, progress=False, noise_key=key)


def _reference(scenario: Path, out: Path, of: Path) -> None:
    """Run ``scenario`` uninterrupted into ``out`` with run ``of``'s key and run id (the same noise)."""
    run_id = load_scenario(of / "config.toml").privacy.run_id
    sc = load_scenario(scenario, [(["output-dir"], str(out)), (["privacy", "run-id"], run_id)])
    Simulation(sc, run_dir=out, progress=False, noise_key=NoiseKey.load(of / KEY_FILE)).run()


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


class _Crash(Exception):
    pass


def _crash_after_row(sim: Simulation, rows: int) -> None:
    """Die right after the ``rows``-th row is published (before any later checkpoint)."""
    original = sim.commit

    def commit(row):
        original(row)
        if row["round"] == rows:
            raise _Crash(rows)

    sim.commit = commit  # type: ignore[method-assign]


def _public(run: Path) -> dict[str, bytes]:
    return {name: (run / name).read_bytes() for name in ("metrics.jsonl", "model.pt", "ledger.json") if (run / name).exists()}


def _same_release(a: Path, b: Path) -> None:
    assert torch.equal(torch.load(a / "model.pt")["flat"], torch.load(b / "model.pt")["flat"])
    for name in ("metrics.jsonl", "ledger.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# ----------------------------------------------------------------------------------------------
# the record and what it allows


def test_every_released_round_is_recorded_before_its_row(tmp_path: Path) -> None:
    run = tmp_path / "run"
    sim = _sim(_scenario(tmp_path), run)
    seen = []
    original = sim.commit

    def commit(row):
        # when a row is about to be published, the record already holds every earlier round
        record = ReleaseRecord.open(run / RECORD, sim.noise_source.key)
        seen.append((row["round"], record.released))
        original(row)
        assert ReleaseRecord.open(run / RECORD, sim.noise_source.key).released == row["round"]

    sim.commit = commit  # type: ignore[method-assign]
    sim.run()
    assert seen == [(1, 0), (2, 1), (3, 2), (4, 3)]
    record = ReleaseRecord.open(run / RECORD, NoiseKey.load(run / KEY_FILE))
    assert record.released == 4
    ledger = json.loads((run / "ledger.json").read_text())
    assert [{"round": r, "event": e} for r, e in record.events()] == ledger  # one event per released round
    assert (run / RECORD).stat().st_mode & 0o777 == 0o600 and (run / "private").stat().st_mode & 0o777 == 0o700
    # the key's material is not in the record (only a one-way fingerprint)
    assert NoiseKey.load(run / KEY_FILE)._material.hex() not in (run / RECORD).read_text()


def test_no_checkpoint_resume_replays_under_the_key_and_matches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Checkpoints off (the default): a killed run's --resume re-executes rounds 1.. under its key,
    each checked against its record, and ends bit-identical to the run uninterrupted."""
    scenario = _scenario(tmp_path, rounds=5)
    run = tmp_path / "run"
    sim = _sim(scenario, run)
    _crash_after_row(sim, 3)
    with pytest.raises(_Crash):
        sim.run()
    _reference(scenario, tmp_path / "ref", run)
    code, err = _cli(capsys, "run", "--resume", str(run), "--quiet")
    assert code == 0, err
    assert "rounds 1-3 were released, and each must reproduce what it released" in err
    _same_release(tmp_path / "ref", run)


def test_died_between_checkpoints_and_corrupt_newest_checkpoint_still_match(tmp_path: Path) -> None:
    """every = 2: a run that died after round 5 (checkpoint 4) with checkpoint 4 corrupt falls
    back to checkpoint 2 and re-executes rounds 3-5 below the mark, each verified."""
    scenario = _scenario(tmp_path, rounds=7, every=2)
    run = tmp_path / "run"
    sim = _sim(scenario, run)
    _crash_after_row(sim, 5)
    with pytest.raises(_Crash):
        sim.run()
    _reference(scenario, tmp_path / "ref", run)
    newest = list_checkpoints(run / CHECKPOINT_DIR)[0][1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 1
    newest.write_bytes(bytes(data))
    resumed = Simulation(load_scenario(run / "config.toml"), run_dir=run, progress=False)
    with pytest.warns(CheckpointWarning, match=r"authentication failed \(MAC mismatch"):
        assert resumed.resume() == 2
    resumed.run()
    _same_release(tmp_path / "ref", run)


def test_a_replay_that_does_not_reproduce_its_release_stops_before_publishing(tmp_path: Path) -> None:
    """A change the data fingerprint does not sample (one device's content, counts unchanged, in a
    lazily loaded dataset) alters a re-executed round: the run stops on that round, and neither its
    row nor the model is published again."""
    loader = tmp_path / "lazy.py"
    loader.write_text(
        "import numpy as np\n"
        "from pathlib import Path\n"
        "from fedsim.data import LazyData, DataSpec\n"
        "HERE = Path(__file__).parent\n"
        "def load(seed=0):\n"
        "    rng = np.random.default_rng(0)\n"
        "    xs = rng.normal(size=(40, 6, 5)).astype(np.float32)\n"
        "    ys = rng.integers(0, 3, size=(40, 6))\n"
        "    tx, ty = rng.normal(size=(20, 5)).astype(np.float32), rng.integers(0, 3, size=20)\n"
        "    if (HERE / 'changed').exists():\n"
        "        ys[1] = (ys[1] + 1) % 3  # device 1 (not among the sampled devices): other labels\n"
        "    return LazyData(DataSpec('classification', (5,), 3), 40, lambda d: (xs[d], ys[d]),\n"
        "                    test_x=tx, test_y=ty, num_examples=[6] * 40)\n"
    )
    scenario = _scenario(tmp_path, rounds=4, every=2, dataset=f"{loader}:load", data="", per_round=40)
    run = tmp_path / "run"
    sim = _sim(scenario, run)
    _crash_after_row(sim, 3)
    with pytest.raises(_Crash):
        sim.run()
    before = (run / "metrics.jsonl").read_bytes()
    (tmp_path / "changed").write_text("")
    resumed = Simulation(load_scenario(run / "config.toml"), run_dir=run, progress=False)
    assert resumed.data_fingerprint == data_fingerprint(sim.data)  # the fingerprint does not see it ...
    assert resumed.resume() == 2
    with pytest.raises(ReleaseError, match=r"round 3 was re-executed on resume and does not reproduce what it released"):
        resumed.run()  # ... the record does, before round 3 is published again
    rows = (run / "metrics.jsonl").read_bytes()
    assert before.startswith(rows) and rows.count(b"\n") == 2
    assert not (run / "model.pt").exists() and not (run / "summary.json").exists()


# ----------------------------------------------------------------------------------------------
# point 3: the changed-data attack


def _csv(path: Path, users: range) -> None:
    rng = np.random.default_rng(1)
    lines = ["user_id,split,label," + ",".join(f"f{i}" for i in range(6))]
    for user in users:
        for _ in range(8):
            x = rng.normal(size=6)
            lines.append(f"{user},train,{int(x[0] > 0)}," + ",".join(f"{v:.5f}" for v in x))
    for _ in range(30):
        x = rng.normal(size=6)
        lines.append(f"999,test,{int(x[0] > 0)}," + ",".join(f"{v:.5f}" for v in x))
    path.write_text("\n".join(lines) + "\n")


def test_resume_after_deleting_a_user_from_the_csv_is_refused(tmp_path: Path) -> None:
    """The attack: a DP run on a CSV, one user deleted, ``fedsim run --resume`` (checkpoints off).
    Before: "starting over from round 1" under the same key, a second model.pt that differs from
    the first by one user's clipped update. Now: refused in one line, nothing republished."""
    data = tmp_path / "users.csv"
    _csv(data, range(20))
    scenario = _scenario(tmp_path, rounds=3, dataset=str(data), data="", per_round=10)
    run = tmp_path / "run"
    first = run_cli("run", str(scenario), "--out", str(run), "--quiet")
    assert first.returncode == 0, first.stderr
    published = _public(run)
    lines = data.read_text().splitlines()
    data.write_text("\n".join(line for line in lines if not line.startswith("7,")) + "\n")  # user 7 asks to be deleted

    again = run_cli("run", "--resume", str(run), "--quiet")
    assert again.returncode == 2
    assert again.stderr.count("\n") == 1 and again.stderr.startswith("error: --resume: the data differ"), again.stderr
    assert "number of devices 20 -> 19" in again.stderr and "rounds 1-3 released under this key" in again.stderr
    assert _public(run) == published  # no second view of any round


def test_changed_data_refused_by_the_checkpoint_of_a_run_without_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Non-DP runs keep no release record; their checkpoints hold the data fingerprint."""
    data = tmp_path / "users.csv"
    _csv(data, range(12))
    scenario = _scenario(tmp_path, rounds=2, every=1, dataset=str(data), data="", per_round=6)
    scenario.write_text(scenario.read_text().replace('name = "dp-fedavg"', 'name = "fedavg"')
                        .replace("noise-multiplier = 1.0\n", "").replace("clip-norm = 0.5\n", ""))
    run = tmp_path / "run"
    assert _cli(capsys, "run", str(scenario), "--out", str(run), "--quiet")[0] == 0
    assert not (run / RECORD).exists() and decode(list_checkpoints(run / CHECKPOINT_DIR)[0][1].read_bytes())["data"]
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[:5] + lines[6:]) + "\n")  # one example of user 0 deleted
    code, err = _cli(capsys, "run", "--resume", str(run))
    assert code == 2 and err.count("\n") == 1
    assert "was written on other data (per-device example counts, training data differ)" in err


# ----------------------------------------------------------------------------------------------
# point 7: authenticated checkpoints and keys


def test_swapped_noise_key_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for every in (0, 2):
        run = tmp_path / f"run-{every}"
        scenario = _scenario(tmp_path, rounds=3, every=every, name=f"s{every}.toml")
        assert _cli(capsys, "run", str(scenario), "--out", str(run), "--quiet")[0] == 0
        published = _public(run)
        NoiseKey.generate().save(run / KEY_FILE)  # someone replaces secret/noise.key
        code, err = _cli(capsys, "run", "--resume", str(run), "--quiet")
        assert code == 2 and err.count("\n") == 1, err
        assert f"{run / KEY_FILE} is not the key this run was started with" in err
        assert _public(run) == published


def test_another_run_id_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The run id (public, in config.toml) enters every noise word: a resume under another one
    would add other noise to the released rounds."""
    run = tmp_path / "run"
    assert _cli(capsys, "run", str(_scenario(tmp_path, rounds=2)), "--out", str(run), "--quiet")[0] == 0
    published = _public(run)
    config = run / "config.toml"
    recorded = load_scenario(config).privacy.run_id
    config.write_text(config.read_text().replace(recorded, "0" * 32))
    code, err = _cli(capsys, "run", "--resume", str(run), "--quiet")
    assert code == 2 and err.count("\n") == 1, err
    assert f"is not the one this run was started with ({recorded}" in err
    assert _public(run) == published


def _forge_v1(path: Path, state: dict) -> None:
    """What an attacker without the key can write: an unkeyed checkpoint (SHA-256 recomputed)."""
    path.write_bytes(encode(state))
    assert path.read_bytes().startswith(MAGIC)


def test_forged_checkpoint_with_a_shorter_ledger_is_refused(tmp_path: Path) -> None:
    scenario = _scenario(tmp_path, rounds=6, every=2)
    run = tmp_path / "run"
    sim = _sim(scenario, run)
    sim.run()
    _reference(scenario, tmp_path / "ref", run)
    (run / "summary.json").unlink()
    newest = list_checkpoints(run / CHECKPOINT_DIR)[0][1]
    # the payload is readable (it is not encrypted): keep it, drop half of the privacy ledger
    data = newest.read_bytes()
    head = len(b"FEDSIM-CHECKPOINT-2\n") + 16 + 32 + 8
    import io

    state = torch.load(io.BytesIO(data[head:]), weights_only=True)
    state["ledger"] = state["ledger"][:3]
    _forge_v1(newest, state)
    resumed = Simulation(load_scenario(run / "config.toml"), run_dir=run, progress=False)
    with pytest.warns(CheckpointWarning, match=r"not authenticated \(an unkeyed checksum"):
        assert resumed.resume() == 4  # the forged one is not used
    result = resumed.run()
    assert len(result.ledger) == 6
    _same_release(tmp_path / "ref", run)


def test_a_ledger_without_one_event_per_released_round_is_refused(tmp_path: Path) -> None:
    """Even a checkpoint that authenticates (written with the key) must hold one ledger event per
    released round, the record's."""
    run = tmp_path / "run"
    _sim(_scenario(tmp_path, rounds=4, every=2), run).run()
    auth = CheckpointKey.of(NoiseKey.load(run / KEY_FILE))
    newest = list_checkpoints(run / CHECKPOINT_DIR)[0][1]
    state = decode(newest.read_bytes(), auth)
    state["ledger"] = state["ledger"][:-1]
    newest.write_bytes(encode(state, auth))
    resumed = Simulation(load_scenario(run / "config.toml"), run_dir=run, progress=False)
    with pytest.raises(CheckpointError, match=r"privacy ledger holds 3 events for 4 completed rounds"):
        resumed.resume()
    other = encode(decode(list_checkpoints(run / CHECKPOINT_DIR)[1][1].read_bytes(), auth), auth)
    assert decode(other, auth)["round"] == 2
    with pytest.raises(Exception, match="another noise key"):
        decode(other, CheckpointKey.of(NoiseKey.generate()))


def test_record_cut_back_or_missing_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    scenario = _scenario(tmp_path, rounds=4)
    assert _cli(capsys, "run", str(scenario), "--out", str(run), "--quiet")[0] == 0
    record = run / RECORD
    lines = record.read_bytes().splitlines(keepends=True)
    record.write_bytes(b"".join(lines[:-2]))  # the last two rounds' lines removed (the chain stays valid)
    code, err = _cli(capsys, "run", "--resume", str(run))
    assert code == 2 and err.count("\n") == 1
    assert "metrics.jsonl holds 4 rounds but" in err and "records 2 released" in err
    record.write_bytes(b"".join(lines[:-1]) + lines[-1].replace(b'"round": 4', b'"round": 5'))
    code, err = _cli(capsys, "run", "--resume", str(run))
    assert code == 2 and "line 5 fails its authentication" in err
    record.unlink()
    code, err = _cli(capsys, "run", "--resume", str(run))
    assert code == 2 and err.count("\n") == 1 and "release record is missing, but the run has published rounds" in err


def test_a_torn_last_record_line_is_a_round_never_published(tmp_path: Path) -> None:
    """A crash while appending leaves a line without its newline: that round was not published
    (the row follows the fsync), so the record ignores it and the next append overwrites it."""
    key = NoiseKey.generate()
    path = tmp_path / "private" / RELEASES_FILE
    record = ReleaseRecord.create(path, key, data={"x": 1}, run={"scenario": "t"})
    event = {"type": "matrix_factorization", "params": (0.5, 0.25)}  # tuples read back as lists
    assert record.release(1, "a" * 64, event)
    with open(path, "ab") as fh:
        fh.write(b'{"digest": "bb", "ev')
    again = ReleaseRecord.open(path, key)
    assert again.released == 1
    assert again.release(2, "c" * 64, None)
    assert not again.release(1, "a" * 64, event)  # a replay that reproduces round 1
    again.check_ledger([{"round": 0, "event": event}], 1, source="ckpt")
    with pytest.raises(ReleaseError, match="round 2 was re-executed"):
        again.release(2, "d" * 64, None)
    final = ReleaseRecord.open(path, key)
    assert final.released == 2 and final.recorded(2).digest == "c" * 64
    assert os.path.getsize(path) == len(path.read_bytes()) and path.read_bytes().endswith(b"\n")


# ----------------------------------------------------------------------------------------------
# starting a new run: the abandoned run's rho counts


def test_prior_runs_add_their_released_rho_to_the_new_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "old"
    assert _cli(capsys, "run", str(_scenario(tmp_path, rounds=3)), "--out", str(old), "--quiet")[0] == 0
    old_rho = json.loads((old / "summary.json").read_text())["rho"]
    new = tmp_path / "new"
    code, err = _cli(capsys, "run", str(_scenario(tmp_path, rounds=2)), "--out", str(new), "--quiet",
                     "--set", f"privacy.prior-runs=['{old}']")
    assert code == 0, err
    summary = json.loads((new / "summary.json").read_text())
    assert summary["prior"]["runs"] == [str(old)] and summary["prior"]["rounds"] == 3
    assert summary["prior"]["rho"] == pytest.approx(old_rho)
    assert summary["rho"] == pytest.approx(old_rho + summary["prior"]["rho_this_run"])
    rows = [json.loads(line) for line in (new / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["rho"] == pytest.approx(summary["rho"])
    assert NoiseKey.load(new / KEY_FILE) != NoiseKey.load(old / KEY_FILE)  # a new run: a new key
    # a directory without a release record is refused, naming it
    code, err = _cli(capsys, "run", str(_scenario(tmp_path, rounds=2)), "--out", str(tmp_path / "third"), "--quiet",
                     "--set", f"privacy.prior-runs=['{tmp_path}']")
    last = err.strip().splitlines()[-1]  # after the run's notes (noise multiplier, sampling): one error line
    assert code == 2 and err.count("error:") == 1 and last.startswith("error: [privacy] prior-runs: ")
    assert f"prior-runs: {tmp_path}: no release record" in last
