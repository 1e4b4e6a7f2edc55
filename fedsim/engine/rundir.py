"""The run directory: a stable, documented layout that scripts can rely on.

==================  ========================================================================
file                content
==================  ========================================================================
``config.toml``     the resolved scenario (every default filled in, overrides applied)
``metrics.jsonl``   one JSON object per completed round (keys in :data:`METRIC_KEYS`)
``summary.json``    final ``accuracy``, ``loss``, ``rounds``, ``wall_time_s``, privacy figures,
                    rejected updates by reason, why the run stopped
``ledger.json``     the privacy ledger: one event per round that released a noisy aggregate
``model.pt``        the final model: ``{"state_dict", "model", "num_features", "num_classes",
                    "flat"}`` (``torch.load``)
``metrics.png``     accuracy and loss (and rho, for DP runs) against round
==================  ========================================================================

``metrics.jsonl`` holds only values determined by the scenario and seed (no timings), so the same
scenario and seed give a byte-identical file.

A run never replaces an earlier one silently: :func:`claim_run_dir` (called by ``fedsim run``
before anything runs) refuses a directory that already holds a run unless the user asked for
``--overwrite`` (or continues it with ``--resume``).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from fedsim.atomic import atomic_write_text
from fedsim.errors import FedsimError

#: Files that mark a directory as a fedsim run directory (any one of them).
RUN_FILES = ("config.toml", "metrics.jsonl", "summary.json", "model.pt", "ledger.json", "checkpoints")


class RunDirExists(FedsimError):
    """The run directory already holds a run (or other files) and ``--overwrite`` was not given."""


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding (part of) a fedsim run."""
    path = Path(path)
    return path.is_dir() and any((path / name).exists() for name in RUN_FILES)


def claim_run_dir(path: str | Path, *, overwrite: bool = False) -> Path:
    """Make sure a new run may write to ``path``; return it.

    A missing or empty directory is fine. A directory that holds a run is refused with a
    :class:`RunDirExists` naming the choices (another ``--out``, ``--overwrite``, ``--resume``),
    unless ``overwrite``: then the earlier run's directory is removed (the caller says so on
    screen). A non-empty directory that is not a run directory (or the working directory, or one
    of its parents) is never removed, ``overwrite`` or not.

    Parameters
    ----------
    path:
        The run directory the scenario (or ``--out``) names.
    overwrite:
        Replace an earlier run in ``path``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirExists(f"{path} exists and is not a directory; choose another --out DIR")
    if not path.exists() or not any(path.iterdir()):
        return path
    if not is_run_dir(path):
        raise RunDirExists(
            f"{path} is not empty and holds no fedsim run; choose another --out DIR "
            "(fedsim only replaces its own run directories)"
        )
    if not overwrite:
        finished = (path / "summary.json").exists()
        what = "a finished run" if finished else "an unfinished run"
        choices = f"{path} already holds {what}; choose another --out DIR or pass --overwrite to replace it"
        # --resume only where there is something to resume: an unfinished run with a checkpoint
        if not finished and any((path / "checkpoints").glob("ckpt-*.pt")):
            raise RunDirExists(f"{choices}, or --resume {path} to continue it from its checkpoints")
        if not finished:
            choices += " (it has no checkpoint to resume from)"
        raise RunDirExists(choices)
    here = Path.cwd().resolve()
    target = path.resolve()
    if target == here or target in here.parents or target == Path.home().resolve():
        raise RunDirExists(f"--overwrite: refusing to remove {path} (the working directory, a parent or home)")
    shutil.rmtree(target)
    return path

#: Keys present in every ``metrics.jsonl`` line (values may be ``null``).
METRIC_KEYS = (
    "round",
    "accuracy",
    "loss",
    "train_loss",
    "clients",
    "eligible",
    "rejected",
    "rho",
    "epsilon",
    "epsilon_rdp",
    "delta",
)


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value



def metrics_line(row: dict[str, Any]) -> str:
    """The ``metrics.jsonl`` line of a round's row (without the newline): what the round publishes."""
    return json.dumps(_clean(row), sort_keys=False)


