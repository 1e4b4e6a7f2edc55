"""Real Flower processes on 127.0.0.1 for the deployment tests: a SuperLink, SuperNodes, ``flwr run``.

Every process is started in its own session (its own process group) with a marker in its
environment; :meth:`FlowerCluster.close` stops every process group it started and then every
process that still carries the marker (found by PID in ``/proc``), so nothing outlives a test,
whatever happens in it. Should the test process itself be killed before it can clean up, the
kernel kills the processes it started (``PR_SET_PDEATHSIG``). Flower runs offline: telemetry, update checks and runtime dependency
installation are off, and ``FLWR_HOME`` is private to the cluster.

By default a SuperNode runs its ClientApps with ``--isolation process`` and the executor in
``warm_executor.py``, which forks each ClientApp from a process that has imported torch
and fedsim once (Flower's own executor starts a fresh interpreter per message, seconds each);
``warm=False`` keeps Flower's default (``--isolation subprocess``: the apps load from the
installed FAB; ``test_flower_identity.py`` runs that way). :class:`SharedCluster` lends one
cluster to many tests and restores it between them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tomli_w

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MARKER = "FEDSIM_TEST_CLUSTER"


def die_with_parent() -> None:
    """In a child before ``exec``: get SIGKILL when the parent (the test process) dies.

    Covers a test process that is killed outright (SIGKILL, or SIGTERM, which skips fixture
    finalizers); Flower's own helper processes watch their parents in turn (``--parent-pid``).
    """
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _marked_pids(marker: str) -> list[int]:
    """PIDs of live processes whose environment carries ``MARKER=marker``."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if needle in env.split(b"\0") and ") Z " not in stat:
            found.append(int(entry.name))
    return found


class ForkedProcess:
    """A process this test process did not start itself (the zygote forked it), as much of
    :class:`subprocess.Popen` as the harness uses: ``pid``, ``args``, ``poll`` and ``wait``
    (the exit status is not known here: 0 once it has ended)."""

    def __init__(self, pid: int, args: list[str]) -> None:
        self.pid = pid
        self.args = args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                stat = Path(f"/proc/{self.pid}/stat").read_text()
            except OSError:
                stat = ""
            if not stat or stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                self.returncode = 0
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            time.sleep(0.05)
        return 0


