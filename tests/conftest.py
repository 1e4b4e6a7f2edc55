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
