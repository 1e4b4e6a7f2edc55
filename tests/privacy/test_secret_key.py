"""A DP run's noise key is secret: absent from every public file, fresh per run, needed to resume.

And nothing exact and unaccounted is published: train loss and counts are null in the public run
log (exact values in ``private/``), cohorts are drawn from the key, not the public seed.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch

from fedsim import seeds
from fedsim.engine.checkpoint import CheckpointKey, decode, encode, list_checkpoints
from fedsim.engine.simulation import Simulation, run_scenario
from fedsim.privacy import csprng
from fedsim.privacy.noise import KEY_FILE, NoiseKey
from fedsim.scenario import load_scenario, scenario_from_dict

from ..conftest import run_cli

PUBLIC = ("config.toml", "metrics.jsonl", "summary.json", "ledger.json", "model.pt", "metrics.png")


def _raw(strategy: dict, **extra) -> dict:
    raw = {
        "name": "secret",
        "rounds": 4,
        "clients-per-round": 8,
        "data": {"num-devices": 40},
        "model": {"name": "logreg"},
        "strategy": strategy,
        "checkpoint": {"every": 2},
    }
    raw.update(extra)
    return raw


FTRL = {"name": "dp-ftrl", "noise-multiplier": 1.0, "clip-norm": 0.5, "max-participations": 2, "min-separation": 1}
POISSON = {"name": "dp-fedavg", "noise-multiplier": 1.0, "clip-norm": 0.5, "sampling": "poisson"}


def _flat(run: Path) -> torch.Tensor:
    return torch.load(run / "model.pt")["flat"]


def test_fresh_runs_draw_different_secret_keys_kept_owner_only(tmp_path: Path) -> None:
    sc = scenario_from_dict(_raw(FTRL))
    a, b = tmp_path / "a", tmp_path / "b"
    run_scenario(sc, run_dir=a)
    run_scenario(sc, run_dir=b)
    ka, kb = NoiseKey.load(a / KEY_FILE), NoiseKey.load(b / KEY_FILE)
    assert ka != kb and ka.bits >= 128
    assert not torch.equal(_flat(a), _flat(b))  # same scenario and seed, different noise
    for run in (a, b):
        assert stat.S_IMODE((run / KEY_FILE).stat().st_mode) == 0o600
        assert stat.S_IMODE((run / KEY_FILE).parent.stat().st_mode) == 0o700
        assert stat.S_IMODE((run / "checkpoints").stat().st_mode) == 0o700
        summary = json.loads((run / "summary.json").read_text())
        assert summary["noise_key"] == {"kind": "secret", "file": "secret/noise.key"}


def test_key_appears_in_no_public_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_scenario(scenario_from_dict(_raw(FTRL)), run_dir=run)
    key = NoiseKey.load(run / KEY_FILE)
    material = key._material
    needles = [material, material.hex().encode(), material.hex().upper().encode()]
    for path in run.rglob("*"):
        if path.is_file() and KEY_FILE.parts[0] not in path.relative_to(run).parts:
            data = path.read_bytes()
            assert not any(n in data for n in needles), path
    assert all((run / name).exists() for name in PUBLIC)


def test_noise_is_not_regenerated_from_public_files(tmp_path: Path) -> None:
    """The run's noise is that of its secret key, not of any key derivable from the public seed."""
    sc = scenario_from_dict(_raw(FTRL, rounds=1, checkpoint={"every": 0}))
    run = tmp_path / "run"
    run_scenario(sc, run_dir=run)
    recorded = load_scenario(run / "config.toml")  # the resolved scenario holds the public run id
    replay = run_scenario(recorded, noise_key=NoiseKey.load(run / KEY_FILE))
    assert torch.equal(replay.params, _flat(run))  # the key and the run id determine the noise ...
    for public in (sc.seed, seeds.derived_seed(sc.seed, seeds.STREAM_NOISE)):
        guess = run_scenario(recorded, noise_key=NoiseKey.from_seed(public))
        assert not torch.equal(guess.params, _flat(run))  # ... and the public seed does not


