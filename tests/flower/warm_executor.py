"""SuperExecs that fork each ServerApp and ClientApp from a process with its imports done.

``flower-superlink --isolation process`` and ``flower-supernode --isolation process`` leave
running the apps to a separate SuperExec that connects to their Runtime API. Flower's own
(``flower-superexec``) starts every ``flwr-serverapp`` and ``flwr-clientapp`` as a fresh
interpreter, which imports Flower, torch and fedsim again for every task: every message of
every round on a SuperNode, seconds each on a loaded 2-core machine.

This file is a *zygote*: a process that imports those modules once and then, asked over a Unix
socket, forks a SuperExec for a SuperLink or a SuperNode. Each SuperExec is Flower's
``run_superexec`` loop with one change, its executor: a task is run by Flower's own
``run_serverapp`` or ``run_clientapp`` (what ``flwr-serverapp`` and ``flwr-clientapp`` run) in
a child forked from the SuperExec. Everything an app does (pull its task, install the FAB, load
the app, run, push its output) is Flower's code, unchanged; only the interpreter start and the
imports are done once instead of once per task, and a SuperExec starts at once. One difference
follows: Flower finds fedsim's app modules already imported (from the repository the FAB is
built from), so the installed FAB's copy of them is not what runs; a deployment test that must
load the app from the FAB uses Flower's own executor (``FlowerCluster(warm=False)``).

Forking is safe here because no process that forks holds a lock another thread may hold: the
zygote starts no thread and runs no torch operation (torch starts its OpenMP pool at the first
parallel operation; NumPy's OpenBLAS stops its workers around a fork itself), and a SuperExec's
only other thread is Flower's parent-process monitor, which sleeps and checks a PID. Should the
imports ever start a Python thread, every task is started as Flower starts it (a fresh
``flwr-serverapp`` / ``flwr-clientapp`` process).

Protocol: ``python warm_executor.py SOCKET``; a client connects, sends one JSON line
``{"task": "serverapp"|"clientapp", "runtime_api_address": ..., "parent_pid": ...,
"root_certificates": null|path, "log": path}`` and reads one JSON line ``{"pid": ...}``: the
SuperExec, in a session of its own, logging to ``log``, which stops when ``parent_pid`` (its
SuperLink or SuperNode) ends.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from queue import Queue
from typing import Any

# the imports every task needs, done once here (imports only: no torch op runs in this process)
import numpy  # noqa: F401
import sklearn.datasets  # noqa: F401  (the digits data)
import torch  # noqa: F401
from flwr.supercore.constant import TaskType
from flwr.supercore.logger import mirror_output_to_queue, restore_output
from flwr.supercore.superexec import run_superexec as superexec
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult, SubprocessExecutor
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.superlink.runtime import run_serverapp
from flwr.supernode.runtime.run_clientapp import run_clientapp

import fedsim.flower.client_app  # noqa: F401
import fedsim.flower.server_app  # noqa: F401

TASKS = {"serverapp": TaskType.SERVER_APP, "clientapp": TaskType.CLIENT_APP}


def _run_task(spec: ExecutionSpec) -> None:
    """In a task's child: what ``flwr-serverapp`` / ``flwr-clientapp`` run for the task."""
    certificates = validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure)
    if spec.task_type == TaskType.SERVER_APP:
        log_queue: Queue[str | None] = Queue()
        mirror_output_to_queue(log_queue)
        run_serverapp(
            runtime_api_address=spec.runtime_api_address, log_queue=log_queue, token=spec.token,
            insecure=spec.insecure, certificates=certificates, parent_pid=spec.parent_pid,
            runtime_dependency_install=spec.runtime_dependency_install,
        )
        restore_output()
    else:
        run_clientapp(
            runtime_api_address=spec.runtime_api_address, token=spec.token, insecure=spec.insecure,
            certificates=certificates, parent_pid=spec.parent_pid,
            runtime_dependency_install=spec.runtime_dependency_install,
        )


def _in_child(body: Any) -> None:
    """Run ``body()`` in a forked child and leave with its exit code, never returning to the caller."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        body()
        code = 0
    except SystemExit as exit_:  # Flower's processes end with sys.exit(code)
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # noqa: BLE001 - shown in the log, then the child's exit code says it
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


class ForkExecutor:
    """Run each task of one type in a forked child (Flower's ``Executor`` protocol)."""

    def __init__(self, task_type: TaskType, *, fork: bool) -> None:
        self.task_type = task_type
        self.fork = fork
        self.fallback = SubprocessExecutor()
        self.children: set[int] = set()

    def get_eligible_capacity(
        self, supported_task_types: set[TaskType], *, insecure: bool = False, root_certificates_path: str | None = None
    ) -> tuple[set[TaskType], set[str]]:
        """This executor's task type only, without a capacity limit."""
        return supported_task_types & {self.task_type}, set()

    def wait_for_capacity(self, task_type: TaskType | None = None, **_: object) -> None:
        """Forking has no capacity gate."""

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """Fork; the child runs the task as Flower's app process would, and exits."""
        if not self.fork:
            return self.fallback.launch(spec)
        pid = os.fork()
        if pid:
            self.children.add(pid)
            return LaunchResult.accepted()

        def task() -> None:
            if spec.suppress_output:  # as Flower's executor does for a ServerApp
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
            _run_task(spec)

        _in_child(task)

    def reconcile(self) -> None:
        """Reap finished children."""
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def close(self) -> None:
        """Stop children still running."""
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _superexec(request: dict[str, Any], *, fork: bool) -> None:
    """In a SuperExec's child: Flower's SuperExec loop with the forking executor."""
    os.setsid()
    log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    if not fork:
        print("warm executor: the imports started a thread; every task starts as a fresh process", flush=True)
    executor = ForkExecutor(TASKS[request["task"]], fork=fork)
    superexec.get_executor = lambda *_, **__: executor
    certificates = request.get("root_certificates")
    superexec.run_superexec(
        runtime_api_address=request["runtime_api_address"],
        insecure=certificates is None,
        root_certificates_path=certificates,
        parent_pid=int(request["parent_pid"]),
        runtime_dependency_install=False,
    )


def serve(path: Path) -> None:
    """Fork a SuperExec for every request on the Unix socket ``path``, until killed."""
    fork = threading.active_count() == 1
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    server.settimeout(0.5)
    while True:
        with contextlib.suppress(ChildProcessError):  # reap SuperExecs that ended
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        with conn:
            request = json.loads(conn.makefile("r").readline())
            pid = os.fork()
            if pid == 0:
                server.close()
                conn.close()
                _in_child(functools.partial(_superexec, request, fork=fork))
            conn.sendall((json.dumps({"pid": pid}) + "\n").encode())


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
