"""Benchmark rows for the model zoo: ``cnn`` on the digits as images, ``lstm-lm`` and
``transformer-lm`` on text.

Each row measures, in its own subprocess (see :func:`fedsim_bench.measure`): fedsim's in-process
engine (the trainer path it chooses, best round after a warm-up), a naive per-client loop
(``copy.deepcopy`` of the model, ``torch.optim.SGD``, ``loss.backward()``, a running sum),
Flower's simulation engine on the same scenario, the FLOP bound (FLOPs of one client update
divided by the sgemm rate measured in the same run, on the run's cores and on one) and peak
memory. FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one client's real
local training (matmuls, convolutions, attention); LSTM layers, which it does not see, are
counted analytically (``2 x 4H x (I + H)`` per token and layer forward, twice that backward).

The text is this repository's own documentation (README and ``docs/*.md``), read as characters
(printable ASCII and newline; ids 0 pad, 1 OOV, 2 BOS, 3 EOS), cut into ``SEQUENCES`` sequences
per user, written to a ``.npz`` file with a user id per sequence and loaded through the data-file
loader, so the row exercises the same path a user's data takes. Workload sizes follow the
measured facts in the issue: a char LSTM with 128 hidden units on 40-character sequences and a
``d = 128``, 2-layer transformer on 80 tokens, 32 sequences per client, batch 8, one epoch.

The pfl-research peer (Apple's ``pfl`` 0.6.0) needs its own virtual environment (it pins its
own dependencies): the row reports it as skipped, with the install line, when that environment
(``$FEDSIM_PFL_PYTHON``, else ``.venv-pfl/bin/python``) is absent.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: Rows, with the scenario each one runs (data file paths are filled in by the parent).
WORKLOADS = ("cnn", "lstm-lm", "transformer-lm", "tff-shakespeare")
SEQUENCES = 32
TEXT_BATCH = 8
LENGTHS = {"lstm-lm": 40, "transformer-lm": 80, "tff-shakespeare": 80}
#: each row's model: a registered model name and its parameters
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "cnn": ("cnn", {}),
    "lstm-lm": ("lstm-lm", {"embedding": 8, "hidden": 128, "layers": 1}),
    "transformer-lm": ("transformer-lm", {"dim": 128, "layers": 2, "heads": 4}),
    # TFF's Shakespeare model (Reddi et al. 2021): embedding 8, two LSTM layers of 256, batch 4
    "tff-shakespeare": ("lstm-lm", {"embedding": 8, "hidden": 256, "layers": 2}),
}
BATCHES = {"tff-shakespeare": 4}


def text_file(directory: Path, length: int, users: int) -> Path:
    """Write ``users x SEQUENCES`` character sequences of ``length`` (+1 for the target) to a ``.npz``."""
    root = Path(__file__).resolve().parents[1]  # the repository (this file is fedsim_bench/model_zoo.py)
    parts = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in parts if p.is_file())
    ids = np.array([(ord(c) - 32 + 5 if 32 <= ord(c) < 127 else (4 if c == "\n" else 1)) for c in text], dtype=np.int64)
    need = users * SEQUENCES * (length + 1)
    ids = np.resize(ids, need).reshape(users * SEQUENCES, length + 1)
    path = directory / f"text-{length}.npz"
    np.savez(path, x=ids[:, :-1], y=ids[:, 1:], user_id=np.repeat(np.arange(users), SEQUENCES))
    return path


def scenario_dict(name: str, *, clients: int, rounds: int, threads: int, data_dir: Path, backend: str = "inprocess") -> dict[str, Any]:
    """The row's scenario as a raw dict (every device trains each round)."""
    if name == "cnn":
        data: dict[str, Any] = {"dataset": "digits", "input-shape": [1, 8, 8], "num-devices": clients}
        client = {"local-epochs": 1, "batch-size": 16, "lr": 0.1}
    else:
        path = data_dir / f"text-{LENGTHS[name]}.npz"
        data = {"dataset": str(path), "vocab-size": 100, "pad-id": 0, "eos-id": 3, "oov-ids": [1], "test-fraction": 0.05}
        client = {"local-epochs": 1, "batch-size": BATCHES.get(name, TEXT_BATCH), "lr": 0.5}
    model, params = MODELS[name]
    return {
        "name": f"bench-{name}",
        "seed": 0,
        "rounds": rounds,
        "clients-per-round": clients,
        "data": data,
        "model": {"name": model, **params},
        "client": client,
        "strategy": {"name": "fedsim_bench.workers:TimedFedAvg"},
        "engine": {"backend": backend, "threads": threads, "eval-every": rounds},
    }