class RunDir:
    """Writer for one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_config(self, config: dict[str, Any]) -> None:
        import tomli_w

        atomic_write_text(self.path / "config.toml", tomli_w.dumps(config))

    def reset_metrics(self) -> None:
        self.metrics_path.write_text("", encoding="utf-8")

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(metrics_line(row) + "\n")
            fh.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text(encoding="utf-8").splitlines() if line]

    def write_json(self, name: str, data: Any) -> None:
        atomic_write_text(self.path / name, json.dumps(_clean(data), indent=2) + "\n")

    def plot(self, rows: list[dict[str, Any]], title: str, audit: dict[str, Any] | None = None) -> Path:
        """Write ``metrics.png`` (:func:`metrics_figure`)."""
        import matplotlib.pyplot as plt

        fig = metrics_figure(rows, title, audit)
        out = self.path / "metrics.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out


def metrics_figure(rows: list[dict[str, Any]], title: str, audit: dict[str, Any] | None = None) -> Any:
    """The figure of ``metrics.png``: accuracy and loss (and rho when present) against round.

    The x axis runs from round 0 to the last round with integer ticks, and a series of few
    points has markers (a 10-round run evaluated every 10 rounds is one visible point at 10, not
    a line on a 9.6-10.4 axis). Where rho steps up (:func:`rho_steps`: DP-FTRL's tree gains a
    level at rounds 16, 32, 64, ...) the rho panel marks the round. Audited runs get a fourth
    panel: formal epsilon and the empirical estimate per round, and the final estimate's
    interval (``audit``: ``summary.json["audit"]``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    has_rho = any(r.get("rho") is not None for r in rows)
    has_audit = any(r.get("audit_epsilon") is not None for r in rows)
    # [privacy] equivalent-cohort: the deployment's rho gets its own panel, never the run's axis
    has_equivalent = any(r.get("equivalent_rho") is not None for r in rows)
    ncols = 2 + has_rho + has_equivalent + has_audit
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 3.4), constrained_layout=True)
    series = [("accuracy", "test accuracy"), ("loss", "test loss")]
    if has_rho:
        series.append(("rho", "rho (zCDP) of this run" if has_equivalent else "rho (zCDP)"))
    if has_equivalent:
        series.append(("equivalent_rho", "deployment-equivalent rho (zCDP)\n(the configuration, not this run)"))
    if has_audit:
        _plot_epsilons(axes[-1], rows, audit)
    last = max(rounds, default=1)
    for ax, (key, label) in zip(axes, series, strict=False):
        pts = [(x, r[key]) for x, r in zip(rounds, rows, strict=True) if r.get(key) is not None]
        if pts:
            xs, ys = zip(*pts, strict=True)
            # few points (evaluation every N rounds, a short run) get visible markers
            marker = "o" if len(xs) <= 12 else ("." if len(xs) < 60 else None)
            ax.plot(xs, ys, marker=marker, markersize=4)
            if key in ("rho", "equivalent_rho"):
                _mark_rho_steps(ax, xs, ys)
        _round_axis(ax, last)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return fig


def _round_axis(ax: Any, last: int) -> None:
    """x axis from round 0 to the last round, integer ticks: one point is not a 9.6-10.4 axis."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlim(0, last + max(0.5, 0.02 * last))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")


def rho_steps(rounds: list[int] | tuple[int, ...], rhos: list[float] | tuple[float, ...]) -> list[int]:
    """Rounds where ``rho`` grows by clearly more than its usual per-round step.

    DP-FTRL with tree aggregation: when the round count reaches a power of two the tree gains a
    level, one contribution touches one more noisy node and the run's sensitivity (hence its
    rho) steps up there (rounds 16, 32, 64, ...). Steps: increments above 1.5 times the median
    increment (none for a curve that grows evenly).
    """
    steps = [(r, b - a) for r, a, b in zip(rounds[1:], rhos, rhos[1:], strict=False)]
    grow = sorted(d for _, d in steps if d > 0)
    if len(grow) < 3:
        return []
    median = grow[len(grow) // 2]
    return [r for r, d in steps if d > 1.5 * median and d > 1e-12]


def _mark_rho_steps(ax: Any, rounds: tuple[int, ...], rhos: tuple[float, ...]) -> None:
    steps = rho_steps(rounds, rhos)
    for i, r in enumerate(steps):
        ax.axvline(r, color="0.6", ls=":", lw=0.9, label="rho steps up (DP-FTRL: a new tree level)" if i == 0 else None)
        ax.annotate(str(r), (r, rhos[rounds.index(r)]), textcoords="offset points", xytext=(3, -10), fontsize=7,
                    color="0.35")
    if steps:
        ax.legend(fontsize=7, loc="upper left")


def _plot_epsilons(ax: Any, rows: list[dict[str, Any]], audit: dict[str, Any] | None) -> None:
    """Formal vs empirical epsilon against round (the audit panel of ``metrics.png``)."""
    for key, label in (("epsilon", "formal epsilon"), ("audit_epsilon", "empirical epsilon")):
        pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None and math.isfinite(r[key])]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, label=label)
    if audit is not None:
        lo, hi = audit["ci"]
        last = rows[-1]["round"]
        if math.isfinite(audit["epsilon"]) and math.isfinite(hi):
            # the estimate can lie outside its interval (estimate clipped at 0, interval not)
            below, above = max(audit["epsilon"] - lo, 0.0), max(hi - audit["epsilon"], 0.0)
            ax.errorbar(
                [last], [audit["epsilon"]], yerr=[[below], [above]],
                fmt="o", color="C1", capsize=3, label=f"{audit['threat_model']} ({audit['confidence']:.0%} CI)",
            )
    _round_axis(ax, max((r["round"] for r in rows), default=1))
    ax.set_ylabel(f"epsilon (delta = {audit['delta']:g})" if audit else "epsilon")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
