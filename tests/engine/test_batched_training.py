"""Batched cohort training equals the per-client reference loop; training never aliases params."""

from __future__ import annotations

import torch

from clients.sgd import SGDTrainer
from fedsim.models import build_model, get_flat
from fedsim.types import ClientTask, TrainConfig


def _task(device: int, n: int, num_features: int, dtype: torch.dtype = torch.float32) -> ClientTask:
    gen = torch.Generator().manual_seed(10_000 + device)
    x = torch.randn(n, num_features, generator=gen, dtype=dtype)
    y = torch.randint(0, 10, (n,), generator=gen)
    return ClientTask(device, x, y, seed=777 + device)


def test_training_a_client_leaves_the_global_params_untouched() -> None:
    model = build_model("mlp", num_features=12, num_classes=10, hidden=8, seed=1)
    params = get_flat(model)
    before = params.clone()
    result = SGDTrainer(model).train_client(params, _task(0, 40, 12), TrainConfig(round=0, lr=0.5, local_epochs=2, batch_size=8))
    assert torch.equal(params, before)
    assert result.delta.abs().max() > 1e-3
    # the batched path too, including a group of one client (no broadcasting involved)
    from clients.batched import BatchedSGD

    for tasks in ([_task(0, 40, 12)], [_task(0, 40, 12), _task(1, 9, 12)]):
        chunk = BatchedSGD(model).train_chunk(params, tasks, TrainConfig(round=0, lr=0.5, local_epochs=2, batch_size=8))
        assert torch.equal(params, before)
        assert chunk.deltas.abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# batched == loop

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from torch import nn  # noqa: E402

from clients.batched import BatchedSGD, supports  # noqa: E402
from fedsim.engine.aggregation import UpdateAccumulator  # noqa: E402

# sizes cover: empty device, one example, fewer than a batch, exact multiples, a short last batch
SIZES = [37, 0, 1, 16, 5, 64, 33, 17, 48, 2]


def _tasks(num_features: int, dtype: torch.dtype, sizes: list[int] = SIZES) -> list[ClientTask]:
    return [_task(i, n, num_features, dtype) for i, n in enumerate(sizes)]


def _model(name: str, num_features: int, dtype: torch.dtype) -> nn.Module:
    return build_model(name, num_features=num_features, num_classes=10, hidden=12, seed=5).to(dtype)


@pytest.mark.parametrize("name", ["logreg", "mlp"])
@pytest.mark.parametrize("clip", [None, 0.3])
def test_batched_equals_per_client_loop_in_float64(name: str, clip: float | None) -> None:
    model = _model(name, 20, torch.float64)
    params = get_flat(model).double()
    tasks = _tasks(20, torch.float64)
    config = TrainConfig(round=3, lr=0.2, local_epochs=2, batch_size=16, clip_norm=clip)
    loop = SGDTrainer(model, batched=False)
    expected = [loop.train_client(params, t, config) for t in tasks]
    chunk = BatchedSGD(model).train_chunk(params, tasks, config)

    ref = torch.stack([r.delta.double() for r in expected])
    assert chunk.deltas.dtype == torch.float64
    # the loop rounds its local model to float32 (get_flat): 1e-6 is far below any algorithmic
    # difference (another shuffle or a missed short batch changes deltas by ~1e-2)
    torch.testing.assert_close(chunk.deltas, ref, rtol=0, atol=1e-6)
    assert ref.abs().max() > 1e-2
    assert np.array_equal(chunk.device_ids, np.arange(len(tasks)))
    assert chunk.num_examples.tolist() == SIZES
    assert chunk.rounds is not None and set(chunk.rounds.tolist()) == {3}
    torch.testing.assert_close(chunk.losses, torch.tensor([r.loss for r in expected], dtype=torch.float32), rtol=1e-5, atol=1e-6)
    assert torch.all(chunk.deltas[1] == 0) and chunk.losses[1] == 0  # the device with no data
    if clip is not None:
        norms = torch.linalg.vector_norm(chunk.deltas, dim=1)
        assert torch.all(norms <= clip * (1 + 1e-12))
        assert (norms > clip * 0.999).sum() >= 5  # clipping was active


def test_a_different_shuffle_is_detected_by_the_tolerance() -> None:
    model = _model("mlp", 20, torch.float64)
    params = get_flat(model).double()
    tasks = _tasks(20, torch.float64)
    config = TrainConfig(round=0, lr=0.2, local_epochs=1, batch_size=16)
    reseeded = [ClientTask(t.device_id, t.x, t.y, t.seed + 1) for t in tasks]
    a = BatchedSGD(model).train_chunk(params, tasks, config).deltas
    b = BatchedSGD(model).train_chunk(params, reseeded, config).deltas
    assert (a - b).abs().max() > 1e-3


