"""The measurements of ``fedsim bench``, each run in its own interpreter.

``python -m fedsim_bench.workers KIND 'SPEC-JSON'`` runs one measurement with ``SPEC["threads"]``
torch threads and prints its result as one JSON line (plus ``_maxrss``, the process's peak
resident memory in bytes). :mod:`fedsim_bench` starts these subprocesses and samples the memory
of their whole process tree; see its docstring for what each figure means.
"""

from __future__ import annotations

import copy
import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fedsim.strategy import Strategy
from fedsim.types import TrainConfig, UpdateBatch
from fedsim_bench import (
    BATCH,
    CLASSES,
    DP_CLIP,
    DP_NOISE_MULTIPLIER,
    EPOCHS,
    EXAMPLES,
    FEATURES,
    HIDDEN,
    LR,
    SEED,
    TIMES_ENV,
    round_seconds,
    scenario_dict,
)


class TimedFedAvg(Strategy):
    """FedAvg (``strategies.fedavg.FedAvg``) that records when each round's cohort is configured
    and when the round is aggregated.

    The times go to ``self.times`` and, when ``$FEDSIM_BENCH_TIMES`` names a file, are appended
    there (the Flower bridge builds its own strategy object in its server).
    """

    name = "timed-fedavg"
    weighting = "examples"

    def __init__(self, server_lr: float = 1.0) -> None:
        from strategies.fedavg import FedAvg  # a plug-in: imported when used, not by the core

        self.inner = FedAvg(server_lr=server_lr)
        self.times: list[tuple[str, int, float]] = []

    def _mark(self, event: str, round: int) -> None:
        stamp = (event, round, time.perf_counter())
        self.times.append(stamp)
        path = os.environ.get(TIMES_ENV)
        if path:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(f"{event} {round} {stamp[2]!r}\n")

    def configure_client(self, *, round: int, base: TrainConfig) -> TrainConfig:
        self._mark("start", round)
        return self.inner.configure_client(round=round, base=base)

    def aggregate(self, *, round: int, params: torch.Tensor, batch: UpdateBatch) -> torch.Tensor:
        out = self.inner.aggregate(round=round, params=params, batch=batch)
        self._mark("end", round)
        return out


def matmul_gflops(threads: int, size: int = 1024, repeats: int = 7) -> float:
    """Best total sgemm rate (GFLOP/s) of ``threads`` cores on ``size x size`` float32 matrices.

    One core: the best of ``repeats`` single-threaded products. Several: ``threads`` Python
    threads each multiplying its own matrices with one torch thread, concurrently (torch releases
    the GIL inside the kernel), best of ``repeats`` rounds of one product each; the same kind of
    parallelism the engine uses (one group per core), and on an idle machine the same figure as
    torch's own intra-op threads (measured: 220 GFLOP/s on 2 cores either way, 110-115 on one).
    """
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)) for _ in range(threads)]
    for a, b in pairs:
        a @ b
    if threads == 1:
        a, b = pairs[0]
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        return 2 * size**3 / best / 1e9
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads) as pool:
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(lambda pair: pair[0] @ pair[1], pairs))
            best = min(best, time.perf_counter() - start)
    return threads * 2 * size**3 / best / 1e9


def _worker_fedsim(spec: dict[str, Any]) -> dict[str, Any]:
    """The in-process engine: full rounds, plus training alone on data generated beforehand."""
    from fedsim.builders import cohort_tasks
    from fedsim.engine import Simulation
    from fedsim.engine.aggregation import UpdateAccumulator
    from fedsim.scenario import scenario_from_dict

    rounds = spec["rounds"]
    scenario = scenario_from_dict(
        scenario_dict(spec["model"], clients=spec["clients"], devices=spec["clients"], rounds=rounds, threads=spec["threads"])
    )
    sim = Simulation(scenario, progress=False)
    round_wall = []
    for r in range(rounds):
        start = time.perf_counter()
        sim.run_round(r)
        round_wall.append(time.perf_counter() - start)
    timed = round_seconds(sim.strategy.times)  # type: ignore[attr-defined]
    # the engine's peak memory, before the training-only measurement below holds a whole
    # cohort's data at once (which the engine never does)
    engine_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # the cohort's data generation on its own (streamed, as the engine does: nothing kept)
    cohort = list(range(spec["clients"]))
    data_s = math.inf
    for _ in range(2):
        start = time.perf_counter()
        for dev in cohort:
            sim.data.client_data(dev)
        data_s = min(data_s, time.perf_counter() - start)
    # training alone, on the same cohort's data generated beforehand
    tasks = list(cohort_tasks(sim.data, SEED, 0, cohort))
    config = sim.base_config
    train_s = math.inf
    for _ in range(spec["train_repeats"]):
        acc = UpdateAccumulator(
            num_params=sim.params.numel(), round=0, clip_norm=None, weighting="examples", ledger=None,
            num_devices=sim.data.num_devices, max_weight_share=scenario.engine.max_weight_share,
        )
        start = time.perf_counter()
        for chunk in sim.trainer.train_cohort(sim.params, iter(tasks), config, chunk_size=scenario.engine.chunk_size):
            acc.add(chunk)
        train_s = min(train_s, time.perf_counter() - start)
        assert acc.num_updates == len(tasks)
    # local training alone: the same chunks, not validated or summed by the server
    local_s = math.inf
    for _ in range(spec["train_repeats"]):
        start = time.perf_counter()
        for _chunk in sim.trainer.train_cohort(sim.params, iter(tasks), config, chunk_size=scenario.engine.chunk_size):
            pass
        local_s = min(local_s, time.perf_counter() - start)
    return {
        "round_s": timed, "run_round_s": round_wall, "train_s": train_s, "local_train_s": local_s, "data_s": data_s,
        "engine_maxrss": engine_maxrss,
    }