def test_resume_without_the_key_refuses_with_a_clear_error(tmp_path: Path) -> None:
    run = tmp_path / "run"
    sc = scenario_from_dict(_raw(FTRL, **{"output-dir": str(run)}))
    run_scenario(sc, run_dir=run)
    (run / KEY_FILE).unlink()
    proc = run_cli("run", "--resume", str(run), "--quiet")
    assert proc.returncode == 2
    assert "noise.key" in proc.stderr and "cannot resume" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_resume_with_the_key_replays_the_same_noise(tmp_path: Path) -> None:
    run = tmp_path / "run"
    sc = scenario_from_dict(_raw(FTRL, **{"output-dir": str(run)}))
    run_scenario(sc, run_dir=run)
    before = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "ledger.json")}
    flat = _flat(run)
    proc = run_cli("run", "--resume", str(run), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(_flat(run), flat)
    assert all((run / name).read_bytes() == data for name, data in before.items())


def test_resume_refuses_a_checkpoint_of_another_noise_generator(tmp_path: Path) -> None:
    """Another generator would add other noise to the resumed rounds: a second noisy view."""
    run = tmp_path / "run"
    sc = scenario_from_dict(_raw(FTRL, rounds=2, checkpoint={"every": 1}, **{"output-dir": str(run)}))
    run_scenario(sc, run_dir=run)
    auth = CheckpointKey.of(NoiseKey.load(run / KEY_FILE))  # as if the older version had signed them
    for _, path in list_checkpoints(run / "checkpoints"):
        state = decode(path.read_bytes(), auth)
        assert state["noise"] == csprng.GENERATOR
        state["noise"] = "fedsim-noise-v1"
        path.write_bytes(encode(state, auth))
    proc = run_cli("run", "--resume", str(run), "--quiet")
    assert proc.returncode == 2
    assert "noise generator fedsim-noise-v1" in proc.stderr and csprng.GENERATOR in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_fixed_key_file_for_reproducible_research(tmp_path: Path) -> None:
    key_file = tmp_path / "research.key"
    NoiseKey.generate().save(key_file)
    sc = scenario_from_dict(_raw(FTRL, privacy={"noise-key-file": str(key_file)}))
    a, b = tmp_path / "a", tmp_path / "b"
    run_scenario(sc, run_dir=a)
    # an exact replay needs the key file and the run's public run id, both in its config.toml
    run_scenario(load_scenario(a / "config.toml"), run_dir=b)
    assert torch.equal(_flat(a), _flat(b))
    assert (a / "metrics.jsonl").read_bytes() == (b / "metrics.jsonl").read_bytes()
    assert not (a / KEY_FILE).exists()  # the key stays where the scenario keeps it
    summary = json.loads((a / "summary.json").read_text())
    assert summary["noise_key"] == {"kind": "fixed", "file": str(key_file)}
    assert summary["run_id"] == load_scenario(a / "config.toml").privacy.run_id
    assert json.loads((b / "summary.json").read_text())["run_id"] == summary["run_id"]
    # a missing key file is one line naming the key, exit code 2, nothing run
    scenario = tmp_path / "s.toml"
    scenario.write_text(
        'name = "s"\nrounds = 2\nclients-per-round = 4\n[data]\nnum-devices = 20\n[model]\nname = "logreg"\n'
        '[strategy]\nname = "dp-ftrl"\n[privacy]\nnoise-key-file = "missing.key"\n'
    )
    proc = run_cli("run", str(scenario), "--out", str(tmp_path / "m"), "--quiet")
    assert proc.returncode == 2 and "noise-key-file" in proc.stderr and "not found" in proc.stderr
    assert not (tmp_path / "m" / "metrics.jsonl").exists()


@pytest.mark.parametrize("strategy", [FTRL, POISSON], ids=["dp-ftrl", "dp-fedavg-poisson"])
def test_no_public_file_holds_exact_train_loss_or_counts(tmp_path: Path, strategy: dict) -> None:
    run = tmp_path / "run"
    result = run_scenario(scenario_from_dict(_raw(strategy)), run_dir=run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for row in rows:
        assert {"train_loss", "clients", "eligible", "rejected"} <= set(row)  # keys kept ...
        assert all(row[k] is None for k in ("train_loss", "clients", "eligible", "rejected"))  # ... null
        assert row["accuracy"] is not None and row["rho"] is not None  # post-processing / accounting
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rejected"] is None
    private = [json.loads(line) for line in (run / "private" / "diagnostics.jsonl").read_text().splitlines()]
    assert [p["round"] for p in private] == [1, 2, 3, 4]
    assert all(p["clients"] >= 0 and p["eligible"] > 0 for p in private)
    assert any(p["train_loss"] is not None for p in private)
    assert result.diagnostics == private
    assert stat.S_IMODE((run / "private").stat().st_mode) == 0o700
    # a non-DP run publishes them as before
    fedavg = run_scenario(scenario_from_dict(_raw({"name": "fedavg"})), run_dir=tmp_path / "plain")
    assert all(m["clients"] == 8 and m["train_loss"] is not None for m in fedavg.metrics)
    assert not (tmp_path / "plain" / "private").exists() and not (tmp_path / "plain" / KEY_FILE).exists()


def test_poisson_cohorts_come_from_the_key_not_the_public_seed() -> None:
    sc = scenario_from_dict(_raw(POISSON, rounds=8, checkpoint={"every": 0}))
    sizes = [[row["clients"] for row in Simulation(sc, progress=False).run().diagnostics] for _ in range(2)]
    assert sizes[0] != sizes[1]  # same seed, fresh keys: different cohorts
    key = NoiseKey.generate()
    fixed = scenario_from_dict(_raw(POISSON, rounds=8, checkpoint={"every": 0}, privacy={"run-id": "ab" * 16}))
    same = [[row["clients"] for row in run_scenario(fixed, noise_key=key).diagnostics] for _ in range(2)]
    assert same[0] == same[1]  # the key and the run id alone determine them
    runs = [[row["clients"] for row in run_scenario(sc, noise_key=key).diagnostics] for _ in range(3)]
    assert len({tuple(r) for r in runs}) > 1  # one key, fresh run ids: other cohorts


def test_two_runs_under_one_fixed_key_draw_independent_noise(tmp_path: Path) -> None:
    """The shared-key attack: two runs of a sweep under one key file that drew the same noise would
    publish two models whose difference is the difference of their exact sums (noise cancelled)."""
    key_file = tmp_path / "sweep.key"
    NoiseKey.generate().save(key_file)
    z, clip, per_round = 20.0, 0.5, 8
    strategy = {**FTRL, "noise-multiplier": z, "clip-norm": clip}
    flats = []
    for lr in (0.1, 0.05):  # two points of a sweep: same data and key, other client lr
        sc = scenario_from_dict(
            _raw(strategy, rounds=1, checkpoint={"every": 0}, client={"lr": lr}, privacy={"noise-key-file": str(key_file)})
        )
        run = tmp_path / f"lr{lr}"
        run_scenario(sc, run_dir=run)
        flats.append(_flat(run))
    gap = float((flats[0] - flats[1]).norm())
    # shared noise: |gap| <= 2 C (the clipped averages differ by at most 2C); independent noise:
    # gap ~ sqrt(2 P) z C / n, here ~ 20x larger
    noise_norm = (2 * flats[0].numel()) ** 0.5 * z * clip / per_round
    assert gap > 0.5 * noise_norm > 10 * 2 * clip
