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
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import tomli_w

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


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file, fsync, rename: readers never see a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class RunDir:
    """Writer for one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.path / "config.toml", tomli_w.dumps(config))

    def reset_metrics(self) -> None:
        self.metrics_path.write_text("", encoding="utf-8")

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(_clean(row), sort_keys=False) + "\n")
            fh.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text(encoding="utf-8").splitlines() if line]

    def write_json(self, name: str, data: Any) -> None:
        atomic_write_text(self.path / name, json.dumps(_clean(data), indent=2) + "\n")

    def plot(self, rows: list[dict[str, Any]], title: str) -> Path:
        """Write ``metrics.png``: accuracy and loss (and rho when present) against round."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r["round"] for r in rows]
        has_rho = any(r.get("rho") is not None for r in rows)
        ncols = 3 if has_rho else 2
        fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 3.4), constrained_layout=True)
        series = [("accuracy", "test accuracy"), ("loss", "test loss")] + ([("rho", "rho (zCDP)")] if has_rho else [])
        for ax, (key, label) in zip(axes, series, strict=True):
            pts = [(x, r[key]) for x, r in zip(rounds, rows, strict=True) if r.get(key) is not None]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="." if len(xs) < 60 else None)
            ax.set_xlabel("round")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        fig.suptitle(title)
        out = self.path / "metrics.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out
