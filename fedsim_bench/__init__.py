"""``fedsim bench`` (also ``python scripts/bench.py``): client-training throughput side by side.

One command measures, in one run and on the same scenario, four figures per reference scenario:

(a) **fedsim**: the in-process engine (``Simulation.run_round``: device data generated on demand,
    batched local SGD, server-side validation, streaming sum, FedAvg step);
(b) **naive loop**: the same client work written the obvious way: per client ``copy.deepcopy``
    of the model, ``torch.optim.SGD``, ``loss.backward()``, a running sum of the deltas;
(c) **Flower**: the same scenario and strategy on Flower's simulation engine
    (``fedsim run --backend flower``: Flower's Ray backend, fedsim's ClientApp per device);
(d) **FLOP bound**: the matmul FLOPs of one client update divided by an sgemm rate measured in
    the same run with the same torch thread count;
(e) **pfl-research** (Apple's ``pfl`` 0.6.0, in its own environment: :mod:`fedsim_bench.pflpeer`):
    the same cohort, model, loss and local training, in one process and in one process per
    core (``torch.distributed.run``), measured right after fedsim on the same row; the column
    is its better setting, and is skipped, with the install line, without that environment.

Reference scenarios: logistic regression and a 784-128-10 MLP on synthetic 784-feature,
10-class data; 1,000 clients per round (the whole population of 1,000 devices, so every engine
trains the same clients), 64 examples each, 1 local epoch, batch 16, lr 0.1. Updates per second
are ``clients / seconds``, where a round's seconds run from the strategy's ``configure_client``
(cohort chosen) to its ``aggregate`` (all updates in) for the two engines, and over the whole
loop for the naive baseline; every engine reports its fastest round after a warm-up (best-of-N,
as ``timeit`` does: on a shared machine a slower round measures other processes). Each engine is measured in its own subprocess (isolated memory,
same thread settings) and its peak resident memory is the peak of the RSS summed over the
subprocess and all its descendants (Flower's Ray processes included), sampled every 50 ms.

Also reported: fedsim's training throughput on data generated beforehand (what the FLOP bound
is compared with), the server-side DP-FTRL tree-noise cost per round for a 1.3M-parameter model,
and the Gboard-scale DP-FTRL round (:mod:`fedsim_bench.gboard`): the showcase's word LSTM at
1,000 and 6,500 clients per round from 100,000 devices, seconds (client training and the rest),
the FLOP bound, peak memory, and what a 2,000-round Gboard-shaped run would take.

Targets (checked here, never by timed tests): fedsim >= 50x Flower and >= 5x the naive loop in
updates per second on both scenarios; fedsim's training >= 50 % of the FLOP bound on the MLP.
``--json`` prints everything as one JSON object; ``--quick`` runs a reduced version (100 clients,
no Flower, the naive loop at one thread count, the word-LSTM DP-FTRL round at 1,000 clients)
whose cost is :data:`QUICK_COST`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

#: Reference scenario parameters (the issue's: 64 examples, 1 epoch, batch 16, 784 features).
FEATURES = 784
CLASSES = 10
EXAMPLES = 64
EPOCHS = 1
BATCH = 16
LR = 0.1
HIDDEN = 128
SEED = 0
MODELS = {"logreg": "logistic regression 784-10", "mlp": "MLP 784-128-10"}

#: The DP-FTRL scale scenario: the published Gboard es-ES cohort (6,500 per round) and model size.
DP_POPULATION = 100_000
DP_CLIENTS = 6_500
DP_NOISE_PARAMS = 1_300_000
DP_NOISE_MULTIPLIER = 7.0
DP_CLIP = 1.0

#: What ``--quick`` costs, as measured (``time fedsim bench --quick`` on the 2-core reference
#: machine; see docs/benchmarks.md): CPU time is steady, wall time grows with the machine's load.
QUICK_COST = (
    "costs ~90 s of CPU time (73 s user + 14 s system measured, most of it the 1,000-client word-LSTM "
    "round): 6 minutes measured on 2 cores shared with other work (load average 10-15); add pfl's "
    "runs when its environment is found"
)

#: File the timed strategy appends its round marks to (read back by the Flower measurement).
TIMES_ENV = "FEDSIM_BENCH_TIMES"


# ----------------------------------------------------------------------------------------------
# round timing: every engine runs ``fedsim_bench.workers:TimedFedAvg`` (FedAvg + timestamps)


def round_seconds(times: Sequence[tuple[str, int, float]]) -> list[float]:
    """Seconds from each round's ``start`` to its ``end`` mark, in round order."""
    start: dict[int, float] = {}
    out: dict[int, float] = {}
    for event, rnd, stamp in times:
        if event == "start":
            start[rnd] = stamp
        elif event == "end" and rnd in start:
            out[rnd] = stamp - start[rnd]
    return [out[r] for r in sorted(out)]


