"""Long-run memory stability: resident memory per round of a long simulation must not grow.

Run with ``python scripts/bench_memory.py`` (defaults: 10,000 synthetic devices, 500 rounds,
100 clients per round, checkpoints every 25 rounds). After every round it samples the process's
resident set size (RSS, after a garbage collection) and prints:

* RSS at the start and end of the measured window and the peak;
* the least-squares slope of RSS against round over the window after warm-up, in KiB per round,
  and the growth it extrapolates to over 10,000 rounds;
* the slope as a fraction of one 4 KiB page and of the update volume the server handles per round,
  and a verdict: ``FLAT`` when the slope is below one page per round. A run does keep a few
  hundred bytes per round by design (its ``metrics`` rows in memory, one privacy-ledger event per
  round for DP runs); a leak of anything per client or per model copy would show as many pages.

Everything runs through the real engine (``Simulation.run`` with a run directory, checkpoints,
validation, the accountant for DP strategies); only ``run_round`` is wrapped to take the samples.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsim.engine import Simulation  # noqa: E402
from fedsim.scenario import scenario_from_dict  # noqa: E402

PAGE_KIB = 4.0


def _scenario(args: argparse.Namespace, out: Path) -> dict:
    strategy: dict = {"name": args.strategy}
    if args.strategy == "dp-ftrl":
        # enough participations that every round fills its cohort over the whole run
        per_device = int(np.ceil(args.rounds * args.clients_per_round / args.devices)) + 1
        strategy.update({"noise-multiplier": 1.0, "clip-norm": 1.0, "max-participations": per_device, "min-separation": 0})
    elif args.strategy == "dp-fedavg":
        strategy.update({"noise-multiplier": 1.0, "clip-norm": 1.0, "sampling": "poisson"})
    return {
        "name": "bench-memory",
        "seed": 0,
        "rounds": args.rounds,
        "clients-per-round": args.clients_per_round,
        "output-dir": str(out),
        "data": {
            "dataset": "synthetic",
            "num-devices": args.devices,
            "examples-per-device": args.examples,
            "num-features": args.features,
            "num-classes": 10,
        },
        "population": {"availability": "bernoulli", "check-in-prob": 0.5},
        "model": {"name": args.model, "hidden": 32},
        "client": {"local-epochs": 1, "batch-size": 16, "lr": 0.05},
        "strategy": strategy,
        "engine": {"eval-every": 10},
        "checkpoint": {"every": args.checkpoint_every, "keep": 2},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=500)
    p.add_argument("--clients-per-round", type=int, default=100)
    p.add_argument("--examples", type=int, default=32, help="examples per device")
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--model", choices=("logreg", "mlp"), default="mlp")
    p.add_argument("--strategy", choices=("fedavg", "dp-fedavg", "dp-ftrl"), default="dp-ftrl")
    p.add_argument("--checkpoint-every", type=int, default=25)
    p.add_argument("--warmup", type=int, default=None, help="rounds left out of the fit (default: 10%%)")
    args = p.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else max(1, args.rounds // 10)

    proc = psutil.Process()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        sim = Simulation(scenario_from_dict(_scenario(args, out)), run_dir=out, progress=False)
        rss: list[float] = []
        original = sim.run_round

        def measured_round(r: int):
            row = original(r)
            gc.collect()
            rss.append(proc.memory_info().rss / 1024.0)
            return row

        sim.run_round = measured_round  # type: ignore[method-assign]
        start = time.perf_counter()
        result = sim.run()
        wall = time.perf_counter() - start

    rounds_done = len(rss)
    if rounds_done <= warmup + 2:
        print(f"only {rounds_done} rounds ran (stopped: {result.summary['stopped_reason']}); nothing to fit")
        return 1
    x = np.arange(warmup, rounds_done, dtype=np.float64)
    y = np.asarray(rss[warmup:], dtype=np.float64)
    slope, intercept = np.polyfit(x, y, 1)
    residual = float(np.std(y - (slope * x + intercept)))
    model_kib = sim.params.numel() * 4 / 1024.0

    print(f"scenario       {args.devices} devices, {args.clients_per_round} per round, {args.rounds} rounds, "
          f"{args.model} ({sim.params.numel()} params, {model_kib:.1f} KiB), {args.strategy}, "
          f"checkpoint every {args.checkpoint_every}")
    print(f"rounds run     {rounds_done} ({result.summary['stopped_reason']}), {wall:.1f} s, "
          f"accuracy {result.summary['accuracy']:.3f}")
    print(f"RSS            {rss[warmup] / 1024:.1f} MiB after warm-up (round {warmup + 1}), "
          f"{rss[-1] / 1024:.1f} MiB at the end, peak {max(rss) / 1024:.1f} MiB")
    print(f"slope          {slope:+.3f} KiB/round (fit over rounds {warmup + 1}..{rounds_done}, "
          f"residual std {residual:.0f} KiB)")
    print(f"extrapolated   {slope * 10_000 / 1024:+.1f} MiB over 10,000 rounds")
    volume = args.clients_per_round * model_kib
    print(f"ratio          slope / one page per round = {slope / PAGE_KIB:+.3f}; "
          f"slope / update volume per round ({args.clients_per_round} x {model_kib:.1f} KiB) = {slope / volume:+.5f}")
    verdict = "FLAT" if slope < PAGE_KIB else "GROWING"
    print(f"verdict        {verdict} (threshold: {PAGE_KIB:.0f} KiB/round)")
    return 0 if verdict == "FLAT" else 1


if __name__ == "__main__":
    sys.exit(main())