def test_grouping_does_not_change_results() -> None:
    model = _model("mlp", 20, torch.float64)
    params = get_flat(model).double()
    tasks = _tasks(20, torch.float64)
    config = TrainConfig(round=0, lr=0.1, local_epochs=1, batch_size=8, clip_norm=0.5)
    whole = BatchedSGD(model).train_chunk(params, tasks, config)
    trainer = BatchedSGD(model)
    trainer.group = 3
    grouped = trainer.train_chunk(params, tasks, config)
    torch.testing.assert_close(grouped.deltas, whole.deltas, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["logreg", "mlp"])
def test_engine_path_float32_sums_match_the_loop(name: str) -> None:
    """What the engine sees: chunks from train_cohort, validated and summed by the server."""
    model = _model(name, 30, torch.float32)
    params = get_flat(model)
    tasks = _tasks(30, torch.float32, SIZES * 3)
    config = TrainConfig(round=0, lr=0.1, local_epochs=1, batch_size=16, clip_norm=1.0)

    def reduce(trainer: SGDTrainer) -> tuple[torch.Tensor, list[int]]:
        acc = UpdateAccumulator(
            num_params=params.numel(), round=0, clip_norm=1.0, weighting="examples", ledger=None, num_devices=len(tasks)
        )
        sizes = []
        for chunk in trainer.train_cohort(params, iter(tasks), config, chunk_size=7):
            sizes.append(len(chunk.device_ids))
            assert acc.add(chunk).all()
        return acc.result().delta_sum, sizes

    batched_trainer = SGDTrainer(model)
    assert batched_trainer.batched is not None
    fast, sizes = reduce(batched_trainer)
    slow, _ = reduce(SGDTrainer(model, batched=False))
    assert max(sizes) <= 7 and sum(sizes) == len(tasks)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    assert slow.abs().max() > 1e-1


def test_unsupported_models_fall_back_to_the_loop() -> None:
    model = nn.Sequential(nn.Linear(20, 8), nn.Tanh(), nn.Linear(8, 10))
    assert not supports(model)
    assert supports(_model("mlp", 20, torch.float32)) and supports(_model("logreg", 20, torch.float32))
    trainer = SGDTrainer(model)
    assert trainer.batched is None
    params = get_flat(model)
    tasks = _tasks(20, torch.float32, [10, 3])
    config = TrainConfig(round=0, lr=0.1, local_epochs=1, batch_size=4)
    (chunk,) = list(trainer.train_cohort(params, tasks, config))
    expected = trainer.train_client(params, tasks[0], config).delta
    assert torch.equal(chunk.deltas[0], expected)
    with pytest.raises(ValueError, match="nn.Sequential stacks of nn.Linear / nn.ReLU"):
        BatchedSGD(model)


def test_scenario_can_switch_the_batched_path_off() -> None:
    from fedsim.engine import run_scenario
    from fedsim.scenario import load_scenario, parse_override

    from ..conftest import SCENARIOS

    def run(batched: bool) -> list[dict]:
        sc = load_scenario(SCENARIOS / "quickstart.toml", [parse_override("rounds=3"), parse_override(f"client.batched={str(batched).lower()}")])
        return run_scenario(sc).metrics

    fast, slow = run(True), run(False)
    for a, b in zip(fast, slow, strict=True):
        assert a["clients"] == b["clients"]
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=0.02)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)


def test_concurrent_groups_give_identical_chunks_and_restore_threads() -> None:
    model = _model("mlp", 30, torch.float32)
    params = get_flat(model)
    tasks = _tasks(30, torch.float32, SIZES * 4)
    config = TrainConfig(round=1, lr=0.1, local_epochs=2, batch_size=8, clip_norm=0.5)
    trainer = BatchedSGD(model)
    trainer.group = 3
    one = list(trainer.train_cohort(params, iter(tasks), config, chunk_size=7, workers=1))
    threads = torch.get_num_threads()
    three = list(trainer.train_cohort(params, iter(tasks), config, chunk_size=7, workers=3))
    assert torch.get_num_threads() == threads
    assert len(one) == len(three) > 10
    for a, b in zip(one, three, strict=True):
        assert np.array_equal(a.device_ids, b.device_ids)
        assert torch.equal(a.deltas, b.deltas) and torch.equal(a.losses, b.losses)