def _worker_naive(spec: dict[str, Any]) -> dict[str, Any]:
    """The obvious per-client loop: deepcopy, torch.optim.SGD, backward, running sum."""
    from torch.nn import functional as F

    from fedsim import seeds as seeds_mod
    from fedsim.data import SyntheticData
    from fedsim.models import build_model

    torch.set_num_threads(spec["threads"])
    clients = spec["clients"]
    data = SyntheticData(
        num_devices=clients, examples_per_device=EXAMPLES, num_features=FEATURES, num_classes=CLASSES, seed=SEED
    )
    model = build_model(
        spec["model"], num_features=FEATURES, num_classes=CLASSES, hidden=HIDDEN,
        seed=seeds_mod.derived_seed(SEED, seeds_mod.STREAM_MODEL_INIT),
    )
    global_flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach()

    def one_round(devices: range) -> tuple[float, float]:
        total = torch.zeros_like(global_flat)
        data_s = 0.0
        start = time.perf_counter()
        for dev in devices:
            t0 = time.perf_counter()
            x, y = data.client_data(dev)
            data_s += time.perf_counter() - t0
            local = copy.deepcopy(model)
            opt = torch.optim.SGD(local.parameters(), lr=LR)
            gen = torch.Generator().manual_seed(seeds_mod.client_seed(SEED, 0, dev))
            for _ in range(EPOCHS):
                order = torch.randperm(len(y), generator=gen)
                for lo in range(0, len(y), BATCH):
                    idx = order[lo : lo + BATCH]
                    opt.zero_grad()
                    F.cross_entropy(local(x[idx]), y[idx]).backward()
                    opt.step()
            delta = torch.nn.utils.parameters_to_vector(local.parameters()).detach() - global_flat
            total += len(y) * delta
        seconds = time.perf_counter() - start
        assert torch.isfinite(total).all()
        return seconds, data_s

    one_round(range(min(clients, 10)))  # warm-up: first autograd / optimizer calls
    results = [one_round(range(clients)) for _ in range(spec.get("repeats", 1))]
    return {"round_s": [r[0] for r in results], "data_s": min(r[1] for r in results)}


def _worker_flower(spec: dict[str, Any]) -> dict[str, Any]:
    """The same scenario and strategy on Flower's simulation engine (fedsim's Flower backend)."""
    from fedsim.flower.simulation import FlowerSimulation
    from fedsim.scenario import scenario_from_dict

    scenario = scenario_from_dict(
        scenario_dict(
            spec["model"], clients=spec["clients"], devices=spec["clients"], rounds=spec["rounds"],
            threads=1, backend="flower",  # Flower's parallelism: one actor per CPU, one thread each
        )
    )
    with tempfile.TemporaryDirectory(prefix="fedsim-bench-") as tmp:
        times_file = Path(tmp) / "times.txt"
        os.environ[TIMES_ENV] = str(times_file)
        start = time.perf_counter()
        result = FlowerSimulation(scenario, run_dir=None, progress=False).run()
        wall = time.perf_counter() - start
        stamps = []
        for line in times_file.read_text(encoding="utf-8").splitlines():
            event, rnd, stamp = line.split()
            stamps.append((event, int(rnd), float(stamp)))
    return {"round_s": round_seconds(stamps), "wall_s": wall, "clients": [m["clients"] for m in result.metrics]}


def _worker_matmul(spec: dict[str, Any]) -> dict[str, Any]:
    return {"gflops": matmul_gflops(spec["threads"])}


