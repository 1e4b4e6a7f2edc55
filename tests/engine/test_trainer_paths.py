"""Every trainer path equals the per-client reference, for every built-in model (float64).

The reference is :meth:`SGDTrainer.train_client` (one client at a time). Unequal device sizes
(empty, one example, short last batch), two epochs and clipping are covered; losses too.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.sgd import SGDTrainer
from fedsim.data import DataSpec
from fedsim.models import build_model
from fedsim.tasks import Task
from fedsim.types import ClientTask, TrainConfig

SIZES = [5, 0, 1, 9, 4, 8, 3]
TEXT = DataSpec("next-token", (6,), 12, pad_id=0, oov_ids=(2,), eos_id=1)
CASES = {
    "logreg": (DataSpec("classification", (5,), 3), {}, ["batched", "vmap", "loop"]),
    "mlp": (DataSpec("classification", (1, 2, 3), 3), {"hidden": 7}, ["batched", "vmap", "loop"]),
    "cnn": (DataSpec("classification", (1, 8, 8), 10), {"channels": (3, 4), "hidden": 8}, ["conv", "vmap", "loop"]),
    "lstm-lm": (TEXT, {"hidden": 8, "embedding": 4}, ["vmap", "loop"]),
    "transformer-lm": (TEXT, {"dim": 8, "heads": 2, "layers": 1}, ["vmap", "loop"]),
}
#: clipping bound per model (both settings are covered across models; clipping is per row either way)
CLIP = {"logreg": None, "mlp": 0.05, "cnn": 0.05, "lstm-lm": None, "transformer-lm": 0.05}
AUTO = {"logreg": "batched", "mlp": "batched", "cnn": "conv", "lstm-lm": "loop", "transformer-lm": "loop"}


def _tasks(spec: DataSpec) -> list[ClientTask]:
    gen = torch.Generator().manual_seed(42)
    tasks = []
    for i, n in enumerate(SIZES):
        if spec.task == "next-token":
            x = torch.randint(0, spec.num_classes, (n, *spec.input_shape), generator=gen)
            y = torch.randint(0, spec.num_classes, (n, *spec.input_shape), generator=gen)
            y[:, -2:] = 0  # padded tails
        else:
            x = torch.randn(n, *spec.input_shape, generator=gen, dtype=torch.float64)
            y = torch.randint(0, spec.num_classes, (n,), generator=gen)
        tasks.append(ClientTask(i, x, y, seed=1000 + i))
    return tasks


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_path_equals_the_per_client_reference(name: str) -> None:
    spec, params, paths = CASES[name]
    clip = CLIP[name]
    model = build_model(name, spec=spec, params=params, seed=7).double()
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    tasks = _tasks(spec)
    config = TrainConfig(round=2, lr=0.3, local_epochs=2, batch_size=4, clip_norm=clip)
    reference = SGDTrainer(model, path="loop")
    reference.objective = Task(spec)
    expected = [reference.train_client(flat, t, config) for t in tasks]
    ref_deltas = torch.stack([r.delta for r in expected])
    assert ref_deltas.abs().max() > 1e-3
    auto = SGDTrainer(model)
    auto.objective = Task(spec)
    assert auto.describe()["path"] == AUTO[name]
    for path in paths:
        # batched threads: tests/engine/test_batched_training.py; the loop on 2 threads and in 2 processes
        settings = {"batched": [(1, "auto")], "vmap": [(1, "auto"), (2, "auto")], "conv": [(1, "auto"), (2, "auto")]}.get(
            path, [(1, "auto"), (2, "threads"), (2, "processes")]
        )
        for workers, pool in settings:
            trainer = SGDTrainer(model, path=path, workers=workers, pool=pool)
            trainer.objective = Task(spec)
            try:
                chunks = list(trainer.train_cohort(flat, iter(tasks), config, chunk_size=3))
            finally:
                trainer.close()
            if path == "loop" and workers == 2:
                assert trainer.describe()["pool"] == f"2 {'worker processes' if pool == 'processes' else 'threads'}"
            assert max(len(c.device_ids) for c in chunks) <= 3
            deltas = torch.cat([c.deltas for c in chunks]).double()
            torch.testing.assert_close(deltas, ref_deltas, rtol=0, atol=1e-9, msg=f"{name} {path} x{workers} {pool}")
            losses = torch.cat([c.losses for c in chunks])
            torch.testing.assert_close(losses, torch.tensor([r.loss for r in expected], dtype=torch.float32), rtol=1e-5, atol=1e-6)
            assert np.array_equal(np.concatenate([c.device_ids for c in chunks]), np.arange(len(tasks)))
            assert torch.all(deltas[1] == 0)
            if clip is not None:
                assert torch.all(torch.linalg.vector_norm(deltas, dim=1) <= clip * (1 + 1e-9))


def test_measure_picks_a_path_and_says_why() -> None:
    spec, params, _ = CASES["mlp"]
    model = build_model("mlp", spec=spec, params=params, seed=1).double()
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    trainer = SGDTrainer(model, path="measure")
    trainer.objective = Task(spec)
    tasks = _tasks(spec) * 3
    config = TrainConfig(round=0, lr=0.1, local_epochs=1, batch_size=4)
    chunks = list(trainer.train_cohort(flat, iter(tasks), config))
    assert sum(len(c.device_ids) for c in chunks) == len(tasks)  # the measured clients are trained too
    info = trainer.describe()
    assert info["path"] in ("batched", "vmap", "loop") and info["reason"].startswith("measured on")
    for path in ("batched", "vmap", "loop"):
        assert f"{path} " in info["reason"]


def test_loop_in_worker_processes_is_bit_for_bit_the_one_process_loop() -> None:
    # float32, as runs train: the worker processes run the same kernels on one thread each
    spec, params, _ = CASES["cnn"]
    model = build_model("cnn", spec=spec, params=params, seed=3)
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    tasks = [ClientTask(t.device_id, t.x.float(), t.y, t.seed) for t in _tasks(spec)] * 4
    config = TrainConfig(round=1, lr=0.2, local_epochs=1, batch_size=4, clip_norm=0.5)
    one = SGDTrainer(model, path="loop", workers=1)
    one.objective = Task(spec)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # workers = 1 is [engine] threads = 1: one torch thread, as in each worker
    try:
        expected = list(one.train_cohort(flat, iter(tasks), config, chunk_size=10))
    finally:
        torch.set_num_threads(threads)
    trainer = SGDTrainer(model, path="loop", workers=2)  # pool = "auto": processes for the loop
    trainer.objective = Task(spec)
    try:
        for _ in range(2):  # the workers persist across rounds
            got = list(trainer.train_cohort(flat, iter(tasks), config, chunk_size=10))
            assert [len(c.device_ids) for c in got] == [len(c.device_ids) for c in expected]
            for a, b in zip(got, expected, strict=True):
                assert torch.equal(a.deltas, b.deltas) and torch.equal(a.losses, b.losses)
                assert np.array_equal(a.device_ids, b.device_ids)
        procs = trainer._procs
        assert procs is not None and len(procs.pids()) == 2 and os.getpid() not in procs.pids()
        assert trainer.describe()["pool"] == "2 worker processes"
        if hasattr(os, "getsid"):  # each worker leads its own session: its own share of CPU time under autogroup
            # a worker the executor started but gave no task yet may still be importing: wait for its start-up
            deadline = time.monotonic() + 60
            while True:
                sessions = {pid: os.getsid(pid) for pid in procs.pids()}
                if all(sid == pid != os.getsid(0) for pid, sid in sessions.items()) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert all(sid == pid != os.getsid(0) for pid, sid in sessions.items()), (sessions, os.getsid(0))
    finally:
        trainer.close()
    assert trainer._procs is None


def test_tasks_sent_to_worker_processes_carry_only_their_own_data() -> None:
    # a client's data is a view into its dataset's tensor; pickling a view sends the whole storage
    from clients.processes import _compact

    x, y = torch.randn(1000, 8), torch.randint(0, 10, (1000,))
    tasks = [ClientTask(d, x[10 * d : 10 * d + 10], y[10 * d : 10 * d + 10], seed=d) for d in range(4)]
    sent = _compact(tasks)
    for a, b in zip(sent, tasks, strict=True):
        assert (a.device_id, a.seed) == (b.device_id, b.seed)
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and a.x.dtype == b.x.dtype
    assert len(pickle.dumps(sent)) < len(pickle.dumps(tasks)) / 20
    own = ClientTask(0, x.clone(), y.clone(), 0)
    assert _compact([own])[0].x is own.x  # a tensor that owns its storage is sent as it is


def test_a_model_a_fresh_interpreter_cannot_rebuild_trains_on_threads() -> None:
    class LocalNet(torch.nn.Module):  # defined in a function: cannot be pickled for a worker process
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 3)
            self.out = torch.nn.Linear(2 * 6 * 6, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.conv(x)).flatten(1))

    spec = CASES["cnn"][0]
    model = LocalNet()
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    tasks = [ClientTask(t.device_id, t.x.float(), t.y, t.seed) for t in _tasks(spec)]
    config = TrainConfig(round=0, lr=0.1, local_epochs=1, batch_size=4)
    auto = SGDTrainer(model, path="loop", workers=2)
    auto.objective = Task(spec)
    chunks = list(auto.train_cohort(flat, iter(tasks), config))
    assert sum(len(c.device_ids) for c in chunks) == len(tasks)
    assert auto.describe()["pool"].startswith("2 threads (threads: the model cannot be sent to worker processes")
    strict = SGDTrainer(model, path="loop", workers=2, pool="processes")
    strict.objective = Task(spec)
    with pytest.raises(ValueError, match='pool = "processes": the model cannot be sent to worker processes'):
        list(strict.train_cohort(flat, iter(tasks), config))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_worker_processes_end_when_their_driver_is_killed() -> None:
    # workers lead their own sessions, so a signal to the driver's process group misses them: they
    # watch the driver and exit with it
    code = (
        "import torch\n"
        "from clients.processes import ProcessGroupPool\n"
        "if __name__ == '__main__':\n"
        "    pool = ProcessGroupPool(torch.nn.Linear(2, 2), None, 2)\n"
        "    print(' '.join(map(str, pool.pids())), flush=True)\n"
        "    import time; time.sleep(120)\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p))
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env, cwd=root)
    try:
        assert driver.stdout is not None
        pids = [int(p) for p in driver.stdout.readline().split()]
        assert len(pids) == 2
    finally:
        driver.kill()
        driver.wait()
    deadline = time.monotonic() + 20
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in pids if _running(p)]
    for pid in alive:  # do not leave them running when the test fails
        os.kill(pid, 9)
    assert not alive, f"worker processes {alive} outlived their killed driver"


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False
