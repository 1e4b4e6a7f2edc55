"""Builders: a scenario's data, availability model, strategy, model, trainer and client tasks.

Shared by everything that runs a scenario (the in-process engine, the Ray workers, the Flower
bridge and ClientApp, the benchmarks), so each piece is built one way. Below the engine: imports
contracts, data, population, models and seeds, never the engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from fedsim import seeds, workloads
from fedsim.client import TRAINERS, ClientTrainer
from fedsim.data.federated import FederatedData
from fedsim.models import set_flat
from fedsim.population import (
    AlwaysAvailable,
    Availability,
    BernoulliAvailability,
    DiurnalAvailability,
)
from fedsim.scenario import Scenario, equivalent_deployment
from fedsim.strategy import STRATEGIES, MechanismStrategy, Strategy
from fedsim.types import ClientTask

__all__ = [
    "build_availability",
    "build_data",
    "build_scenario_model",
    "build_strategy",
    "build_trainer",
    "client_task",
    "cohort_tasks",
    "evaluate",
]


def build_data(scenario: Scenario) -> FederatedData:
    """The scenario's federated dataset (:func:`fedsim.workloads.build_data`)."""
    return workloads.build_data(scenario)


def build_availability(scenario: Scenario, *, extra_devices: int = 0, num_devices: int | None = None) -> Availability:
    """The scenario's availability model (for its ``num_devices`` devices, default the scenario's,
    plus ``extra_devices`` canaries)."""
    cfg = scenario.population
    if num_devices is None:
        num_devices = scenario.data.num_devices
    if cfg.availability == "bernoulli":
        return BernoulliAvailability(cfg.check_in_prob)
    if cfg.availability == "diurnal":
        return DiurnalAvailability(
            cfg.check_in_prob,
            cfg.amplitude,
            cfg.period,
            num_devices=num_devices + extra_devices,
            seed=scenario.seed,
        )
    return AlwaysAvailable()


def build_strategy(scenario: Scenario) -> Strategy:
    """The scenario's strategy, built from its ``[strategy]`` parameters (not yet set up)."""
    cls = STRATEGIES.get(scenario.strategy.name, base_dir=scenario.base_dir)
    strategy = cls(**scenario.strategy.params)
    deployment = equivalent_deployment(scenario)
    if deployment is not None and isinstance(strategy, MechanismStrategy):  # else refused when the scenario loads
        strategy.set_equivalent(deployment, clients_per_round=scenario.clients_per_round, num_rounds=scenario.rounds)
    return strategy


def build_scenario_model(scenario: Scenario, data: FederatedData, *, seed: int = 0, init: bool = False) -> torch.nn.Module:
    """The scenario's model sized for ``data`` (parameters initialised from ``seed``; with ``init``,
    the server's global model: the ``[model] init`` file's parameters when it names one)."""
    return workloads.build_scenario_model(scenario, data, seed=seed, init=init)


def build_trainer(scenario: Scenario, model: torch.nn.Module, data: FederatedData | None = None) -> ClientTrainer:
    """The scenario's client trainer for ``model``, training on ``data``'s task."""
    cls = TRAINERS.get(scenario.client.trainer, base_dir=scenario.base_dir)
    trainer = cls(model, **scenario.client.params)
    if data is not None:
        trainer.objective = workloads.task_of(data)
    return trainer


def evaluate(model: torch.nn.Module, params: torch.Tensor, data: FederatedData) -> dict[str, float]:
    """Test metrics of ``params`` on ``data``'s test split (``accuracy``, ``loss``, task extras)."""
    set_flat(model, params)
    return workloads.task_of(data).evaluate(model, data.test_x, data.test_y)


def client_task(data: FederatedData, device_id: int, seed: int) -> ClientTask:
    """One device's work: its local data and the seed of its local randomness."""
    x, y = data.client_data(int(device_id))
    return ClientTask(int(device_id), x, y, int(seed))


def cohort_tasks(data: FederatedData, run_seed: int, round: int, cohort: Iterable[int]) -> Iterator[ClientTask]:
    """The cohort's tasks for ``round``, each seeded with ``client_seed(run_seed, round, device)``."""
    for dev in cohort:
        yield client_task(data, int(dev), seeds.client_seed(run_seed, round, int(dev)))