def _simulation(spec: dict[str, Any], backend: str = "inprocess") -> Any:
    from fedsim.scenario import scenario_from_dict

    raw = scenario_dict(spec["name"], clients=spec["clients"], rounds=spec["rounds"], threads=spec["threads"],
                        data_dir=Path(spec["data_dir"]), backend=backend)
    return scenario_from_dict(raw)


def client_flops(sim: Any) -> float:
    """FLOPs of one client update of ``sim``'s model on device 0 (counted on real training)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fedsim import seeds
    from fedsim.builders import client_task

    model = copy.deepcopy(sim.trainer.model)
    task = client_task(sim.data, 0, seeds.client_seed(0, 0, 0))
    x = task.x
    trainer = type(sim.trainer)(model, path="loop")
    trainer.objective = sim.trainer.objective
    with FlopCounterMode(display=False) as counter:
        trainer.train_client(sim.params, task, sim.base_config)
    total = float(counter.get_total_flops())
    for module in model.modules():
        if isinstance(module, torch.nn.LSTM):
            tokens = int(np.prod(x.shape))
            size = module.hidden_size
            for layer in range(module.num_layers):
                inp = module.input_size if layer == 0 else size
                total += 3 * 2 * 4 * size * (inp + size) * tokens  # forward + 2x backward
    return total


def worker_fedsim(spec: dict[str, Any]) -> dict[str, Any]:
    """fedsim's engine on the row's scenario: rounds, local training alone, FLOPs, trainer path."""
    import resource

    from fedsim.builders import cohort_tasks
    from fedsim.engine import Simulation
    from fedsim_bench import round_seconds

    sim = Simulation(_simulation(spec), progress=False)
    for r in range(spec["rounds"]):
        sim.run_round(r)
    timed = round_seconds(sim.strategy.times)
    engine_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tasks = list(cohort_tasks(sim.data, 0, 0, range(spec["clients"])))
    local = math.inf
    for _ in range(spec.get("repeats", 2)):
        start = time.perf_counter()
        for _chunk in sim.trainer.train_cohort(sim.params, iter(tasks), sim.base_config, chunk_size=sim.scenario.engine.chunk_size):
            pass
        local = min(local, time.perf_counter() - start)
    return {
        "round_s": timed, "local_train_s": local, "engine_maxrss": engine_maxrss, "flops": client_flops(sim),
        "trainer": sim.trainer.describe(), "params": int(sim.params.numel()),
    }


def worker_naive(spec: dict[str, Any]) -> dict[str, Any]:
    """The obvious loop: per client deepcopy, torch.optim.SGD, backward, a running sum of deltas."""
    from fedsim import seeds
    from fedsim.engine import Simulation

    sim = Simulation(_simulation(spec), progress=False)
    model, objective, cfg = sim.model, sim.trainer.objective, sim.base_config
    global_flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    data = [sim.data.client_data(dev) for dev in range(spec["clients"])]

    def one_round(devices: range) -> float:
        total = torch.zeros_like(global_flat)
        start = time.perf_counter()
        for dev in devices:
            x, y = data[dev]
            local = copy.deepcopy(model)
            opt = torch.optim.SGD(local.parameters(), lr=cfg.lr)
            gen = torch.Generator().manual_seed(seeds.client_seed(0, 0, dev))
            for _ in range(cfg.local_epochs):
                order = torch.randperm(len(y), generator=gen)
                for lo in range(0, len(y), cfg.batch_size):
                    idx = order[lo : lo + cfg.batch_size]
                    opt.zero_grad()
                    objective.loss(local(x[idx]), y[idx]).backward()
                    opt.step()
            total += len(y) * (torch.nn.utils.parameters_to_vector(local.parameters()).detach() - global_flat)
        assert torch.isfinite(total).all()
        return time.perf_counter() - start

    one_round(range(min(2, spec["clients"])))
    return {"round_s": [one_round(range(spec["clients"])) for _ in range(spec.get("repeats", 1))]}


def worker_flower(spec: dict[str, Any]) -> dict[str, Any]:
    """The row's scenario on Flower's simulation engine (fedsim's bridge, one Ray actor per CPU)."""
    from fedsim.flower.simulation import FlowerSimulation
    from fedsim_bench import TIMES_ENV, round_seconds

    scenario = _simulation({**spec, "threads": 1}, backend="flower")
    with tempfile.TemporaryDirectory(prefix="fedsim-bench-") as tmp:
        times_file = Path(tmp) / "times.txt"
        os.environ[TIMES_ENV] = str(times_file)
        FlowerSimulation(scenario, run_dir=None, progress=False).run()
        stamps = []
        for line in times_file.read_text(encoding="utf-8").splitlines():
            event, rnd, stamp = line.split()
            stamps.append((event, int(rnd), float(stamp)))
    return {"round_s": round_seconds(stamps)}


WORKERS = {"workload-fedsim": worker_fedsim, "workload-naive": worker_naive, "workload-flower": worker_flower}


def run_rows(
    opts: Any, gflops: float | None, gflops_one: float | None, quiet: bool, pfl_py: Path | None = None,
    workdir: Path | None = None,
) -> list[dict[str, Any]]:
    """Measure every row of ``opts.workloads``; the JSON-ready rows.

    pfl-research (``pfl_py``, its environment's interpreter; ``None``: the column is skipped with
    the install line) trains each row's cohort right after fedsim does, in one process and in
    ``opts.threads`` processes; ``workdir`` holds the exported cohorts meanwhile.
    """
    from fedsim_bench import best_of, log_progress, measure
    from fedsim_bench.pflpeer import measure_pfl

    rows = []
    with tempfile.TemporaryDirectory(prefix="fedsim-bench-text-") as tmp:
        data_dir = Path(tmp)
        for name in opts.workloads:
            clients = opts.workload_clients.get(name, 16)
            if name in LENGTHS:
                text_file(data_dir, LENGTHS[name], clients + 2)
            base = {"name": name, "clients": clients, "threads": opts.threads, "data_dir": str(data_dir)}
            log_progress(f"fedsim bench: {name}: fedsim in-process engine ...", quiet)
            fed = measure("workload-fedsim", {**base, "rounds": opts.workload_rounds})
            log_progress(f"fedsim bench: {name}: naive per-client loop ...", quiet)
            naive = measure("workload-naive", {**base, "threads": 1, "rounds": 1})
            if pfl_py is not None:
                log_progress(f"fedsim bench: {name}: pfl-research (1 and {opts.threads} processes) ...", quiet)
            pfl = measure_pfl(pfl_py, base, rounds=opts.pfl_rounds, processes=(1, opts.threads) if opts.threads > 1 else (1,),
                              workdir=workdir or data_dir)
            flower = None
            if opts.flower_models and not opts.quick:
                log_progress(f"fedsim bench: {name}: Flower simulation engine ...", quiet)
                flower = measure("workload-flower", {**base, "rounds": 2}, timeout=3600.0)
            row: dict[str, Any] = {"name": name, "clients_per_round": clients, "errors": {}}
            fed_round = best_of(fed.result["round_s"]) if fed.result else None
            naive_round = best_of(naive.result["round_s"], warmup=0) if naive.result else None
            flower_round = best_of(flower.result["round_s"]) if flower and flower.result else None
            row["fedsim_updates_per_s"] = clients / fed_round if fed_round else None
            row["naive_updates_per_s"] = clients / naive_round if naive_round else None
            row["flower_updates_per_s"] = clients / flower_round if flower_round else None
            flops = fed.result["flops"] if fed.result else None
            row["flops_per_update"] = flops
            row["flop_bound_updates_per_s"] = gflops * 1e9 / flops if gflops and flops else None
            row["flop_bound_one_core_updates_per_s"] = gflops_one * 1e9 / flops if gflops_one and flops else None
            local = fed.result["local_train_s"] if fed.result else None
            row["fedsim_local_training_updates_per_s"] = clients / local if local else None
            row["peak_rss_mb"] = fed.result["engine_maxrss"] / 2**20 if fed.result else None
            row["naive_peak_rss_mb"] = naive.peak_rss_mb
            row["flower_peak_rss_mb"] = flower.peak_rss_mb if flower else None
            row["trainer"] = fed.result["trainer"] if fed.result else None
            row["params"] = fed.result["params"] if fed.result else None
            for key, m in (("fedsim", fed), ("naive", naive), ("flower", flower)):
                if m is not None and m.error:
                    row["errors"][key] = m.error
            if flower is None:
                row["errors"]["flower"] = "not run (--quick)" if opts.quick else "skipped (--no-flower)"
            for key in ("pfl_updates_per_s", "pfl_updates_per_s_by_processes", "pfl_round_s"):
                row[key] = pfl[key]
            if pfl["error"]:
                row["errors"]["pfl"] = pfl["error"]
            rows.append(row)
    return rows


def format_rows(rows: list[dict[str, Any]], threads: int) -> list[str]:
    """The rows as table lines."""
    from fedsim_bench import fmt_number, fmt_ratio

    lines = [
        "",
        "model zoo: cnn on digits 1x8x8 images; lstm-lm (hidden 128, 40 chars), transformer-lm (d 128, 2 layers,",
        "80 tokens) and tff-shakespeare (TFF's model: embedding 8, 2 x LSTM 256, 80 chars, batch 4) on text; 32 sequences",
        "per client, batch 8 (cnn: digits devices, batch 16); 1 local epoch",
        f"{'model':<16}{'path':>8}{'fedsim':>9}{'naive':>9}{'Flower':>9}{'pfl':>9}{'bound':>9}{'% bound':>9}"
        f"{'% 1 core':>10}{'vs naive':>10}{'vs Flower':>11}{'vs pfl':>8}{'MB':>7}",
    ]
    for row in rows:
        local, bound, one = row["fedsim_local_training_updates_per_s"], row["flop_bound_updates_per_s"], row["flop_bound_one_core_updates_per_s"]
        fed = row["fedsim_updates_per_s"]
        pct = f"{100 * local / bound:.0f} %" if local and bound else "n/a"
        pct_one = f"{100 * local / threads / one:.0f} %" if local and one else "n/a"
        path = row["trainer"]["path"] if row["trainer"] else "n/a"
        lines.append(
            f"{row['name']:<16}{path:>8}{fmt_number(fed, 1):>9}{fmt_number(row['naive_updates_per_s'], 1):>9}"
            f"{fmt_number(row['flower_updates_per_s'], 1):>9}{fmt_number(row.get('pfl_updates_per_s'), 1):>9}"
            f"{fmt_number(bound, 1):>9}{pct:>9}{pct_one:>10}"
            f"{fmt_ratio(fed, row['naive_updates_per_s']):>10}{fmt_ratio(fed, row['flower_updates_per_s']):>11}"
            f"{fmt_ratio(fed, row.get('pfl_updates_per_s')):>8}{fmt_number(row['peak_rss_mb']):>7}"
        )
    lines.append(
        "  client updates/s; % bound: local training / FLOP bound on the run's cores; % 1 core: per core, against one core's bound"
    )
    from fedsim_bench import pfl_lines

    lines += pfl_lines(rows)
    for row in rows:
        for engine, err in row["errors"].items():
            if engine != "pfl":
                lines.append(f"  note: {row['name']} {engine}: {err}")
    return lines
