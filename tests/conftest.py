"""Shared fixtures: repository paths and a small, fast scenario."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "scenarios"


@pytest.fixture
def root() -> Path:
    return ROOT


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m fedsim ARGS`` in a subprocess and capture its output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "fedsim", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


# ---------------------------------------------------------------------------------------------
# one Flower deployment (SuperLink, SuperNodes) shared by the deployment tests of a session


@pytest.fixture(scope="session")
def flower_clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """The session's :class:`~tests.flower.harness.SharedCluster` (started on first use)."""
    from .flower.harness import SharedCluster

    shared = SharedCluster(tmp_path_factory.mktemp("flower-shared"), devices=(0, 1))
    try:
        yield shared
    finally:
        shared.close()


@pytest.fixture
def shared_cluster(flower_clusters) -> Iterator:
    """An insecure Flower cluster with SuperNodes ``node-0`` and ``node-1`` (devices 0 and 1) running.

    Shared by the tests of a session: a test may add processes (``flwr run``, more SuperNodes,
    restarted nodes) and kill the base nodes; when it ends the cluster is restored (what it added
    is stopped, the base nodes run again as started). Use a job id and run directory of the
    test's own (the default job id, a Flower run's id, is one); a test that needs TLS, SuperNode
    authentication or other base nodes starts its own with ``running_cluster``.
    """
    with flower_clusters.lend() as cluster:
        yield cluster


# ---------------------------------------------------------------------------------------------
# two workers (pytest-xdist): `make test` runs `pytest -n 2 --dist loadgroup`

#: the modules whose tests borrow the session's Flower cluster (``shared_cluster``): one work unit,
#: run by one worker, so the suite starts that cluster once rather than once per worker
#: (tests/contracts/test_suite_layout.py checks that the list names every such module)
SHARED_CLUSTER_MODULES = (
    "tests/flower/test_deploy.py", "tests/flower/test_resume.py", "tests/flower/test_secagg.py",
)
#: the modules that start Ray (Flower's simulation runtime, the Ray backend, a Ray cluster): one
#: work unit as well, so two Ray instances (each a whole local cluster: GCS, raylet, workers)
#: never start at once on the 2 cores; it runs beside the shared Flower cluster's unit
RAY_MODULES = (
    "tests/engine/test_ray_backend.py", "tests/engine/test_ray_cluster.py",
    "tests/engine/test_warm_start.py", "tests/flower/test_simulation.py",
)
#: module -> xdist work unit
XDIST_GROUPS = {
    **dict.fromkeys(SHARED_CLUSTER_MODULES, "flower-shared-cluster"),
    **dict.fromkeys(RAY_MODULES, "ray"),
}


def _group(nodeid: str) -> str | None:
    return XDIST_GROUPS.get(nodeid.split("::", 1)[0])


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, called only where it is installed
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """``--dist loadgroup``, with the groups of :data:`XDIST_GROUPS` (by module).

    The controller sees node ids only; xdist's own ``xdist_group`` marks reach it by a suffix of
    the node id, which pytest 9.2 no longer lets a plugin write (pytest-xdist issue 1386), so the
    groups are named here by module. Every other test is a unit of its own (xdist's ``load``), a
    marked group (once xdist passes them again) one unit too.
    """
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class ModuleGroupScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid) or super()._split_scope(nodeid)

    return ModuleGroupScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In an xdist worker: the long tests first (the groups', then those marked ``slow``), so that
    no worker is left with a long test at the end while the other idles (xdist hands its units
    out largest first, then in this order). Without xdist (one test file, a plain ``pytest``) the
    collection order stays."""
    if not hasattr(config, "workerinput"):  # not an xdist worker (the controller collects nothing)
        return

    def rank(item: pytest.Item) -> int:
        if _group(item.nodeid) is not None:
            return 0
        return 1 if item.get_closest_marker("slow") is not None else 2

    items.sort(key=rank)  # stable: the collection order within each rank


# ---------------------------------------------------------------------------------------------
# shared builders of the contract suites


def strategy_context(
    num_params: int = 40, *, rounds: int = 16, devices: int = 200, per_round: int = 10, seed: int = 5
):
    """A :class:`~fedsim.strategy.StrategyContext` for unit tests of strategies.

    Its noise source is keyed *publicly* by ``seed`` (``NoiseSource.from_seed``), so tests can
    recompute the noise; a run's engine always gives a secret one.
    """
    from fedsim.privacy.noise import NoiseSource
    from fedsim.strategy import StrategyContext
    from fedsim.types import TrainConfig

    return StrategyContext(
        num_params=num_params,
        num_rounds=rounds,
        num_devices=devices,
        clients_per_round=per_round,
        seed=seed,
        base_train_config=TrainConfig(round=0, lr=0.1, local_epochs=1, batch_size=8),
        noise=NoiseSource.from_seed(seed),
    )


def tiny_scenario(name: str = "tiny", *, rounds: int = 3, per_round: int = 8, devices: int = 40, **sections) -> dict:
    """A raw scenario dict that runs in about a second (logreg on digits unless ``data`` is given)."""
    raw = {
        "name": name,
        "rounds": rounds,
        "clients-per-round": per_round,
        "data": {"num-devices": devices},
        "model": {"name": "logreg"},
    }
    raw.update(sections)
    return raw
