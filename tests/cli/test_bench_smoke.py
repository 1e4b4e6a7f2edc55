"""A tiny real run of the benchmark (subprocess workers, memory sampling, report), and its pieces.

The benchmark's speed targets are checked by ``python scripts/bench.py`` itself, never here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedsim_bench import (
    BenchOptions,
    flops_per_update,
    format_report,
    layer_dims,
    pflpeer,
    round_seconds,
    run_benchmark,
)

from ..conftest import ROOT

#: the Gboard-scale round on the fixture plays (no package needed), a vocabulary they hold
FIXTURE_PLAYS = {"path": str(ROOT / "tests" / "fixtures" / "shakespeare"), "vocab-size": 200, "min-lines": 2}


def test_flops_per_update_hand_counted() -> None:
    # logreg 784x10, 64 examples in 4 batches of 16: forward + weight gradient per batch
    assert flops_per_update(layer_dims("logreg"), 64, 16, 1) == 4 * (2 * 16 * 784 * 10 * 2)
    # mlp: the second layer also needs its input gradient
    assert flops_per_update(layer_dims("mlp"), 64, 16, 1) == 4 * (2 * 16 * 784 * 128 * 2 + 2 * 16 * 128 * 10 * 3)
    # a short last batch counts its own rows; epochs multiply
    assert flops_per_update([(5, 3)], 20, 16, 2) == 2 * ((2 * 16 * 5 * 3 * 2) + (2 * 4 * 5 * 3 * 2))


def test_round_seconds_pairs_start_and_end_marks() -> None:
    marks = [("start", 0, 1.0), ("end", 0, 3.5), ("start", 1, 4.0), ("end", 1, 4.25), ("start", 2, 9.0)]
    assert round_seconds(marks) == [2.5, 0.25]


def test_tiny_benchmark_run_reports_every_column(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # no pfl-research environment: the column is skipped with the install line
    monkeypatch.setenv("FEDSIM_PFL_PYTHON", str(tmp_path / "no-such-python"))
    opts = BenchOptions(
        clients=12, fedsim_rounds=2, models=("mlp",), flower_models=(), dp_clients=(40,), dp_population=400,
        dp_rounds=1, noise_rounds=1, train_repeats=1, dp_data=FIXTURE_PLAYS,
    )
    report = run_benchmark(opts, quiet=True)
    json.dumps(report)  # what --json prints
    (row,) = report["scenarios"]
    assert row["name"] == "mlp"
    for key in ("fedsim_updates_per_s", "naive_updates_per_s", "flop_bound_updates_per_s", "peak_rss_mb"):
        assert row[key] is not None and row[key] > 0, key
    assert row["flower_updates_per_s"] is None and "flower" in row["errors"]
    assert row["fedsim_training_updates_per_s"] > 0 and row["naive_peak_rss_mb"] > 50
    assert report["matmul_gflops"] > 0.1
    assert row["pfl_updates_per_s"] is None and row["pfl_updates_per_s_by_processes"] == {}
    assert "install:" in row["errors"]["pfl"] and "'pfl[pytorch]==0.6.0'" in row["errors"]["pfl"]
    (dp,) = report["dp_ftrl"]
    assert dp["clients"] == [40] and dp["noise_params"] == 1_300_000 and dp["noise_s_per_round"] > 0
    # the Gboard-scale round runs the showcase's word LSTM (here on the fixture plays' vocabulary)
    assert dp["trainer"]["path"] == "loop" and dp["local_model_params"] > 10_000
    assert 0 < dp["training_s"] <= dp["round_s"] and abs(dp["training_s"] + dp["server_s"] - dp["round_s"]) < 1e-9
    assert dp["flops_per_update"] > 1e6 and dp["flop_bound_round_s"] > 0 and dp["examples_per_client"] > 0
    assert dp["gboard_run_rounds"] == 2000 and dp["gboard_run_hours"] == 2000 * dp["round_s"] / 3600
    assert dp["noise_kernel"] == "compiled" and dp["gaussian_noise_numpy_s"] > 0 and dp["gaussian_noise_s"] > 0
    names = [t["target"] for t in report["targets"]]
    assert "mlp: fedsim / naive loop" in names and "mlp: fedsim training / FLOP bound" in names
    (noise,) = [t for t in report["targets"] if t["target"].startswith("noise:")]
    assert noise["at_most"] and noise["unit"] == "ms" and noise["value"] == 1e3 * dp["gaussian_noise_s"]
    assert noise["met"] == (noise["value"] <= 25.0)
    text = format_report(report)
    for column in ("fedsim", "naive loop", "Flower", "pfl", "FLOP bound", "vs naive", "vs pfl"):
        assert column in text
    assert "Gboard-scale DP-FTRL round: the showcase's word LSTM" in text
    assert text.count("pfl-research column: skipped: no pfl-research environment") == 1
    # without --targets: comparisons only, no verdicts on the project's own goals
    for verdict in ("target", "goal", " met", "NOT MET", "not measured"):
        assert verdict not in text, verdict
    with_targets = format_report(report, targets=True)
    assert "project targets" in with_targets and "mlp: fedsim / naive loop" in with_targets
    assert "(goal >= 5x)" in with_targets and ("met" in with_targets)
    assert "(goal <= 25 ms)" in with_targets


def test_targets_flag_is_off_by_default() -> None:
    from fedsim_bench import build_parser

    assert build_parser().parse_args([]).targets is False
    assert build_parser().parse_args(["--targets"]).targets is True


def test_bad_arguments_are_one_line_errors() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--threads", "zero"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: argument --threads: expected a positive integer, got 'zero'"]


def test_pfl_python_that_does_not_exist_is_a_one_line_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--pfl-python", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: --pfl-python: no such file: {tmp_path / 'nope'}"]


def test_replicated_population_is_the_showcase_devices_repeated() -> None:
    from fedsim_bench.gboard import load

    data = load(num_devices=50, level="word", vocab_size=200, seq_length=12, min_lines=2, path=FIXTURE_PLAYS["path"])
    inner = data.inner
    assert data.num_devices == 50 and inner.num_devices < 50 and data.spec == inner.spec
    for dev in (0, inner.num_devices - 1, inner.num_devices, 49):
        x, y = data.client_data(dev)
        ix, iy = inner.client_data(dev % inner.num_devices)
        assert torch.equal(x, ix) and torch.equal(y, iy)
        assert data.num_examples(dev) == inner.num_examples(dev % inner.num_devices)
    with pytest.raises(IndexError):
        data.client_data(50)


@pytest.mark.skipif(pflpeer.pfl_python() is None, reason="no pfl-research environment ($FEDSIM_PFL_PYTHON or .venv-pfl)")
def test_pfl_trains_the_exported_cohort_in_one_and_two_processes(tmp_path: Path) -> None:
    out = pflpeer.measure_pfl(pflpeer.pfl_python(), {"name": "logreg", "clients": 6}, rounds=2, processes=(1, 2),
                              workdir=tmp_path)
    assert out["error"] is None, out["error"]
    assert set(out["pfl_updates_per_s_by_processes"]) == {"1", "2"}
    assert out["pfl_updates_per_s"] == max(out["pfl_updates_per_s_by_processes"].values()) > 0
    assert all(len(rounds) == 2 for rounds in out["pfl_round_s"].values())
    assert not list(tmp_path.iterdir())  # the exported cohort is removed


def test_exported_cohort_is_fedsims_model_loss_and_data(tmp_path: Path) -> None:
    """The exported cohort is fedsim's: its model with the run's initial parameters, its loss and data."""
    from fedsim.models import get_flat

    spec = {"name": "logreg", "clients": 4}
    sim = pflpeer.simulation_for(spec)
    path = pflpeer.export(sim, 4, tmp_path / "cohort.pt")
    cohort = torch.load(path, weights_only=False)
    assert torch.equal(get_flat(cohort["model"]), sim.params)
    assert (cohort["lr"], cohort["batch"], cohort["epochs"]) == (sim.base_config.lr, sim.base_config.batch_size, 1)
    for dev, (x, y) in enumerate(cohort["clients"]):
        sx, sy = sim.data.client_data(dev)
        assert torch.equal(x, sx) and torch.equal(y, sy)
    x, y = cohort["clients"][0]
    assert torch.isclose(cohort["objective"].loss(cohort["model"](x), y), torch.nn.functional.cross_entropy(cohort["model"](x), y))
