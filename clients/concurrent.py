"""Training groups of clients on several threads, results in order.

:func:`train_concurrently` is the worker pool behind ``[engine] threads``: every batched path
and the per-client loop hand it a ``train(group) -> CohortChunk`` function.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import torch

from fedsim.types import ClientTask, CohortChunk


def train_concurrently(
    train: Callable[[list[ClientTask]], CohortChunk], groups: Iterator[list[ClientTask]], workers: int
) -> Iterator[CohortChunk]:
    """Train ``groups`` on ``workers`` threads; yield their chunks in group order.

    Each worker pulls the next group itself (under a lock, so the engine's task generator,
    and with it the devices' data generation, runs on the worker that trains them and the
    data is still in that core's cache) and trains it with one torch thread (torch releases the
    GIL inside its kernels). At most ``2 x workers`` groups are taken and not yet consumed, so
    memory stays at a few groups. The consuming thread only hands chunks on (to the server's
    validation and sum). Every group is computed exactly as with one worker, so results do not
    depend on ``workers``.
    """
    intra_op = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per group: workers x 1 threads, never workers x N
    cond = threading.Condition()
    pull_lock = threading.Lock()
    results: dict[int, CohortChunk | BaseException] = {}
    state = {"taken": 0, "consumed": 0, "done": False, "stop": False}
    limit = 2 * workers

    def work() -> None:
        while True:
            with pull_lock:
                with cond:
                    while not state["stop"] and state["taken"] - state["consumed"] >= limit:
                        cond.wait()
                    if state["stop"] or state["done"]:
                        return
                try:
                    group: list[ClientTask] | BaseException = next(groups)
                except StopIteration:
                    with cond:
                        state["done"] = True
                        cond.notify_all()
                    return
                except BaseException as exc:  # a failing task source ends the stream
                    group = exc
                with cond:
                    index = state["taken"]
                    state["taken"] += 1
                    if isinstance(group, BaseException):
                        state["done"] = True
                        results[index] = group
                        cond.notify_all()
                        return
            try:
                item: CohortChunk | BaseException = train(group)
            except BaseException as exc:
                item = exc
            with cond:
                results[index] = item
                cond.notify_all()

    threads = [
        threading.Thread(target=work, name=f"fedsim-group-{i}", daemon=True) for i in range(workers)
    ]
    for t in threads:
        t.start()
    try:
        index = 0
        while True:
            with cond:
                while index not in results and not (state["done"] and index >= state["taken"]):
                    cond.wait()
                if index not in results:
                    break
                item = results.pop(index)
                state["consumed"] += 1
                cond.notify_all()
            if isinstance(item, BaseException):
                raise item
            yield item
            index += 1
    finally:
        with cond:
            state["stop"] = True
            cond.notify_all()
        for t in threads:
            t.join()
        torch.set_num_threads(intra_op)