# ----------------------------------------------------------------------------------------------
# scenarios and FLOPs


def scenario_dict(
    model: str,
    *,
    clients: int,
    devices: int,
    rounds: int,
    threads: int,
    backend: str = "inprocess",
    strategy: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A reference scenario as a raw (TOML-shaped) dict."""
    return {
        "name": f"bench-{model}",
        "seed": SEED,
        "rounds": rounds,
        "clients-per-round": clients,
        "data": {
            "dataset": "synthetic",
            "num-devices": devices,
            "examples-per-device": EXAMPLES,
            "num-features": FEATURES,
            "num-classes": CLASSES,
        },
        "model": {"name": model, "hidden": HIDDEN},
        "client": {"local-epochs": EPOCHS, "batch-size": BATCH, "lr": LR},
        "strategy": strategy or {"name": "fedsim_bench.workers:TimedFedAvg"},
        "engine": {"backend": backend, "threads": threads, "eval-every": rounds},
    }


def layer_dims(model: str) -> list[tuple[int, int]]:
    """``(in, out)`` of each Linear layer of a reference model."""
    if model == "logreg":
        return [(FEATURES, CLASSES)]
    return [(FEATURES, HIDDEN), (HIDDEN, CLASSES)]


def flops_per_update(dims: Sequence[tuple[int, int]], examples: int, batch: int, epochs: int) -> int:
    """Matmul FLOPs of one client update of plain minibatch SGD.

    Per minibatch of ``b`` rows and Linear layer ``(i, o)``: forward ``2 b i o``, weight gradient
    ``2 b i o``, and the input gradient ``2 b i o`` for every layer but the first (the input needs
    none). Biases, activations and the loss are lower-order and left out, which makes the bound
    slightly optimistic.
    """
    sizes = [batch] * (examples // batch) + ([examples % batch] if examples % batch else [])
    total = 0
    for b in sizes:
        for index, (i, o) in enumerate(dims):
            total += 2 * b * i * o * (2 if index == 0 else 3)
    return total * epochs


# ----------------------------------------------------------------------------------------------
# the parent: subprocesses, memory sampling, the table


@dataclass
class Measurement:
    """One worker's result and its process tree's peak resident memory."""

    result: dict[str, Any] | None
    peak_rss_mb: float | None
    error: str | None = None
    seconds: float = 0.0


def _tree_rss(proc: Any) -> int:
    import psutil

    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def measure(kind: str, spec: dict[str, Any], *, timeout: float = 1800.0) -> Measurement:
    """Run a worker in a fresh interpreter, sampling its process tree's RSS every 50 ms."""
    import psutil

    cmd = [sys.executable, "-m", "fedsim_bench.workers", kind, json.dumps(spec)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    # the workers import fedsim (and the clients/strategies plug-ins) from where this copy lives
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        proc = psutil.Process(child.pid)
        while not stop.is_set():
            peak = max(peak, _tree_rss(proc))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
        stop.set()
        return Measurement(None, None, f"timed out after {timeout:.0f} s", time.perf_counter() - start)
    finally:
        stop.set()
        sampler.join()
    seconds = time.perf_counter() - start
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if child.returncode != 0 or not lines:
        tail = (err or out).strip().splitlines()[-1:] or ["no output"]
        return Measurement(None, None, f"{kind} worker failed (exit {child.returncode}): {tail[0]}", seconds)
    payload = json.loads(lines[-1])
    rss = max(peak, int(payload.pop("_maxrss", 0))) / 2**20
    return Measurement(payload, rss, None, seconds)


@dataclass
class BenchOptions:
    """What one benchmark run measures."""

    clients: int = 1000
    fedsim_rounds: int = 6
    flower_rounds: int = 3
    flower_models: tuple[str, ...] = ("logreg", "mlp")
    models: tuple[str, ...] = ("logreg", "mlp")
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    dp_clients: tuple[int, ...] = (1000, DP_CLIENTS)
    dp_population: int = DP_POPULATION
    dp_rounds: int = 2
    noise_rounds: int = 16
    train_repeats: int = 3
    naive_repeats: int = 2
    #: also time the naive loop with ``threads`` torch threads (the better of the two is reported)
    naive_all_threads: bool = True
    quick: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    #: model-zoo rows (:mod:`fedsim_bench.model_zoo`); the command line turns them on
    workloads: tuple[str, ...] = ()
    workload_rounds: int = 4
    workload_clients: dict[str, int] = field(
        default_factory=lambda: {"cnn": 100, "lstm-lm": 16, "transformer-lm": 16, "tff-shakespeare": 8}
    )
    #: the pfl-research environment's interpreter (``None``: ``$FEDSIM_PFL_PYTHON``, else ``.venv-pfl``)
    pfl_python: str | None = None
    #: central iterations pfl runs per setting (the first is its warm-up)
    pfl_rounds: int = 4
    #: ``[data]`` keys overriding the Gboard-scale round's (tests: the fixture plays)
    dp_data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def quick_run(cls, threads: int | None = None) -> BenchOptions:
        return cls(
            clients=100, fedsim_rounds=3, flower_rounds=2, flower_models=(), threads=threads or os.cpu_count() or 1,
            dp_clients=(1000,), dp_rounds=1, noise_rounds=4, train_repeats=1, naive_repeats=1, naive_all_threads=False,
            quick=True, pfl_rounds=3,
        )


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def log_progress(text: str, quiet: bool) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


def best_of(values: Sequence[float], *, warmup: int = 1) -> float | None:
    """Seconds of the fastest round after ``warmup`` warm-up rounds (all rounds if too few).

    Best-of-N is what ``timeit`` reports too: on a machine shared with other processes a slower
    round measures the interference, not the engine. Every engine is treated the same way; the
    JSON report keeps every round's time.
    """
    if not values:
        return None
    rest = values[warmup:] if len(values) > warmup else values
    return min(rest)


def run_benchmark(opts: BenchOptions, *, quiet: bool = False) -> dict[str, Any]:
    """Run every measurement; return the JSON-ready report."""
    started = time.perf_counter()
    load_before = os.getloadavg()
    log_progress(f"fedsim bench: sgemm rate with {opts.threads} torch thread(s) ...", quiet)
    mm = measure("matmul", {"threads": opts.threads})
    gflops = mm.result["gflops"] if mm.result else None
    scenarios = []
    from fedsim_bench.pflpeer import measure_pfl, pfl_python

    pfl_py = pfl_python(opts.pfl_python)
    pfl_processes = (1, opts.threads) if opts.threads > 1 else (1,)
    scratch = tempfile.TemporaryDirectory(prefix="fedsim-bench-pfl-")
    for model in opts.models:
        base = {"model": model, "clients": opts.clients, "threads": opts.threads}
        log_progress(f"fedsim bench: {model}: fedsim in-process engine ({opts.fedsim_rounds} rounds) ...", quiet)
        fed = measure("fedsim", {**base, "rounds": opts.fedsim_rounds, "train_repeats": opts.train_repeats})
        log_progress(f"fedsim bench: {model}: naive per-client loop ...", quiet)
        naive = measure("naive", {**base, "threads": 1, "repeats": opts.naive_repeats})
        naive_threads = 1
        if opts.threads > 1 and opts.naive_all_threads:  # the loop at its better thread count (usually 1: see docs/benchmarks.md)
            naive_t = measure("naive", {**base, "repeats": opts.naive_repeats})
            if naive_t.result and (not naive.result or min(naive_t.result["round_s"]) < min(naive.result["round_s"])):
                naive, naive_threads = naive_t, opts.threads
        flower = None
        if model in opts.flower_models:
            log_progress(f"fedsim bench: {model}: Flower simulation engine ({opts.flower_rounds} rounds, Ray) ...", quiet)
            flower = measure("flower", {**base, "rounds": opts.flower_rounds}, timeout=3600.0)
        if pfl_py is not None:
            log_progress(f"fedsim bench: {model}: pfl-research (1 and {opts.threads} processes) ...", quiet)
        pfl = measure_pfl(pfl_py, {"name": model, "clients": opts.clients}, rounds=opts.pfl_rounds,
                          processes=pfl_processes, workdir=Path(scratch.name))
        flops = flops_per_update(layer_dims(model), EXAMPLES, BATCH, EPOCHS)
        row: dict[str, Any] = {"name": model, "model": MODELS[model], "clients_per_round": opts.clients}
        fed_round = best_of(fed.result["round_s"]) if fed.result else None
        naive_round = best_of(naive.result["round_s"], warmup=0) if naive.result else None
        flower_round = best_of(flower.result["round_s"]) if flower and flower.result else None
        row["fedsim_updates_per_s"] = opts.clients / fed_round if fed_round else None
        row["naive_updates_per_s"] = opts.clients / naive_round if naive_round else None
        row["flower_updates_per_s"] = opts.clients / flower_round if flower_round else None
        row["flop_bound_updates_per_s"] = gflops * 1e9 / flops if gflops else None
        row["fedsim_training_updates_per_s"] = opts.clients / fed.result["train_s"] if fed.result else None
        local = fed.result.get("local_train_s") if fed.result else None
        row["fedsim_local_training_updates_per_s"] = opts.clients / local if local else None
        # fedsim's figure is the engine's own (ru_maxrss of its single process after the rounds,
        # before the training-only measurement holds a whole cohort's data)
        row["peak_rss_mb"] = fed.result["engine_maxrss"] / 2**20 if fed.result else None
        row["naive_peak_rss_mb"] = naive.peak_rss_mb
        row["flower_peak_rss_mb"] = flower.peak_rss_mb if flower else None
        row["seconds_per_round"] = {"fedsim": fed_round, "naive": naive_round, "flower": flower_round}
        row["fedsim_run_round_s"] = best_of(fed.result["run_round_s"]) if fed.result else None
        row["all_round_s"] = {
            "fedsim": fed.result["round_s"] if fed.result else None,
            "naive": naive.result["round_s"] if naive.result else None,
            "flower": flower.result["round_s"] if flower and flower.result else None,
        }
        row["data_generation_s_per_round"] = fed.result["data_s"] if fed.result else None
        row["flops_per_update"] = flops
        row["naive_threads"] = naive_threads
        row["errors"] = {k: m.error for k, m in (("fedsim", fed), ("naive", naive), ("flower", flower)) if m and m.error}
        for key in ("pfl_updates_per_s", "pfl_updates_per_s_by_processes", "pfl_round_s"):
            row[key] = pfl[key]
        if pfl["error"]:
            row["errors"]["pfl"] = pfl["error"]
        if flower is None:
            if opts.quick:
                row["errors"]["flower"] = "not run (--quick leaves out Flower: starting Ray alone costs more than the rest)"
            elif not opts.flower_models:
                row["errors"]["flower"] = "skipped (--no-flower)"
            else:
                row["errors"]["flower"] = f"not run (Flower measured on {', '.join(opts.flower_models)})"
        scenarios.append(row)
    dp_rows = []
    for clients in opts.dp_clients:
        log_progress(
            f"fedsim bench: DP-FTRL round of the word LSTM, {clients} clients from {opts.dp_population} devices ...", quiet
        )
        spec = {
            "clients": clients, "population": opts.dp_population, "rounds": opts.dp_rounds, "threads": opts.threads,
            "noise_params": DP_NOISE_PARAMS if clients == max(opts.dp_clients) else 0, "noise_rounds": opts.noise_rounds,
            "data": opts.dp_data,
        }
        m = measure("dpftrl", spec, timeout=7200.0)
        dp_rows.append(dp_entry(m, clients, opts, gflops))
    workload_rows: list[dict[str, Any]] = []
    if opts.workloads:
        from fedsim_bench.model_zoo import run_rows

        one = gflops if opts.threads == 1 else (measure("matmul", {"threads": 1}).result or {}).get("gflops")
        workload_rows = run_rows(opts, gflops, one, quiet, pfl_py, Path(scratch.name))
    scratch.cleanup()
    report: dict[str, Any] = {
        "scenarios": scenarios,
        "workloads": workload_rows,
        "matmul_gflops": gflops,
        "dp_ftrl": dp_rows,
        "config": {
            "clients_per_round": opts.clients, "examples_per_client": EXAMPLES, "local_epochs": EPOCHS,
            "batch_size": BATCH, "features": FEATURES, "classes": CLASSES, "threads": opts.threads,
            "cpus": os.cpu_count(), "quick": opts.quick, "torch": _version("torch"),
        },
    }
    report["config"]["load_average"] = {"start": list(load_before), "end": list(os.getloadavg())}
    report["targets"] = check_targets(report)
    report["wall_s"] = time.perf_counter() - started
    return report


def dp_entry(m: Measurement, clients: int, opts: BenchOptions, gflops: float | None) -> dict[str, Any]:
    """The JSON row of one Gboard-scale DP-FTRL measurement (see :func:`fedsim_bench.workers._worker_dpftrl`)."""
    from fedsim_bench.gboard import GBOARD_ROUNDS

    entry: dict[str, Any] = {"clients_per_round": clients, "population": opts.dp_population, "peak_rss_mb": m.peak_rss_mb,
                             "model": "word LSTM (embedding 32, LSTM 64, 5,004-word vocabulary)"}
    if not m.result:
        entry["error"] = m.error
        return entry
    res = m.result
    rounds = res["run_round_s"]
    best = min(range(len(rounds)), key=rounds.__getitem__)
    entry["round_s"] = rounds[best]
    entry["all_round_s"] = rounds
    entry["training_s"] = res["training_wait_s"][best]
    entry["server_s"] = rounds[best] - res["training_wait_s"][best]
    entry["clients"] = res["clients"]
    entry["local_model_params"] = res["local_params"]
    entry["trainer"] = res["trainer"]
    entry["examples_per_client"] = res["examples_per_client"]
    # FLOPs of device 0's update scale with its examples: the population's mean update
    flops = res["flops_per_update"] * res["examples_per_client"] / max(res["flops_examples"], 1)
    entry["flops_per_update"] = flops
    entry["flop_bound_round_s"] = clients * flops / (gflops * 1e9) if gflops else None
    entry["engine_peak_rss_mb"] = res["engine_maxrss"] / 2**20
    entry["gboard_run_rounds"] = GBOARD_ROUNDS
    entry["gboard_run_hours"] = GBOARD_ROUNDS * rounds[best] / 3600
    if "noise_s_per_round" in res:
        entry["noise_params"] = DP_NOISE_PARAMS
        entry["noise_s_per_round"] = res["noise_s_per_round"]
        entry["gaussian_noise_s"] = res.get("gaussian_noise_s")
        entry["gaussian_noise_numpy_s"] = res.get("gaussian_noise_numpy_s")
        entry["noise_kernel"] = res.get("noise_kernel")
    return entry


def check_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets against the measured figures: met, not met, or not measured."""
    out = []

    def add(name: str, value: float | None, goal: float, unit: str, *, at_most: bool = False) -> None:
        met = None if value is None else bool(value <= goal if at_most else value >= goal)
        row = {"target": name, "value": value, "goal": goal, "unit": unit, "met": met}
        if at_most:
            row["at_most"] = True  # lower is better: met when value <= goal
        out.append(row)

    for row in report["scenarios"]:
        fed, naive, flower = row["fedsim_updates_per_s"], row["naive_updates_per_s"], row["flower_updates_per_s"]
        add(f"{row['name']}: fedsim / Flower", fed / flower if fed and flower else None, 50.0, "x")
        add(f"{row['name']}: fedsim / naive loop", fed / naive if fed and naive else None, 5.0, "x")
        pfl = row.get("pfl_updates_per_s")
        add(f"{row['name']}: fedsim / pfl (best)", fed / pfl if fed and pfl else None, 3.0, "x")
        if row["name"] == "mlp":
            train, bound = row["fedsim_training_updates_per_s"], row["flop_bound_updates_per_s"]
            add("mlp: fedsim training / FLOP bound", 100 * train / bound if train and bound else None, 50.0, "%")
    threads = report["config"]["threads"]
    for row in report.get("workloads", []):
        fed, naive, flower = row["fedsim_updates_per_s"], row["naive_updates_per_s"], row["flower_updates_per_s"]
        add(f"{row['name']}: fedsim / naive loop", fed / naive if fed and naive else None, 1.0, "x")
        add(f"{row['name']}: fedsim / Flower", fed / flower if fed and flower else None, 10.0, "x")
        pfl = row.get("pfl_updates_per_s")
        add(f"{row['name']}: fedsim / pfl (best)", fed / pfl if fed and pfl else None, 1.3, "x")
        if row["name"] in ("cnn", "transformer-lm"):
            local, one = row["fedsim_local_training_updates_per_s"], row["flop_bound_one_core_updates_per_s"]
            add(f"{row['name']}: training / 1-core bound per core", 100 * local / threads / one if local and one else None, 40.0, "%")
    for dp in report.get("dp_ftrl", []):
        if dp.get("gaussian_noise_s") is not None:
            add(f"noise: Gaussian draw, {dp['noise_params'] / 1e6:.1f}M params", 1e3 * dp["gaussian_noise_s"], 25.0, "ms",
                at_most=True)
    return out


# ----------------------------------------------------------------------------------------------
# printing


def pfl_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per row with pfl's figure per process count (the table shows its best)."""
    lines = []
    for row in rows:
        by = row.get("pfl_updates_per_s_by_processes") or {}
        if by:
            parts = ", ".join(f"{n} process{'es' if n != '1' else ''} {fmt_number(v, 1)}" for n, v in sorted(by.items()))
            lines.append(f"  pfl {row['name']}: {parts} updates/s (the table shows the best)")
    notes = {row["errors"]["pfl"] for row in rows if row.get("errors", {}).get("pfl")}
    lines += [f"  pfl-research column: {note}" for note in sorted(notes)]
    return lines


def format_dp(rows: list[dict[str, Any]], threads: int) -> list[str]:
    """The Gboard-scale DP-FTRL rows as table lines."""
    from fedsim_bench.gboard import (
        GBOARD_MAX_PARTICIPATIONS,
        GBOARD_MIN_SEPARATION,
        GBOARD_NOISE_MULTIPLIER,
    )

    params = next((dp["local_model_params"] for dp in rows if "local_model_params" in dp), None)
    lines = [
        "Gboard-scale DP-FTRL round: the showcase's word LSTM (embedding 32, LSTM 64, 5,004-word vocabulary"
        + (f", {params:,} parameters" if params else "") + "),",
        f"  DP-FTRL noise multiplier {GBOARD_NOISE_MULTIPLIER:g}, at most {GBOARD_MAX_PARTICIPATIONS} contributions "
        f"{GBOARD_MIN_SEPARATION} rounds apart, efficient tree; engine.threads = {threads}; synthetic population: each",
        "  device holds the training text of one of the Shakespeare showcase's devices (device d: Shakespeare device d mod 933)",
    ]
    for dp in rows:
        if "error" in dp:
            lines.append(f"  {dp['clients_per_round']:>6} clients/round: {dp['error']}")
            continue
        bound = dp.get("flop_bound_round_s")
        lines.append(
            f"  {dp['clients_per_round']:>6} clients/round from {dp['population']:,} devices: {fmt_number(dp['round_s'], 2)} s/round "
            f"(waiting for client training {fmt_number(dp['training_s'], 2)} s, the rest {fmt_number(dp['server_s'], 2)} s; "
            f"FLOP bound {fmt_number(bound, 2)} s, {dp['flops_per_update'] / 1e6:,.0f} MFLOP per update), "
            f"peak RSS {fmt_number(dp['peak_rss_mb'])} MB"
        )
        if dp["clients_per_round"] == DP_CLIENTS:
            lines.append(
                f"    a Gboard-shaped run ({dp['gboard_run_rounds']:,} rounds of {DP_CLIENTS:,} clients) here: "
                f"{dp['gboard_run_hours']:,.1f} hours"
            )
    return lines


def fmt_number(value: float | None, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if digits == 0:
        return f"{value:,.0f}{unit}"
    return f"{value:,.{digits}f}{unit}"


def fmt_ratio(a: float | None, b: float | None) -> str:
    return "n/a" if not a or not b else f"{a / b:,.1f}x"


def format_report(report: dict[str, Any], *, targets: bool = False) -> str:
    """The human-readable table: measured figures and their ratios.

    The project's own speed goals (:func:`check_targets`) are printed, each with its verdict, only
    with ``targets=True`` (``--targets``): they are the developers' goals for their reference
    machine, not a test of the machine the benchmark runs on.
    """
    cfg = report["config"]
    lines = [
        f"fedsim bench: {cfg['clients_per_round']} clients/round, {cfg['examples_per_client']} examples each, "
        f"{cfg['local_epochs']} local epoch, batch {cfg['batch_size']}; synthetic {cfg['features']} features, "
        f"{cfg['classes']} classes; torch threads {cfg['threads']} ({cfg['cpus']} CPUs)"
        + (" [--quick]" if cfg["quick"] else ""),
        f"fedsim: engine.threads = {cfg['threads']}; FLOP bound: sgemm on {cfg['threads']} core(s); naive loop: "
        "the better of 1 and that many torch threads; Flower: one Ray actor per CPU, one torch thread each",
        f"sgemm rate measured in this run: {fmt_number(report['matmul_gflops'], 1)} GFLOP/s; load average "
        f"{cfg['load_average']['start'][0]:.2f} at start, {cfg['load_average']['end'][0]:.2f} at end"
        if "load_average" in cfg
        else f"sgemm rate measured in this run: {fmt_number(report['matmul_gflops'], 1)} GFLOP/s",
        "",
        "client updates per second (higher is better); ratios are fedsim's figure over the column's",
        f"{'scenario':<10}{'fedsim':>10}{'naive loop':>12}{'Flower':>10}{'pfl':>8}{'FLOP bound':>12}"
        f"{'vs naive':>10}{'vs Flower':>11}{'vs pfl':>8}{'training*':>11}{'% bound':>9}",
    ]
    for row in report["scenarios"]:
        fed, bound, train = row["fedsim_updates_per_s"], row["flop_bound_updates_per_s"], row["fedsim_training_updates_per_s"]
        pct = f"{100 * train / bound:.0f} %" if train and bound else "n/a"
        lines.append(
            f"{row['name']:<10}{fmt_number(fed):>10}{fmt_number(row['naive_updates_per_s']):>12}{fmt_number(row['flower_updates_per_s']):>10}"
            f"{fmt_number(row.get('pfl_updates_per_s')):>8}{fmt_number(bound):>12}{fmt_ratio(fed, row['naive_updates_per_s']):>10}"
            f"{fmt_ratio(fed, row['flower_updates_per_s']):>11}{fmt_ratio(fed, row.get('pfl_updates_per_s')):>8}"
            f"{fmt_number(train):>11}{pct:>9}"
        )
    lines.append(
        "* training: fedsim's batched training + validation + sum on data generated beforehand; % bound = training / FLOP bound"
    )
    for row in report["scenarios"]:
        local, bound = row.get("fedsim_local_training_updates_per_s"), row["flop_bound_updates_per_s"]
        if local and bound:
            lines.append(
                f"  {row['name']}: local training alone (no server validation or sum) {fmt_number(local)} updates/s, "
                f"{100 * local / bound:.0f} % of the bound"
            )
    lines += pfl_lines(report["scenarios"])
    lines += [
        "",
        "seconds per round and peak memory (RSS of the engine's whole process tree)",
        f"{'scenario':<10}{'fedsim s':>10}{'naive s':>10}{'Flower s':>10}{'data gen s':>12}"
        f"{'fedsim MB':>11}{'naive MB':>10}{'Flower MB':>11}{'MFLOP/update':>14}",
    ]
    for row in report["scenarios"]:
        s = row["seconds_per_round"]
        lines.append(
            f"{row['name']:<10}{fmt_number(s['fedsim'], 3):>10}{fmt_number(s['naive'], 2):>10}{fmt_number(s['flower'], 2):>10}"
            f"{fmt_number(row['data_generation_s_per_round'], 3):>12}{fmt_number(row['peak_rss_mb']):>11}"
            f"{fmt_number(row['naive_peak_rss_mb']):>10}{fmt_number(row['flower_peak_rss_mb']):>11}{row['flops_per_update'] / 1e6:>14.2f}"
        )
    lines += ["", *format_dp(report["dp_ftrl"], cfg["threads"])]
    for dp in report["dp_ftrl"]:
        if dp.get("gaussian_noise_s") is not None:
            lines.append(
                f"  noise ms/round at {dp['noise_params'] / 1e6:.1f}M params (cryptographic sampler, one core): "
                f"Gaussian {dp['gaussian_noise_s'] * 1e3:.1f} ms (one draw), "
                f"tree {dp['noise_s_per_round'] * 1e3:.1f} ms (efficient estimator)"
            )
            if dp.get("gaussian_noise_numpy_s") is not None:
                lines.append(
                    f"    sampler: {dp.get('noise_kernel')} kernel; its NumPy reference path, side by side "
                    f"(the same bits): Gaussian {dp['gaussian_noise_numpy_s'] * 1e3:.1f} ms "
                    f"({dp['gaussian_noise_numpy_s'] / dp['gaussian_noise_s']:.2f}x)"
                )
    if report.get("workloads"):
        from fedsim_bench.model_zoo import format_rows

        lines += format_rows(report["workloads"], cfg["threads"])
    if targets:
        lines += ["", "project targets (goals set for the reference machine, docs/benchmarks.md)"]
        for t in report["targets"]:
            state = "not measured" if t["met"] is None else ("met" if t["met"] else "not met")
            unit = {"%": " %", "ms": " ms"}.get(t["unit"], "x")
            value = "n/a" if t["value"] is None else f"{t['value']:.1f}{unit}"
            goal = f"{'<=' if t.get('at_most') else '>='} {t['goal']:g}{unit}"
            lines.append(f"  {t['target']:<36} {value:>10}  (goal {goal}): {state}")
    notes = [
        f"  note: {row['name']} {engine}: {err}" for row in report["scenarios"] for engine, err in row["errors"].items() if engine != "pfl"
    ]
    if notes:
        lines += ["", *notes]
    lines.append(f"\nbenchmark wall time {report['wall_s']:.0f} s")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message}\n")


def build_parser(prog: str = "fedsim bench") -> argparse.ArgumentParser:
    """Arguments of ``fedsim bench`` / ``scripts/bench.py``."""
    p = _Parser(prog=prog, description="Client-training throughput: fedsim vs a naive loop vs Flower vs the FLOP bound.")
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to ``p`` (shared by the CLI subcommand and the script)."""
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"reduced run (100 clients, no Flower, DP-FTRL at 1,000 clients); {QUICK_COST}",
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON object (always holds \"targets\")")
    p.add_argument(
        "--targets",
        action="store_true",
        help="also print the project's speed goals with a met / not met verdict for each (docs/benchmarks.md)",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=os.cpu_count() or 1,
        help="cores for fedsim (engine.threads) and the FLOP bound (default: all CPUs)",
    )
    p.add_argument("--clients", type=_positive_int, help="clients per round (default 1000; --quick: 100)")
    p.add_argument("--no-flower", action="store_true", help="skip Flower's simulation engine")
    p.add_argument("--no-workloads", action="store_true", help="skip the model-zoo rows (cnn, lstm-lm, transformer-lm, tff-shakespeare)")
    p.add_argument("--workloads", action="store_true", help="with --quick: also the model-zoo rows (reduced; minutes)")
    p.add_argument(
        "--pfl-python",
        metavar="PATH",
        help="the pfl-research environment's python (pfl 0.6.0; default: $FEDSIM_PFL_PYTHON, else .venv-pfl/bin/python); "
        "without one the pfl column is skipped with the install line",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """:class:`BenchOptions` for parsed arguments."""
    opts = BenchOptions.quick_run(args.threads) if args.quick else BenchOptions(threads=args.threads)
    if args.clients is not None:
        opts.clients = args.clients
    if args.no_flower:
        opts.flower_models = ()
    if args.pfl_python:
        from fedsim_bench.pflpeer import pfl_python

        if pfl_python(args.pfl_python) is None:
            raise SystemExit(f"error: --pfl-python: no such file: {args.pfl_python}")
        opts.pfl_python = args.pfl_python
    if args.workloads or (not args.quick and not args.no_workloads):
        from fedsim_bench.model_zoo import WORKLOADS

        opts.workloads = WORKLOADS
        if args.quick:
            opts.workload_rounds = 3
            opts.workload_clients = {"cnn": 50, "lstm-lm": 8, "transformer-lm": 8, "tff-shakespeare": 4}
    return opts


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark for parsed arguments; print the table (or JSON)."""
    report = run_benchmark(options_from_args(args), quiet=args.json)
    print(json.dumps(report, indent=2) if args.json else format_report(report, targets=args.targets))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``scripts/bench.py`` and ``python -m fedsim_bench``."""
    args = build_parser("bench.py").parse_args(argv)
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
