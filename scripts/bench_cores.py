"""fedsim's local training on one core against two, side by side, for the model-zoo rows.

For each row the same cohort (same device data, same seeds) is trained by the trainer the
engine picks, with ``workers = 1`` and with ``workers = 2`` (the loop path: worker processes;
``--threads-too`` adds the loop on two threads), alternated and repeated in one process so that
the machine's load hits every setting alike. Prints client updates per second (best and median
over the repetitions), the 2-vs-1 ratio, and the load average before and after. With pfl-research's
environment (``--pfl-python`` or ``$FEDSIM_PFL_PYTHON``), every repetition also runs pfl 0.6.0 on
the same cohort in 1 and in 2 processes (its best round after a warm-up round; each fedsim
setting then takes the best of as many passes), right after fedsim's settings, so each ratio
compares figures measured minutes apart under the same load.

    python scripts/bench_cores.py                    # every row
    python scripts/bench_cores.py --rows cnn lstm-lm --repeats 5 --json

Rows: ``cnn`` (digits 1x8x8), ``lstm-lm`` (char, hidden 128, 40 chars), ``transformer-lm``
(d 128, 2 layers, 80 tokens), ``tff-shakespeare`` (embedding 8, two LSTM layers of 256, 80 chars,
batch 4), ``mlp`` (784-128-10) and ``logreg`` (784-10) on synthetic data, as in ``fedsim bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = ("cnn", "lstm-lm", "transformer-lm", "tff-shakespeare", "mlp", "logreg")
CLIENTS = {"cnn": 128, "lstm-lm": 16, "transformer-lm": 8, "tff-shakespeare": 4, "mlp": 400, "logreg": 1000}


def scenario(row: str, clients: int, data_dir: Path) -> Any:
    from fedsim.scenario import scenario_from_dict
    from fedsim_bench import scenario_dict as dense_dict
    from fedsim_bench.model_zoo import scenario_dict as zoo_dict
    from fedsim_bench.model_zoo import text_file

    if row in ("mlp", "logreg"):
        raw = dense_dict(row, clients=clients, devices=clients, rounds=1, threads=1)
    else:
        from fedsim_bench.model_zoo import LENGTHS

        if row in LENGTHS:
            text_file(data_dir, LENGTHS[row], clients + 2)
        raw = zoo_dict(row, clients=clients, rounds=1, threads=1, data_dir=data_dir)
    raw["strategy"] = {"name": "fedavg"}
    return scenario_from_dict(raw)


def measure_row(
    row: str, clients: int, repeats: int, threads_too: bool, path: str | None = None, pfl: Path | None = None,
    pfl_rounds: int = 3,
) -> dict[str, Any]:
    import torch

    from clients.sgd import SGDTrainer
    from fedsim.builders import cohort_tasks
    from fedsim.engine import Simulation
    from fedsim_bench import best_of
    from fedsim_bench.pflpeer import export, run_pfl

    scratch = tempfile.TemporaryDirectory(prefix="fedsim-cores-")
    with tempfile.TemporaryDirectory(prefix="fedsim-cores-") as tmp:
        sim = Simulation(scenario(row, clients, Path(tmp)), progress=False)
        tasks = list(cohort_tasks(sim.data, 0, 0, range(clients)))
        cohort = export(sim, clients, Path(scratch.name) / "cohort.pt") if pfl is not None else None
    base: SGDTrainer = sim.trainer
    path = path or base.describe()["path"]
    settings: dict[str, SGDTrainer] = {}
    runs = [("1 core", path, 1, "auto"), ("2 cores", path, 2, "auto"), ("2 threads", path, 2, "threads")]
    if path != "loop":
        runs.append(("loop 1 core", "loop", 1, "auto"))  # the per-client loop, for the batching gain
    for name, which, workers, pool in runs:
        if name == "2 threads" and (not threads_too or path != "loop"):
            continue
        trainer = SGDTrainer(base.model, path=which, workers=workers, pool=pool)
        trainer.objective = base.objective
        settings[name] = trainer
    names = list(settings) + (["pfl 1 process", "pfl 2 processes"] if cohort is not None else [])
    # pfl's figure is its best timed round (all but its first); fedsim's is its best of as many passes
    passes_per_repeat = max(1, pfl_rounds - 1) if cohort is not None else 1
    times: dict[str, list[float]] = {name: [] for name in names}
    loads: dict[str, list[float]] = {name: [] for name in names}
    errors: list[str] = []
    torch.set_num_threads(1)
    try:
        for trainer in settings.values():  # warm-up: worker start, allocator, first kernels
            for _ in trainer.train_cohort(sim.params, iter(tasks[: max(4, clients // 4)]), sim.base_config):
                pass
        for _ in range(repeats):  # every setting once per repetition, in the same order
            for name, trainer in settings.items():
                loads[name].append(os.getloadavg()[0])
                passes = []
                for _ in range(passes_per_repeat):  # best of as many passes as pfl has timed rounds
                    start = time.perf_counter()
                    for _chunk in trainer.train_cohort(sim.params, iter(tasks), sim.base_config):
                        pass
                    passes.append(time.perf_counter() - start)
                times[name].append(min(passes))
            if cohort is not None:
                # pfl's own round (sampling, training, sum, central step) after its warm-up round
                for name, processes in (("pfl 1 process", 1), ("pfl 2 processes", 2)):
                    loads[name].append(os.getloadavg()[0])
                    res = run_pfl(pfl, cohort, pfl_rounds, processes)
                    if "error" in res:
                        errors.append(res["error"])
                        times[name].append(float("inf"))
                    else:
                        times[name].append(best_of(res["round_s"]))
    finally:
        for trainer in settings.values():
            trainer.close()
        scratch.cleanup()
    rates = {name: [clients / t for t in ts] for name, ts in times.items()}
    out: dict[str, Any] = {"row": row, "clients": clients, "path": path,
                           "pool_2": settings["2 cores"].describe().get("pool", "threads")}
    for name, rs in rates.items():
        out[name] = {"best": max(rs), "median": statistics.median(rs), "all": rs,
                     "load": [min(loads[name]), max(loads[name])]}
    if errors:
        out["errors"] = sorted(set(errors))
    if cohort is not None:
        pfl_best = [max(a, b) for a, b in zip(rates["pfl 1 process"], rates["pfl 2 processes"], strict=True)]
        out["pfl_2_vs_1"] = statistics.median(
            a / b for a, b in zip(rates["pfl 2 processes"], rates["pfl 1 process"], strict=True) if b
        ) if all(rates["pfl 1 process"]) else None
        out["fedsim_2_vs_pfl_best"] = statistics.median(a / b for a, b in zip(rates["2 cores"], pfl_best, strict=True) if b) \
            if any(pfl_best) else None
    # the ratio of each repetition (2 vs 1 measured back to back), then its median
    ratios = [a / b for a, b in zip(rates["2 cores"], rates["1 core"], strict=True)]
    if "loop 1 core" in rates:
        out["ratio_vs_loop_1_core"] = statistics.median(a / b for a, b in zip(rates["1 core"], rates["loop 1 core"], strict=True))
    out["ratio_2_vs_1"] = {"median": statistics.median(ratios), "best_vs_best": max(rates["2 cores"]) / max(rates["1 core"]),
                           "all": ratios}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every row's client count")
    p.add_argument("--threads-too", action="store_true", help="also the loop on 2 threads (pool = threads)")
    p.add_argument("--path", choices=("batched", "conv", "vmap", "loop"), help="force a trainer path (default: the engine's choice)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--pfl-python", metavar="PATH",
                   help="also pfl-research 0.6.0 in 1 and 2 processes, alternated with fedsim (default: $FEDSIM_PFL_PYTHON)")
    p.add_argument("--no-pfl", action="store_true", help="leave pfl out even when its environment is found")
    args = p.parse_args(argv)
    from fedsim_bench.pflpeer import missing_line, pfl_python

    pfl = None if args.no_pfl else pfl_python(args.pfl_python)
    if args.pfl_python and pfl is None:
        p.exit(2, f"error: --pfl-python: no such file: {args.pfl_python}\n")
    if pfl is None and not args.no_pfl:
        print(f"pfl: {missing_line()}", flush=True)
    results = []
    for row in args.rows:
        load = os.getloadavg()[0]
        res = measure_row(row, max(2, int(CLIENTS[row] * args.scale)), args.repeats, args.threads_too, args.path, pfl)
        res["load_before"], res["load_after"] = load, os.getloadavg()[0]
        results.append(res)
        line = (f"{row:<16}{res['path']:>8} {res['clients']:>5} clients  1 core {res['1 core']['median']:8.1f}/s"
                f"  2 cores ({res['pool_2']}) {res['2 cores']['median']:8.1f}/s")
        if "2 threads" in res:
            line += f"  2 threads {res['2 threads']['median']:8.1f}/s"
        if "loop 1 core" in res:
            line += f"  (loop, 1 core {res['loop 1 core']['median']:.1f}/s: 1 core is {res['ratio_vs_loop_1_core']:.2f}x the loop)"
        line += (f"  2 vs 1: {res['ratio_2_vs_1']['median']:.2f}x (per-repetition ratios "
                 f"{', '.join(f'{r:.2f}' for r in res['ratio_2_vs_1']['all'])})  load {load:.1f}->{res['load_after']:.1f}")
        if "pfl 1 process" in res:
            line += (f"\n{'':<16}pfl: 1 process {res['pfl 1 process']['median']:8.1f}/s  2 processes "
                     f"{res['pfl 2 processes']['median']:8.1f}/s  2 vs 1: {res['pfl_2_vs_1'] or float('nan'):.2f}x;"
                     f"  fedsim 2 cores / pfl's best: {res['fedsim_2_vs_pfl_best'] or float('nan'):.2f}x")
        for err in res.get("errors", []):
            line += f"\n{'':<16}{err}"
        print(line, flush=True)
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
