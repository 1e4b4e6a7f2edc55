"""FedAvg vs DP-FedAvg vs DP-FTRL at matched privacy, on the setting of scenarios/dp_ftrl.toml.

For every target ``rho`` the noise multipliers are calibrated with fedsim's own planning code
(``fedsim.privacy.calibration.calibrate_noise_multiplier``) so that every DP run ends at (at most)
that ``rho``:

* ``DP-FTRL (efficient)`` / ``DP-FTRL (vanilla)``: tree aggregation with the scenario's ``(k, b)``;
* ``DP-FedAvg (fixed, k, b)``: fixed-size cohorts under the *same* participation limits, no
  amplification claimed (``rho = min(k, ceil(T / (b + 1))) / (2 z**2)``);
* ``DP-FedAvg (Poisson)``: the classic sampled variant at ``q = clients_per_round / num_devices``.
  Its ``rho`` ignores amplification by sampling (see docs/privacy-mechanisms.md), so it is matched
  on ``epsilon`` instead: its ``z`` is the smallest whose (amplified) ``epsilon`` is at most the
  DP-FTRL run's ``epsilon``.

Every method uses the same server optimizer (learning rate and heavy-ball momentum of the
scenario, ``--momentum`` to change it); the reference without privacy is FedAvg with that server
momentum (``scripts/fedavgm.py``). Accuracy is the final test accuracy, mean and standard
deviation over seeds. The script prints a markdown table and writes ``docs/dp_comparison.png``
(test accuracy against the ``rho`` / ``epsilon`` spent so far, round by round).

The runs are a ``fedsim sweep`` (:mod:`fedsim.sweep`): one configuration per method and target,
each run a normal run directory under ``--runs`` (default ``runs/compare_dp``), in parallel worker
processes, and runs already complete there are reused (the sweep's ``results.md``, ``results.csv``
and plots are written there too). DP-FTRL and the fixed-cohort DP-FedAvg name their target with
``[strategy] target-rho``; the Poisson variant gets its epsilon-matched noise multiplier.

Usage::

    python scripts/compare_dp.py                 # 3 targets x 3 seeds, about 2 minutes on 2 cores
    python scripts/compare_dp.py --quick         # 1 target, 1 seed
    python scripts/compare_dp.py --rho 0.5 1 2 --seeds 3 --out docs/dp_comparison.png --workers 2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.errors import FedsimError
from fedsim.privacy.accountant import dp_fedavg_privacy, dp_ftrl_privacy
from fedsim.privacy.calibration import calibrate_noise_multiplier
from fedsim.sweep import Configuration, plan_sweep, run_sweep

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "scenarios" / "dp_ftrl.toml"


@dataclass
class Method:
    label: str
    strategy: dict[str, Any]
    noise_multiplier: float | None
    matched_on: str  # "rho", "epsilon" or "-"
    accuracy: list[float] = field(default_factory=list)
    curves: list[list[float | None]] = field(default_factory=list)
    rho_curve: list[float | None] = field(default_factory=list)
    eps_curve: list[float | None] = field(default_factory=list)
    rho: float | None = None
    epsilon: float | None = None
    name: str = ""


def _smallest_z_for_epsilon(target_eps: float, rounds: int, delta: float, q: float) -> float:
    """Smallest ``z`` (relative 1e-4) with amplified DP-FedAvg ``epsilon <= target_eps``."""

    def eps(z: float) -> float:
        return dp_fedavg_privacy(z, rounds, delta, sampling_rate=q).epsilon

    lo, hi = 0.05, 1.0
    while eps(hi) > target_eps:
        lo, hi = hi, hi * 2
    while hi / lo - 1 > 1e-4:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if eps(mid) <= target_eps else (mid, hi)
    return hi


def methods_for(target_rho: float, base: dict[str, Any], momentum: float) -> list[Method]:
    st = base["strategy"]
    rounds = base["rounds"]
    k, b = st["max-participations"], st["min-separation"]
    delta = base.get("privacy", {}).get("delta", 1e-6)
    q = base["clients-per-round"] / base["data"]["num-devices"]
    common = {"clip-norm": st["clip-norm"], "server-lr": st["server-lr"], "momentum": momentum}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k may exceed what fits early in short runs
        z_ftrl = calibrate_noise_multiplier(target_rho, "dp-ftrl", rounds=rounds, max_participations=k, min_separation=b)
        z_avg = calibrate_noise_multiplier(target_rho, "dp-fedavg", rounds=rounds, max_participations=k, min_separation=b)
        eps_ftrl = dp_ftrl_privacy(z_ftrl, rounds, k, b, delta).epsilon
    z_poisson = _smallest_z_for_epsilon(eps_ftrl, rounds, delta, q)
    ftrl = {"name": "dp-ftrl", **common, "max-participations": k, "min-separation": b, "target-rho": target_rho}
    tag = f"rho-{target_rho:g}"
    return [
        Method("DP-FTRL (efficient)", {**ftrl, "estimator": "efficient"}, z_ftrl, "rho", name=f"{tag}__dp-ftrl-efficient"),
        Method("DP-FTRL (vanilla)", {**ftrl, "estimator": "vanilla"}, z_ftrl, "rho", name=f"{tag}__dp-ftrl-vanilla"),
        Method(
            "DP-FedAvg (fixed, same k, b)",
            {"name": "dp-fedavg", **common, "max-participations": k, "min-separation": b, "target-rho": target_rho},
            z_avg,
            "rho",
            name=f"{tag}__dp-fedavg-fixed",
        ),
        Method(
            "DP-FedAvg (Poisson q)",
            {"name": "dp-fedavg", **common, "sampling": "poisson", "noise-multiplier": z_poisson},
            z_poisson,
            "epsilon",
            name=f"{tag}__dp-fedavg-poisson",
        ),
    ]


def run_all(methods: list[Method], seeds: int, runs: Path, workers: int | None) -> None:
    """Run every method as one sweep over ``seeds`` seeds and fill in its results."""
    configs = [Configuration(m.label, {"strategy": m.strategy, "engine.eval-every": 1}, m.name) for m in methods]
    specs = plan_sweep(BASE, configs, seeds=seeds, out=runs)
    result = run_sweep(specs, runs, workers=workers, progress=True)
    if result.failed:
        raise FedsimError(f"{len(result.failed)} run(s) failed, see the lines above")
    by_name = {m.name: m for m in methods}
    for spec in specs:
        m = by_name[spec.config.name]
        summary = result.summaries[spec.run_dir]
        rows = [json.loads(x) for x in (spec.run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if x]
        m.accuracy.append(summary["accuracy"])
        m.curves.append([r["accuracy"] for r in rows])
        m.rho_curve = [r["rho"] for r in rows]
        m.eps_curve = [r["epsilon"] for r in rows]
        m.rho, m.epsilon = summary["rho"], summary["epsilon"]


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def _fmt3(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def table(rows: list[tuple[float | None, Method]], seeds: int) -> str:
    lines = [
        f"| target rho | method | noise multiplier | accuracy (mean ± sd, {seeds} seed{'s' if seeds > 1 else ''}) "
        "| rho (zCDP) | epsilon (delta = 1e-6) | matched on |",
        "|---|---|---|---|---|---|---|",
    ]
    for target, m in rows:
        acc = np.asarray(m.accuracy)
        sd = f" ± {acc.std(ddof=1):.3f}" if len(acc) > 1 else ""
        lines.append(
            f"| {_fmt(target)} | {m.label} | {_fmt(m.noise_multiplier, 4)} | {acc.mean():.3f}{sd} "
            f"| {_fmt3(m.rho)} | {_fmt3(m.epsilon)} | {m.matched_on} |"
        )
    return "\n".join(lines)


def plot(results: dict[float, list[Method]], fedavg: Method, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted(results)
    fig, axes = plt.subplots(2, len(targets), figsize=(4.6 * len(targets), 7.0), squeeze=False, constrained_layout=True)
    ref = float(np.mean(fedavg.accuracy))
    colors = {"DP-FTRL (efficient)": "C0", "DP-FTRL (vanilla)": "C1", "DP-FedAvg (fixed, same k, b)": "C2",
              "DP-FedAvg (Poisson q)": "C3"}
    for col, target in enumerate(targets):
        for row, (key, label) in enumerate((("rho_curve", "rho (zCDP) spent"), ("eps_curve", "epsilon spent (delta = 1e-6)"))):
            ax = axes[row][col]
            for m in results[target]:
                if key == "rho_curve" and m.matched_on != "rho":
                    continue  # its rho ignores amplification: shown against epsilon only
                mean_acc = np.mean(np.asarray(m.curves, dtype=float), axis=0)
                ax.plot(getattr(m, key), mean_acc, label=m.label, color=colors.get(m.label), marker=".", ms=3, lw=1)
            ax.axhline(ref, ls="--", color="k", lw=1, label="no DP, final")
            ax.set_xlabel(label)
            ax.set_ylabel("test accuracy")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            ax.set_title(f"target rho = {target:g}" + ("" if row == 0 else " (epsilon-matched)"))
    axes[0][0].legend(fontsize=8, loc="lower right")
    axes[1][0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{BASE.name}: test accuracy vs privacy spent, one point per round")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rho", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="target rho values")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dp_comparison.png", help="figure path")
    parser.add_argument("--runs", type=Path, default=Path("runs") / "compare_dp",
                        help="sweep directory with the run directories (complete runs are reused)")
    parser.add_argument("--workers", type=int, default=None, help="parallel worker processes (default: one per CPU)")
    parser.add_argument("--momentum", type=float, default=None, help="server momentum of every method (default: the scenario's)")
    parser.add_argument("--quick", action="store_true", help="one target (rho = 1), one seed")
    args = parser.parse_args(argv)
    if args.quick:
        args.rho, args.seeds = [1.0], 1
    if args.seeds < 1 or any(not (r > 0 and math.isfinite(r)) for r in args.rho):
        print("error: --seeds must be >= 1 and every --rho a finite number > 0", file=sys.stderr)
        return 2
    if args.workers is not None and args.workers < 1:
        print(f"error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    base = tomllib.loads(BASE.read_text(encoding="utf-8"))
    momentum = base["strategy"]["momentum"] if args.momentum is None else args.momentum
    if not 0.0 <= momentum < 1.0:
        print(f"error: --momentum must be in [0, 1), got {momentum}", file=sys.stderr)
        return 2
    fedavg = Method(
        f"FedAvg, server momentum {momentum:g} (no DP)",
        {"name": f"{ROOT / 'scripts' / 'fedavgm.py'}:FedAvgM", "server-lr": base["strategy"]["server-lr"], "momentum": momentum},
        None,
        "-",
        name=f"fedavgm-{momentum:g}",
    )
    results: dict[float, list[Method]] = {}
    rows: list[tuple[float | None, Method]] = [(None, fedavg)]
    for target in args.rho:
        results[target] = methods_for(target, base, momentum)
        rows += [(target, m) for m in results[target]]
    try:
        run_all([m for _, m in rows], args.seeds, args.runs, args.workers)
    except FedsimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(rows, args.seeds))
    plot(results, fedavg, args.out)
    print(f"\nfigure: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