class FlowerCluster:
    """A SuperLink and SuperNodes on 127.0.0.1, stopped (all of it) by :meth:`close`.

    Parameters
    ----------
    workdir:
        Directory for ``FLWR_HOME``, logs, node state directories and run-config files.
    tls:
        Run the SuperLink with TLS (a private CA and certificate from ``scripts/make_certs.sh``;
        SuperNodes and ``flwr`` trust the CA): SuperNodes with their own keys need it.
    supernode_auth:
        Run the SuperLink with ``--enable-supernode-auth`` (TLS only): it admits only SuperNodes
        whose public keys were registered with :meth:`register_supernode`.
    warm:
        Run each SuperNode with ``--isolation process`` and a warm executor
        (``warm_executor.py``: ClientApps forked from a process with torch and fedsim
        imported) instead of Flower's default ``--isolation subprocess`` (a fresh interpreter
        per message).
    """

    def __init__(self, workdir: Path, *, tls: bool = False, supernode_auth: bool = False, warm: bool = True) -> None:
        if supernode_auth and not tls:
            raise ValueError("Flower allows SuperNode authentication only over TLS (tls=True)")
        self.supernode_auth = supernode_auth
        self.warm = warm
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.marker = uuid.uuid4().hex
        self.home = self.workdir / "flwr-home"
        self.home.mkdir(exist_ok=True)
        self.logs = self.workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.link_port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        #: SuperNodes spawned whose executor is not started yet: name -> Runtime API port
        self._unattached: dict[str, int] = {}
        #: node name -> (its --node-config, its private key) as last started
        self.node_configs: dict[str, tuple[str, Path | None]] = {}
        self.env = dict(
            os.environ,
            FLWR_HOME=str(self.home),
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            PYTHONUNBUFFERED="1",
            # SuperExec asks for new tasks every 0.2 s instead of every second
            FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.2",
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            **{MARKER: self.marker},
        )
        self.env.pop("FEDSIM_STATE_DIR", None)
        self.certs: Path | None = None
        #: the warm executors' zygote listens here (a short path: Unix socket paths are limited)
        self.zygote_socket = Path(tempfile.gettempdir()) / f"fedsim-zygote-{self.marker[:16]}.sock"
        link: dict[str, Any] = {"address": f"127.0.0.1:{self.link_port}", "insecure": True}
        if tls:
            self.certs = self.workdir / "certs"
            subprocess.run(
                ["bash", str(ROOT / "scripts" / "make_certs.sh"), str(self.certs)], check=True, capture_output=True, timeout=120
            )
            link = {"address": f"127.0.0.1:{self.link_port}", "root-certificates": str(self.certs / "ca.crt")}
        config = {"superlink": {"default": "test", "test": link}}
        (self.home / "config.toml").write_text(tomli_w.dumps(config), encoding="utf-8")

    # ------------------------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str], *, log_name: str | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{log_name or name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            args,
            cwd=self.workdir,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        """The captured output of process ``name``."""
        path = self.logs / f"{name}.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def start_superlink(self, timeout: float = 60.0) -> None:
        """Start ``flower-superlink`` (``--insecure``, or TLS) and wait until its port accepts connections."""
        if self.certs is None:
            security = ["--insecure"]
        else:
            c = self.certs
            security = ["--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "server.pem"), "--ssl-keyfile", str(c / "server.key")]
            if self.supernode_auth:
                security.append("--enable-supernode-auth")
        if self.warm and "zygote" not in self.procs:
            self._spawn("zygote", [sys.executable, str(Path(__file__).with_name("warm_executor.py")), str(self.zygote_socket)])
        isolation = ["--isolation", "process"] if self.warm else []
        link = self._spawn("superlink", [str(BIN / "flower-superlink"), *security, "--port", str(self.link_port), *isolation])
        deadline = time.monotonic() + timeout
        while not _port_open(self.link_port):
            if self.procs["superlink"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("SuperLink did not start:\n" + self.log("superlink")[-3000:])
            time.sleep(0.2)
        if self.warm:  # the SuperLink's Runtime API shares its one port (and its TLS)
            ca = None if self.certs is None else self.certs / "ca.crt"
            self._start_executor("superlink", "serverapp", self.link_port, link, ca)

    def state_dir(self, device: int) -> Path:
        """The state directory node ``device`` keeps its participation ledger in."""
        return self.workdir / f"node-{device}"

    def node_config(self, device: int, **node_config: Any) -> str:
        """The ``--node-config`` of a SuperNode for ``device``: its ``partition-id``, its ``state-dir``, the rest."""
        config = {"partition-id": device, "state-dir": str(self.state_dir(device)), **node_config}
        return " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())

    def start_supernode(
        self, device: int, *, name: str | None = None, private_key: Path | None = None, **node_config: Any
    ) -> str:
        """Start a SuperNode for ``device`` (``partition-id``), with a persistent ``state-dir``.

        ``private_key``: the node's SuperNode key (``--auth-supernode-private-key``). With
        :attr:`warm`, the node's executor runs as process ``<name>.exec``, logging to the node's
        log, and :meth:`kill` of the node kills it too.
        """
        name = self._spawn_supernode(device, name=name, private_key=private_key, **node_config)
        self._attach_executors()
        return name

    def _spawn_supernode(
        self, device: int, *, name: str | None = None, private_key: Path | None = None, **node_config: Any
    ) -> str:
        """Start the SuperNode process; with :attr:`warm` its executor follows in :meth:`_attach_executors`."""
        name = name or f"node-{device}"
        if name in self.procs and self.procs[name].poll() is None:
            raise RuntimeError(f"{name} is already running")
        text = self.node_config(device, **node_config)
        self.node_configs[name] = (text, private_key)
        runtime_port = free_port()
        self._spawn(
            name,
            [
                str(BIN / "flower-supernode"),
                *(["--insecure"] if self.certs is None else ["--root-certificates", str(self.certs / "ca.crt")]),
                "--superlink", f"127.0.0.1:{self.link_port}",
                "--port", str(runtime_port),
                "--node-config", text,
                *(["--auth-supernode-private-key", str(private_key)] if private_key is not None else []),
                *(["--isolation", "process"] if self.warm else []),
            ],
        )
        if self.warm:
            self._unattached[name] = runtime_port
        return name

    def _attach_executors(self, timeout: float = 120.0) -> None:
        """Start the executor of every SuperNode spawned without one, once its Runtime API listens
        (an executor started earlier backs off for seconds between connection attempts); a node
        that ended first (e.g. refused by the SuperLink) gets none."""
        deadline = time.monotonic() + timeout
        while self._unattached:
            for name, port in list(self._unattached.items()):
                node = self.procs[name]
                if node.poll() is not None:
                    del self._unattached[name]
                elif _port_open(port):
                    del self._unattached[name]
                    self._start_executor(name, "clientapp", port, node, None)
            if self._unattached:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SuperNode(s) {sorted(self._unattached)} did not open their Runtime API in {timeout:g} s")
                time.sleep(0.1)

    def _start_executor(self, name: str, task: str, port: int, parent: subprocess.Popen, ca: Path | None) -> None:
        """The warm SuperExec of process ``name`` (``<name>.exec``, logging to ``name``'s log), forked by the zygote."""
        request = {
            "task": task, "runtime_api_address": f"127.0.0.1:{port}", "parent_pid": parent.pid,
            "root_certificates": None if ca is None else str(ca), "log": str(self.logs / f"{name}.log"),
        }
        deadline = time.monotonic() + 180  # the zygote's imports, on a loaded machine
        while True:
            zygote = self.procs["zygote"]
            if zygote.poll() is not None:
                raise RuntimeError("the warm executor's zygote ended:\n" + self.log("zygote")[-3000:])
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                    conn.settimeout(60)
                    conn.connect(str(self.zygote_socket))
                    conn.sendall((json.dumps(request) + "\n").encode())
                    pid = int(json.loads(conn.makefile("r").readline())["pid"])
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise RuntimeError("the warm executor's zygote did not start:\n" + self.log("zygote")[-3000:]) from None
                time.sleep(0.1)
        self.procs[f"{name}.exec"] = ForkedProcess(pid, [f"SuperExec of {name}"])

    def serverapp_pids(self) -> list[int]:
        """Live ServerApp processes of this cluster (``flwr-serverapp``, or forked by the warm executor)."""
        executor = self.procs.get("superlink.exec")
        found = []
        for pid in _marked_pids(self.marker):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if b"flwr-serverapp" in cmdline or (executor is not None and ppid == executor.pid):
                found.append(pid)
        return found

    def register_supernode(self, public_key: Path) -> None:
        """``flwr supernode register PUBLIC_KEY``: let a SuperNode with this key connect."""
        out = subprocess.run(
            [str(BIN / "flwr"), "supernode", "register", str(public_key), "test"],
            cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=120,
        )
        if out.returncode != 0:
            raise RuntimeError(f"flwr supernode register {public_key} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to process ``name``'s whole process group (and a SuperNode's executor's) and reap it."""
        names = [n for n in (name, f"{name}.exec") if n in self.procs]
        for n in names:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.procs[n].pid, sig)
        for n in names:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.procs[n].wait(timeout=15)

    def start_run(self, run_config: dict[str, Any]) -> str:
        """Start ``flwr run <repo> test --stream --run-config <file>``; return its process name."""
        config_file = self.workdir / f"run-config-{uuid.uuid4().hex[:8]}.toml"
        config_file.write_text(tomli_w.dumps(run_config), encoding="utf-8")
        name = f"flwr-{config_file.stem}"
        self._spawn(name, [str(BIN / "flwr"), "run", str(ROOT), "test", "--stream", "--run-config", str(config_file)])
        return name

    def wait_run(self, name: str, *, timeout: float = 240.0) -> subprocess.CompletedProcess:
        """Wait for the ``flwr run`` started as ``name``; its output is ``stdout``."""
        proc = self.procs[name]
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(name)
            raise RuntimeError(f"flwr run did not finish in {timeout:g} s:\n{self.log(name)[-4000:]}") from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, self.log(name), "")

    def flwr_run(self, run_config: dict[str, Any], *, timeout: float = 240.0) -> subprocess.CompletedProcess:
        """Start a run and wait for it to end."""
        return self.wait_run(self.start_run(run_config), timeout=timeout)

    def close(self) -> None:
        """Stop every process this cluster started, and everything they started."""
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for _ in range(3):  # anything that left its process group (ClientApps, ServerApps)
            pids = _marked_pids(self.marker)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
        with contextlib.suppress(FileNotFoundError):
            self.zygote_socket.unlink()

    def survivors(self) -> list[int]:
        """PIDs of live processes started by this cluster (empty after :meth:`close`)."""
        return _marked_pids(self.marker)

    def __enter__(self) -> FlowerCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_scenario(path: Path, table: dict[str, Any]) -> Path:
    """Write a scenario TOML file."""
    path.write_text(tomli_w.dumps(table), encoding="utf-8")
    return path


def read_run(run_dir: Path) -> dict[str, Any]:
    """A finished run directory's summary, metrics rows and (when present) participation ledger."""
    out: dict[str, Any] = {
        "summary": json.loads((run_dir / "summary.json").read_text()),
        "metrics": [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line],
    }
    for name in ("participation.json", "ledger.json"):
        if (run_dir / name).exists():
            out[name.split(".")[0]] = json.loads((run_dir / name).read_text())
    # a DP run keeps exact counts, rejections and the participation ledger in private/
    private = run_dir / "private"
    if (private / "diagnostics.jsonl").exists():
        out["diagnostics"] = [json.loads(line) for line in (private / "diagnostics.jsonl").read_text().splitlines() if line]
        out["private_summary"] = json.loads((private / "summary.json").read_text())
    if (private / "flower-events.jsonl").exists():  # device-level events a DP run does not log
        out["events"] = [json.loads(line) for line in (private / "flower-events.jsonl").read_text().splitlines() if line]
    if (private / "participation.json").exists():
        out["participation"] = json.loads((private / "participation.json").read_text())
    return out


@contextlib.contextmanager
def running_cluster(workdir: Path, **options: Any) -> Iterator[FlowerCluster]:
    """A :class:`FlowerCluster` with its SuperLink up; afterwards no process it started survives."""
    c = FlowerCluster(workdir, **options)
    try:
        c.start_superlink()
        yield c
    finally:
        c.close()
    assert c.survivors() == [], "processes outlived the cluster"


class SharedCluster:
    """One insecure :class:`FlowerCluster` lent to test after test: a SuperLink and SuperNodes.

    :meth:`lend` gives the cluster with the SuperLink and the SuperNodes of ``devices`` (names
    ``node-<device>``, default node config) running, starting it on first use; afterwards it
    restores it for the next test: every process the test added (``flwr run``, SuperNodes) is
    stopped, SuperNodes gracefully (they leave the SuperLink's node list). A cluster a test left in doubt (a ServerApp still running; a base process, SuperLink
    or SuperNode, killed or restarted: a killed SuperNode stays on the SuperLink's node list for
    a while) is closed, and the next test gets a fresh one. Tests keep their own run directories
    and job ids (participation ledgers in the node state directories are per job).

    Parameters
    ----------
    workdir:
        Directory for the clusters (one sub-directory per cluster started).
    devices:
        The devices (``partition-id``) with a SuperNode of their own.
    """

    def __init__(self, workdir: Path, devices: tuple[int, ...] = (0, 1), **options: Any) -> None:
        self.workdir = Path(workdir)
        self.devices = devices
        self.options = options
        self.cluster: FlowerCluster | None = None
        self.started = 0
        #: the base processes as lent to the running test
        self._lent: dict[str, Any] = {}

    @property
    def base(self) -> set[str]:
        """The processes that belong to the shared cluster."""
        nodes = {f"node-{d}" for d in self.devices}
        return {"zygote", "superlink", "superlink.exec", *nodes, *(f"{n}.exec" for n in nodes)}

    @contextlib.contextmanager
    def lend(self) -> Iterator[FlowerCluster]:
        """The cluster, its base SuperNodes running; restored (or closed) when the test ends."""
        if self.cluster is None:
            self.started += 1
            self.cluster = FlowerCluster(self.workdir / f"cluster-{self.started}", **self.options)
            try:
                self.cluster.start_superlink()
                for device in self.devices:
                    self.cluster._spawn_supernode(device)
                self.cluster._attach_executors()
            except BaseException:
                self.close()
                raise
        try:
            self._lent = {n: self.cluster.procs[n] for n in self.base if n in self.cluster.procs}
            yield self.cluster
        finally:
            self.restore()

    def restore(self) -> None:
        """Stop what the last test added; close the cluster if it cannot be trusted for the next."""
        c = self.cluster
        if c is None:
            return
        # what the test added; a SuperNode stopped gracefully (SIGTERM) leaves the SuperLink's list
        for name in [n for n, p in c.procs.items() if n not in self.base and p.poll() is None]:
            c.kill(name, signal.SIGTERM)
            if c.procs[name].poll() is None:
                c.kill(name)
        deadline = time.monotonic() + 20  # a ServerApp ends shortly after its `flwr run`
        while c.serverapp_pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        # a base process that ended or was replaced: a killed SuperNode stays on the SuperLink's
        # node list until its heartbeat expires (a minute), and later tests must not see it
        changed = any(c.procs.get(n) is not p or p.poll() is not None for n, p in self._lent.items())
        if changed or c.serverapp_pids():
            self.close()

    def close(self) -> None:
        """Stop the cluster; afterwards no process it started survives."""
        c, self.cluster = self.cluster, None
        if c is not None:
            c.close()
            assert c.survivors() == [], "processes outlived the cluster"


def check_ran(proc: subprocess.CompletedProcess, cluster: FlowerCluster) -> None:
    """``flwr run`` succeeded; otherwise fail with the tails of its output and of the SuperLink's log."""
    assert proc.returncode == 0, proc.stdout[-4000:] + cluster.log("superlink")[-2000:]


def wait_for_round(run_dir: Path, round: int, timeout: float) -> None:
    """Block until ``run_dir/metrics.jsonl`` has ``round`` rows (fail after ``timeout`` seconds)."""
    path = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and sum(1 for line in path.read_text().splitlines() if line) >= round:
            return
        time.sleep(0.2)
    raise AssertionError(f"round {round} did not complete within {timeout:g} s")


def wait_for_log(cluster: FlowerCluster, name: str, text: str, timeout: float) -> None:
    """Block until process ``name``'s output contains ``text`` (fail after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in cluster.log(name):
            return
        time.sleep(0.2)
    raise AssertionError(f"{name} did not print {text!r} within {timeout:g} s:\n{cluster.log(name)[-3000:]}")


def run_id_of(cluster: FlowerCluster, name: str, timeout: float = 120.0) -> int:
    """The Flower run id that ``flwr run`` process ``name`` started (from its output)."""
    wait_for_log(cluster, name, "Successfully started run ", timeout)
    text = cluster.log(name)
    return int(text.split("Successfully started run ", 1)[1].split()[0])


def wait_for_received(cluster: FlowerCluster, node: str, run_id: int, server_round: int, timeout: float) -> None:
    """Block until SuperNode ``node`` has received (message and content) its message of round
    ``server_round`` of run ``run_id`` (fail after ``timeout`` seconds)."""
    header = f"[RUN {run_id}, ROUND {server_round}]"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = cluster.log(node)
        if header in text and "Received successfully" in text.split(header, 1)[1]:
            return
        time.sleep(0.2)
    raise AssertionError(f"{node} did not receive its round {server_round} message of run {run_id} within {timeout:g} s")
