"""Accuracy of DP-FTRL with tree aggregation vs BLT / banded matrix factorization at matched rho.

The setting of ``scenarios/dp_ftrl.toml`` (T = 100, 100 devices per round, k = 7, b = 13,
C = 0.5, server momentum 0.9) with ``[strategy] target-rho`` instead of a noise multiplier, so
every run ends at exactly the target ``rho`` whatever its mechanism (each mechanism's noise
multiplier is solved by the planning code for its own sensitivity). The runs are one
``fedsim sweep`` (``--grid strategy.mechanism=... --grid strategy.target-rho=...``, ``--seeds``),
each a normal run directory under ``--out``; runs already complete there are reused.

Usage::

    python scripts/mf_accuracy.py                       # rho 0.5 and 0.982, tree/blt/banded, 3 seeds
    python scripts/mf_accuracy.py --rho 0.982 --mechanisms tree blt --seeds 3
    python scripts/mf_accuracy.py --scenario scenarios/shakespeare_dp_ftrl.toml --rho 0.81 \
        --mechanisms tree blt --out runs/mf_accuracy_gboard   # the Gboard-like scenario

``--scenario`` takes any DP-FTRL scenario; its noise multiplier (if any) is replaced by the target.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tomllib
from pathlib import Path

import tomli_w

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "scenarios" / "dp_ftrl.toml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rho", type=float, nargs="+", default=[0.5, 0.982])
    parser.add_argument("--mechanisms", nargs="+", default=["tree", "blt", "banded"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--scenario", type=Path, default=BASE,
                        help="DP-FTRL scenario to compare on (default: scenarios/dp_ftrl.toml)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "mf_accuracy")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    scenario = tomllib.loads(args.scenario.read_text())
    if scenario.get("strategy", {}).get("name") != "dp-ftrl":
        parser.error(f"--scenario {args.scenario}: [strategy] name must be \"dp-ftrl\"")
    scenario["name"] = f"{scenario.get('name', 'dp_ftrl')}_mf"
    scenario["strategy"].pop("noise-multiplier", None)
    scenario["strategy"]["target-rho"] = args.rho[0]
    base = args.out / "base.toml"
    base.write_text(tomli_w.dumps(scenario))
    cmd = [sys.executable, "-m", "fedsim", "sweep", str(base),
           "--grid", "strategy.mechanism=" + ",".join(f'"{m}"' for m in args.mechanisms),
           "--grid", "strategy.target-rho=" + ",".join(f"{r:g}" for r in args.rho),
           "--seeds", str(args.seeds), "--workers", str(args.workers), "--out", str(args.out / "sweep"),
           "--quiet"]
    print("$ " + " ".join(cmd[2:]), file=sys.stderr)
    res = subprocess.run(cmd, cwd=ROOT)
    if res.returncode != 0:
        return res.returncode
    with open(args.out / "sweep" / "results.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    print("| target rho | mechanism | noise multiplier | accuracy (mean ± sd, "
          f"{args.seeds} seeds) | test loss | rho (zCDP) | epsilon (delta = 1e-6) |")
    print("|---|---|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: (float(r["strategy.target-rho"]),
                                           args.mechanisms.index(r["strategy.mechanism"].strip('"')))):
        print(f"| {float(row['strategy.target-rho']):g} | {row['strategy.mechanism'].strip(chr(34))} | "
              f"{_fmt(row, 'noise_multiplier')} | {float(row['accuracy_mean']):.3f} ± "
              f"{float(row['accuracy_sd']):.3f} | {float(row['loss_mean']):.3f} ± "
              f"{float(row['loss_sd']):.3f} | {_fmt(row, 'rho')} | {_fmt(row, 'epsilon')} |")
    return 0


def _fmt(row: dict, key: str) -> str:
    for name in (key, f"{key}_mean"):
        value = row.get(name)
        if value not in (None, ""):
            return f"{float(value):.4g}"
    return "-"


if __name__ == "__main__":
    sys.exit(main())