def test_engine_threads_do_not_change_results() -> None:
    from fedsim.engine import run_scenario
    from fedsim.scenario import load_scenario, parse_override

    from ..conftest import SCENARIOS

    def run(threads: int) -> torch.Tensor:
        sc = load_scenario(SCENARIOS / "quickstart.toml", [parse_override("rounds=2"), parse_override(f"engine.threads={threads}")])
        return run_scenario(sc).params

    assert torch.equal(run(1), run(2))


def test_groups_fit_the_cache_budget_and_never_cross_a_block() -> None:
    import clients.batched as batched

    model = _model("mlp", 30, torch.float32)
    trainer = BatchedSGD(model)
    sizes = [5, 40, 3, 3, 64, 1, 0, 7] * 6
    tasks = _tasks(30, torch.float32, sizes)
    per_client = trainer.num_params  # budget so that about four small clients fit
    old = batched.GROUP_ELEMENTS
    batched.GROUP_ELEMENTS = 4 * (per_client + 10 * 30)
    try:
        groups = list(trainer._group_stream(iter(tasks), chunk_size=11))
    finally:
        batched.GROUP_ELEMENTS = old
    assert [t.device_id for g in groups for t in g] == list(range(len(tasks)))  # in order, all once
    start = 0
    for g in groups:
        n_max = max(t.num_examples for t in g)
        assert len(g) == 1 or len(g) * (per_client + n_max * 30) <= 4 * (per_client + 10 * 30)
        assert start // 11 == (start + len(g) - 1) // 11  # inside one block of chunk_size
        start += len(g)
    assert len({len(g) for g in groups}) > 1  # sizes adapt to the clients' data


def test_concurrent_workers_pull_the_task_stream_themselves() -> None:
    """The devices' data (the task generator) is produced on the worker threads, in order."""
    import threading

    model = _model("logreg", 20, torch.float32)
    params = get_flat(model)
    tasks = _tasks(20, torch.float32, SIZES * 3)
    pulled_on: list[str] = []

    def source():
        for task in tasks:
            pulled_on.append(threading.current_thread().name)
            yield task

    trainer = BatchedSGD(model)
    trainer.group = 2
    config = TrainConfig(round=0, lr=0.1, local_epochs=1, batch_size=8)
    chunks = list(trainer.train_cohort(params, source(), config, chunk_size=5, workers=2))
    assert np.concatenate([c.device_ids for c in chunks]).tolist() == list(range(len(tasks)))
    assert len(pulled_on) == len(tasks)
    assert all(name.startswith("fedsim-group-") for name in pulled_on)
    assert not any(t.name.startswith("fedsim-group-") for t in threading.enumerate())  # all joined


def test_concurrent_training_reports_a_failing_task_source_and_stops() -> None:
    import threading

    model = _model("logreg", 20, torch.float32)
    params = get_flat(model)
    tasks = _tasks(20, torch.float32, SIZES * 3)

    def source():
        yield from tasks[:7]
        raise RuntimeError("device 7: data file is corrupt")

    trainer = BatchedSGD(model)
    trainer.group = 2
    config = TrainConfig(round=0, lr=0.1, local_epochs=1, batch_size=8)
    seen = []
    with pytest.raises(RuntimeError, match="device 7: data file is corrupt"):
        for chunk in trainer.train_cohort(params, source(), config, chunk_size=5, workers=2):
            seen.extend(chunk.device_ids.tolist())
    assert seen == list(range(len(seen))) and len(seen) <= 7
    # a consumer that stops early does not leave threads behind either
    stream = trainer.train_cohort(params, iter(tasks), config, chunk_size=5, workers=2)
    next(stream)
    stream.close()
    assert not any(t.name.startswith("fedsim-group-") for t in threading.enumerate())


def test_engine_keeps_freed_memory_for_reuse_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    import platform

    from fedsim.engine import allocator

    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setenv("FEDSIM_KEEP_FREED_MEMORY", "0")
    assert allocator.keep_freed_memory() is False
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.delenv("FEDSIM_KEEP_FREED_MEMORY")
    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert allocator.keep_freed_memory() is expected
    if expected:
        # freed memory is reused: allocating and freeing data-sized blocks faults in no new pages
        import resource

        blocks = [torch.empty(64 * 784).fill_(1.0) for _ in range(64)]
        del blocks
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            blocks = [torch.empty(64 * 784).fill_(1.0) for _ in range(64)]
            del blocks
        assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 64 * 49  # < one batch of fresh pages
