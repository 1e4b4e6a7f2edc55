"""Noise multiplier and prefix-sum RMSE of each DP-FTRL mechanism at one zCDP budget.

Run ``python scripts/mf_table.py`` (Gboard es-ES parameters: T = 2000, k = 6, b = 313,
rho = 0.81) or pass ``--rounds --max-participations --min-separation --rho``. Every row comes from
the planning CLI (``fedsim privacy dp-ftrl --target-rho RHO --json --mechanism ...``), so the
table shows exactly what ``fedsim privacy`` prints; the output is a Markdown table for the docs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ROWS = (
    ("tree aggregation, vanilla estimator", ["--mechanism", "tree", "--estimator", "vanilla"]),
    ("tree aggregation, efficient estimator (Honaker)", ["--mechanism", "tree"]),
    ("banded MF (bands = b + 1)", ["--mechanism", "banded"]),
    ("BLT, 3 buffers", ["--mechanism", "blt", "--buffers", "3"]),
    ("BLT, 5 buffers", ["--mechanism", "blt", "--buffers", "5"]),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--max-participations", type=int, default=6)
    parser.add_argument("--min-separation", type=int, default=313)
    parser.add_argument("--rho", type=float, default=0.81)
    parser.add_argument("--delta", type=float, default=1e-10)
    args = parser.parse_args()
    base = [sys.executable, "-m", "fedsim.privacy_cli", "privacy", "dp-ftrl",
            "--rounds", str(args.rounds), "--max-participations", str(args.max_participations),
            "--min-separation", str(args.min_separation), "--target-rho", str(args.rho),
            "--delta", str(args.delta), "--json"]
    print(f"T = {args.rounds}, k = {args.max_participations}, b = {args.min_separation}, "
          f"target rho = {args.rho:g}, delta = {args.delta:g}\n")
    print("| mechanism | noise multiplier | sensitivity^2 (C^2) | prefix-sum RMSE (C) | "
          "worst-round std (C) | epsilon | planning time (s) |")
    print("|---|---|---|---|---|---|---|")
    for label, extra in ROWS:
        start = time.perf_counter()
        res = subprocess.run([*base, *extra], capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - start
        if res.returncode != 0:
            print(f"| {label} | error: {res.stderr.strip()} | | | | | |")
            continue
        data = json.loads(res.stdout)
        worst = data.get("prefix_max_std")
        if worst is None:  # the tree: the worst round is the one with most nodes
            worst = _tree_worst_std(data, extra)
        print(f"| {label} | {data['noise_multiplier']:.4g} | {data['sensitivity_sq']:.4g} | "
              f"{data['prefix_rmse']:.4g} | {worst:.4g} | {data['epsilon']:.3f} | {wall:.1f} |")
    return 0


def _tree_worst_std(data: dict, extra: list[str]) -> float:
    sys.path.insert(0, str(ROOT))
    from fedsim.privacy.tree_noise import prefix_variance

    estimator = "vanilla" if "vanilla" in extra else "efficient"
    worst = max(prefix_variance(t, estimator=estimator) for t in range(data["rounds"]))
    return data["noise_multiplier"] * worst ** 0.5


if __name__ == "__main__":
    sys.exit(main())
