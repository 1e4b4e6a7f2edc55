"""Plots read honestly: one point is a visible marker on a 0..last-round axis, DP-FTRL's rho steps
are marked, and a sweep draws one line per method across rho with readable labels and plain ticks."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from fedsim.engine.rundir import metrics_figure, rho_steps
from fedsim.privacy.accountant import dp_ftrl_privacy
from fedsim.sweep import (
    Configuration,
    method_groups,
    plan_sweep,
    readable_label,
    run_sweep,
    sweep_figures,
)

TINY = """
name = "tiny"
rounds = 3
clients-per-round = 5

[data]
dataset = "synthetic"
num-devices = 20
examples-per-device = 8
num-features = 5
num-classes = 3

[model]
name = "logreg"

[strategy]
name = "dp-ftrl"
target-rho = 1.0
clip-norm = 0.5
max-participations = 2
min-separation = 1
"""


def _row(r: int, accuracy: float | None, rho: float | None = None) -> dict:
    return {"round": r, "accuracy": accuracy, "loss": None if accuracy is None else 1 - accuracy, "rho": rho}


def test_one_evaluated_point_is_a_marker_on_an_axis_from_round_zero() -> None:
    rows = [_row(r, None) for r in range(1, 10)] + [_row(10, 0.83)]  # --rounds 10, eval-every 10
    fig = metrics_figure(rows, "one point")
    try:
        for ax in fig.axes[:2]:
            (line,) = ax.lines
            assert list(line.get_xdata()) == [10] and line.get_marker() == "o"
            lo, hi = ax.get_xlim()
            assert lo == 0 and 10 < hi <= 11
            assert all(float(t).is_integer() for t in ax.get_xticks())
    finally:
        plt.close(fig)


def test_dp_ftrls_rho_steps_are_found_where_the_tree_gains_a_level_and_marked() -> None:
    rounds = list(range(1, 41))
    rhos = [dp_ftrl_privacy(2.0, t, 4, 3, 1e-6).rho for t in rounds]
    steps = rho_steps(rounds, rhos)
    assert {16, 32} <= set(steps) and all(s & (s - 1) == 0 for s in steps)  # powers of two only
    assert rho_steps(rounds, [0.01 * t for t in rounds]) == []  # an even curve has none
    fig = metrics_figure([_row(t, 0.5, rho) for t, rho in zip(rounds, rhos, strict=True)], "steps")
    try:
        rho_ax = fig.axes[2]
        assert sorted(line.get_xdata()[0] for line in rho_ax.lines[1:]) == sorted(steps)
        assert "a new tree level" in rho_ax.get_legend().get_texts()[0].get_text()
    finally:
        plt.close(fig)


def test_readable_labels_and_method_groups() -> None:
    assert readable_label({"strategy.name": "dp-ftrl", "strategy.target-rho": 0.81}) == "dp-ftrl, target-rho 0.81"
    assert readable_label({"client.lr": 0.05, "strategy.name": "fedavg"}) == "fedavg, lr 0.05"
    assert readable_label({}) == "base"
    configs = {
        n: Configuration(n, o, n) for n, o in [
            ("a", {"strategy.name": "fedavg"}),
            ("b", {"strategy.name": "dp-ftrl", "strategy.target-rho": 0.5}),
            ("c", {"strategy.name": "dp-ftrl", "strategy.target-rho": 2.0}),
        ]
    }
    groups = method_groups([{"name": n} for n in configs], configs)
    assert {k: [r["name"] for r in v] for k, v in groups.items()} == {"fedavg": ["a"], "dp-ftrl": ["b", "c"]}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("sweep")
    (tmp / "tiny.toml").write_text(TINY)
    configs = [
        Configuration(f"strategy.name={n}, strategy.target-rho={r}", {"strategy.name": n, "strategy.target-rho": r})
        for n in ("fedavg", "dp-ftrl") for r in (0.5, 2.0)
    ]
    specs = plan_sweep(tmp / "tiny.toml", configs, seeds=1, out=tmp / "out")
    return run_sweep(specs, tmp / "out", workers=1, progress=False)


def test_the_sweeps_rho_plot_has_one_line_per_method_and_plain_ticks(sweep) -> None:
    by_round, by_rho = sweep_figures(sweep)
    try:
        ax = by_rho.axes[0]
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == ["fedavg (no DP)", "dp-ftrl"]
        (dp,) = [line for line in ax.lines if line.get_label() == "dp-ftrl"]
        assert list(dp.get_xdata()) == pytest.approx([0.5, 2.0])  # one line across rho
        assert dp.get_linestyle() == "-"
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        assert ticks == ["0.5", "2"]
        assert not any(t.get_text() for t in ax.get_xticklabels(minor=True))
        round_labels = [t.get_text() for t in by_round.axes[0].get_legend().get_texts()]
        assert round_labels == ["fedavg", "dp-ftrl, target-rho 0.5", "dp-ftrl, target-rho 2"]
        assert by_round.axes[0].get_xlim()[0] == 0
    finally:
        plt.close(by_round)
        plt.close(by_rho)
    assert (Path(sweep.out) / "accuracy_vs_rho.png").stat().st_size > 0
