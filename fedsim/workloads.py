"""A scenario's workload: its federated dataset, its model and its task, built and checked.

One place that the in-process engine, the Ray workers and the Flower ClientApp all call, so a
SuperNode loads its own device's data and builds the same model through the same contract as the
simulator. Problems (a loader or builder that fails, a model whose output does not fit the
targets, a dataset that does not match its spec) are :class:`~fedsim.errors.ScenarioError` naming
the scenario file, the key and the problem, raised before any round runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedsim.data.federated import FederatedData
from fedsim.data.loaders import build_federated_data
from fedsim.errors import ScenarioError
from fedsim.models import (
    ModelError,
    build_model,
    check_model,
    load_initial_model,
    read_initial_model,
)
from fedsim.registry import UnknownPluginError
from fedsim.tasks import Task


def build_data(scenario: Any) -> FederatedData:
    """The scenario's federated dataset (see :mod:`fedsim.data.loaders`)."""
    return build_federated_data(scenario)


def task_of(data: FederatedData) -> Task:
    """The :class:`~fedsim.tasks.Task` (loss and metrics) of a dataset."""
    return Task(data.spec)


def build_scenario_model(
    scenario: Any, data: FederatedData, *, seed: int = 0, check: bool = True, init: bool = False
) -> nn.Module:
    """The scenario's model for ``data``, parameters initialised from ``seed``.

    With ``init`` and a ``[model] init`` file, the parameters are then the file's (a warm start;
    names and shapes checked, errors on ``model.init``): the server's global model. Copies that
    only receive the server's parameters (trainers, Ray workers, a Flower ClientApp) leave it
    out and never read the file. With ``check`` the model is run on two test inputs and must
    produce logits that fit the task's targets (:func:`fedsim.models.check_model`).
    """
    cfg = scenario.model
    try:
        model = build_model(
            cfg.name, spec=data.spec, hidden=cfg.hidden, params=dict(cfg.params), seed=seed, base_dir=scenario.base_dir
        )
        if init and cfg.init is not None:
            try:
                initial = read_initial_model(cfg.init)
                load_initial_model(model, initial)
            except ModelError as exc:
                raise ScenarioError(str(exc), key="model.init", source=scenario.source) from None
            if cfg.init_sha256 is not None and initial.sha256 != cfg.init_sha256:
                raise ScenarioError(
                    f"{initial.path} has SHA-256 {initial.sha256}, not the scenario's {cfg.init_sha256}: the file "
                    "changed after the scenario was loaded",
                    key="model.init-sha256",
                    source=scenario.source,
                )
        if check:
            check_model(model, task_of(data), torch.as_tensor(data.test_x), cfg.name)
    except ScenarioError:
        raise
    except ModelError as exc:
        raise ScenarioError(str(exc), key="model.name", source=scenario.source) from None
    except UnknownPluginError as exc:
        raise ScenarioError(str(exc), key="model.name", source=scenario.source) from None
    except Exception as exc:
        raise ScenarioError(
            f"model builder {cfg.name!r} failed: {type(exc).__name__}: {exc}", key="model.name", source=scenario.source
        ) from None
    return model