def _worker_dpftrl(spec: dict[str, Any]) -> dict[str, Any]:
    """The Gboard-scale DP-FTRL round on the showcase's word LSTM (:mod:`fedsim_bench.gboard`).

    Whole ``run_round`` calls (check-ins, selection, the devices' data, local training, clipping,
    validation, the sum, tree noise, accounting), split into the seconds the engine waited for
    client training (inside the trainer's chunk stream) and the rest (the server's work); the
    FLOPs of one client update; and, on one pinned core, the cryptographic noise for a
    1.3M-parameter model (``noise_params``).
    """
    from fedsim.engine import Simulation
    from fedsim.privacy.tree_noise import TreeNoise
    from fedsim.scenario import scenario_from_dict
    from fedsim_bench.gboard import scenario
    from fedsim_bench.model_zoo import client_flops

    raw = scenario(clients=spec["clients"], population=spec["population"], rounds=spec["rounds"], threads=spec["threads"])
    raw["data"].update(spec.get("data", {}))
    sim = Simulation(scenario_from_dict(raw), progress=False)
    trainer = sim.trainer
    waited = [0.0]
    cohort_stream = trainer.train_cohort

    def timed_stream(*args: Any, **kwargs: Any) -> Any:
        chunks = cohort_stream(*args, **kwargs)
        while True:
            start = time.perf_counter()
            try:
                chunk = next(chunks)
            except StopIteration:
                waited[0] += time.perf_counter() - start
                return
            waited[0] += time.perf_counter() - start
            yield chunk

    # warm-up outside the timed rounds: worker processes started, first kernels run (a run pays
    # this once, not per round)
    from fedsim.builders import cohort_tasks

    warm = list(cohort_tasks(sim.data, 0, 0, range(min(2 * spec["threads"], sim.data.num_devices))))
    for _chunk in trainer.train_cohort(sim.params, iter(warm), sim.base_config):
        pass
    trainer.train_cohort = timed_stream  # type: ignore[method-assign]
    round_wall, training_s = [], []
    clients = []
    for r in range(spec["rounds"]):
        waited[0] = 0.0
        start = time.perf_counter()
        row = sim.run_round(r)
        round_wall.append(time.perf_counter() - start)
        training_s.append(waited[0])
        # a DP run publishes no exact count: the engine's private diagnostics hold it
        clients.append(sim.diagnostics[-1]["clients"] if row and sim.diagnostics else 0)
    trainer.train_cohort = cohort_stream  # type: ignore[method-assign]
    engine_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # the population's mean examples per device (every device, as selection draws from all of them)
    examples = [sim.data.num_examples(d) for d in range(sim.data.num_devices)]
    out: dict[str, Any] = {
        "run_round_s": round_wall, "training_wait_s": training_s, "clients": clients, "local_params": int(sim.params.numel()),
        "flops_per_update": client_flops(sim), "engine_maxrss": engine_maxrss,
        "flops_examples": sim.data.num_examples(0), "examples_per_client": sum(examples) / len(examples),
        "trainer": trainer.describe(),
    }
    if spec.get("noise_params"):
        # the cryptographic noise (AES-128-CTR + four 53-bit polar-method normals per coordinate), on
        # one core: one Gaussian draw (DP-FedAvg's round), and the efficient tree's round
        from fedsim.privacy import csprng
        from fedsim.privacy.noise import TAG_ROUND, NoiseKey, NoiseSource

        source = NoiseSource(NoiseKey.generate())
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        # on one core, literally: pinned to one CPU for the measurement (where the OS allows it),
        # so the figure does not depend on migrations between cores shared with other work
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        if affinity:
            os.sched_setaffinity(0, {min(affinity)})
        try:
            n, steps = spec["noise_params"], spec["noise_rounds"]
            draws = []
            for r in range(steps):
                start = time.perf_counter()
                source.normal((TAG_ROUND, r), n)
                draws.append(time.perf_counter() - start)
            out["gaussian_noise_s"] = min(draws)
            out["noise_kernel"] = "compiled" if csprng.compiled_available() else "numpy"
            # side by side: the NumPy reference path of the same sampler (the same bits, no Numba)
            numpy_draws = []
            for r in range(steps):
                start = time.perf_counter()
                csprng.standard_normal(source.key, (TAG_ROUND, r), n, compiled=False)
                numpy_draws.append(time.perf_counter() - start)
            out["gaussian_noise_numpy_s"] = min(numpy_draws)
            tree = TreeNoise(n, DP_NOISE_MULTIPLIER * DP_CLIP, seed=source, estimator="efficient")
            tree.step(0)
            start = time.perf_counter()
            for r in range(1, steps + 1):
                tree.step(r)
            out["noise_s_per_round"] = (time.perf_counter() - start) / steps
        finally:
            torch.set_num_threads(previous)
            if affinity:
                os.sched_setaffinity(0, affinity)
    return out


WORKERS = {
    "fedsim": _worker_fedsim,
    "naive": _worker_naive,
    "flower": _worker_flower,
    "matmul": _worker_matmul,
    "dpftrl": _worker_dpftrl,
}


def _add_workload_workers() -> None:
    from fedsim_bench.model_zoo import WORKERS as ZOO

    WORKERS.update(ZOO)
    from fedsim_bench.pflpeer import worker_export

    WORKERS["pfl-export"] = worker_export


_add_workload_workers()


def run_worker(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in this process with the spec's torch thread count."""
    if kind not in WORKERS:
        raise ValueError(f"unknown benchmark worker {kind!r}; known: {', '.join(sorted(WORKERS))}")
    torch.set_num_threads(int(spec.get("threads", 1)))
    return WORKERS[kind](spec)


def main(argv: list[str] | None = None) -> int:
    """``python -m fedsim_bench.workers KIND SPEC``: print one measurement as a JSON line."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("error: usage: python -m fedsim_bench.workers KIND 'SPEC-JSON'", file=sys.stderr)
        return 2
    result = run_worker(args[0], json.loads(args[1]))
    result["_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
