"""A SuperExec that forks each ServerApp or ClientApp from a process with its imports done.

``flower-superlink --isolation process`` and ``flower-supernode --isolation process`` leave
running the apps to a separate SuperExec that connects to their Runtime API. Flower's own
(``flower-superexec``) starts every ``flwr-serverapp`` and ``flwr-clientapp`` as a fresh
interpreter, which imports Flower, torch and fedsim again for every task: every message of
every round on a SuperNode, seconds each on a loaded 2-core machine. This SuperExec is Flower's
``run_superexec`` loop with one change, its executor: a task is run by Flower's own
``run_serverapp`` or ``run_clientapp`` (what ``flwr-serverapp`` and ``flwr-clientapp`` run) in
a child forked from this process, which imported those modules once, before any thread or torch
computation existed in it. Everything an app does (pull its task, install the FAB, load the
app, run, push its output) is Flower's code, unchanged.

Should the imports have started a Python thread (forking a process with threads risks a child
deadlocked on a lock another thread held), every task is started as Flower starts it: a fresh
``flwr-serverapp`` / ``flwr-clientapp`` process. (NumPy's OpenBLAS starts its worker threads
at import and stops them around a fork itself; torch starts its OpenMP pool at the first
parallel operation, which never runs here.)

Run as a script: ``python flower_warm_executor.py serverapp|clientapp --runtime-api-address
HOST:PORT --parent-pid PID [--root-certificates CA]``; it stops when its SuperLink or SuperNode
(``PID``) ends.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from queue import Queue

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
    """In the child: what ``flwr-serverapp`` / ``flwr-clientapp`` run for the task."""
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
        code = 1
        try:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            if spec.suppress_output:  # as Flower's executor does for a ServerApp
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
            _run_task(spec)
            code = 0
        except SystemExit as exit_:  # Flower's apps end with sys.exit(code)
            code = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)  # never return into the parent's loop

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--root-certificates", default=None)
    args = parser.parse_args()
    fork = threading.active_count() == 1
    if not fork:
        print("warm executor: the imports started a thread; every task starts as a fresh process", flush=True)
    executor = ForkExecutor(TASKS[args.task], fork=fork)
    superexec.get_executor = lambda *_, **__: executor
    superexec.run_superexec(
        runtime_api_address=args.runtime_api_address,
        insecure=args.root_certificates is None,
        root_certificates_path=args.root_certificates,
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,
    )


if __name__ == "__main__":
    main()
