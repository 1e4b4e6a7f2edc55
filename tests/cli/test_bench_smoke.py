"""A tiny real run of the benchmark (subprocess workers, memory sampling, report), and its pieces.

The benchmark's speed targets are checked by ``python scripts/bench.py`` itself, never here.
"""

from __future__ import annotations

import json
import subprocess
import sys

from fedsim_bench import (
    BenchOptions,
    flops_per_update,
    format_report,
    layer_dims,
    round_seconds,
    run_benchmark,
)

from ..conftest import ROOT


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


def test_tiny_benchmark_run_reports_every_column() -> None:
    opts = BenchOptions(
        clients=12, fedsim_rounds=2, models=("mlp",), flower_models=(), dp_clients=(40,), dp_population=400,
        dp_rounds=1, noise_rounds=1, train_repeats=1,
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
    (dp,) = report["dp_ftrl"]
    assert dp["clients"] == [40] and dp["noise_params"] == 1_300_000 and dp["noise_s_per_round"] > 0
    assert dp["noise_kernel"] == "compiled" and dp["gaussian_noise_numpy_s"] > 0 and dp["gaussian_noise_s"] > 0
    names = [t["target"] for t in report["targets"]]
    assert "mlp: fedsim / naive loop" in names and "mlp: fedsim training / FLOP bound" in names
    (noise,) = [t for t in report["targets"] if t["target"].startswith("noise:")]
    assert noise["at_most"] and noise["unit"] == "ms" and noise["value"] == 1e3 * dp["gaussian_noise_s"]
    assert noise["met"] == (noise["value"] <= 25.0)
    text = format_report(report)
    for column in ("fedsim", "naive loop", "Flower", "FLOP bound", "vs naive"):
        assert column in text
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
