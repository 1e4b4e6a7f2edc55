"""The ``[data]`` section made real: dataset loaders by name, import path or file, and partitioning.

``[data] dataset`` is one of

* a registered name: ``"digits"``, ``"synthetic"``, ``"shakespeare"`` (and whatever a package
  registers with :func:`register_dataset`, which also records whether fedsim partitions it;
  ``DATASETS.register(name, load)`` registers a loader whose data has its own devices);
* an import path ``"mypkg.data:load"`` or a file path ``"path/file.py:load"`` (relative to the
  scenario file first, then the working directory, as strategies are);
* a data file ``"path/data.npz"`` / ``.csv`` / ``.jsonl`` with a user-id column
  (:mod:`fedsim.data.files`), naturally partitioned without code.

The loader contract
-------------------
``load(**params)`` returns either

* a :class:`~fedsim.data.datasets.Dataset` (centralised arrays of any example shape, a test split,
  a :class:`~fedsim.data.spec.DataSpec`, optionally a user id per training example): fedsim splits
  it across devices, naturally (one device per user id; the default when user ids are given) or
  with ``partitioner = "iid"`` / ``"dirichlet"`` into ``num-devices`` devices; or
* a :class:`~fedsim.data.federated.FederatedData` (per-device access, e.g.
  :class:`~fedsim.data.federated.LazyData` for data loaded per device when asked), used as is.

``params`` are the ``[data]`` keys that are not fedsim's own (kebab-case in the file, checked
against the loader's signature when the scenario loads). A loader that declares a parameter
named ``seed``, ``test_fraction``, ``num_devices`` or ``base_dir`` receives the scenario's seed,
``test-fraction``, ``num-devices`` (``None`` when not set) and the scenario file's directory.

Every dataset is checked against its spec before a round runs (the test split and the training
arrays; a user's :class:`FederatedData` on a sample of devices, then every device as it is
loaded): mismatched shapes or labels out of range stop the run with one line naming the dataset,
the device and the problem.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsim.data.datasets import Dataset, load_digits
from fedsim.data.federated import CheckedData, FederatedData, PartitionedData, SyntheticData
from fedsim.data.files import FileFormatError, is_data_file, load_file
from fedsim.data.partition import dirichlet_partition, iid_partition, natural_partition
from fedsim.data.spec import DataError, DataSpec, check_examples
from fedsim.dataset_traits import (
    DEFAULT_NUM_DEVICES,
    DatasetTraits,
    register_traits,
    unregister_traits,
)
from fedsim.errors import ScenarioError
from fedsim.registry import Registry, UnknownPluginError

DatasetLoader = Callable[..., Any]

#: Registered dataset loaders; built-in ones register in :mod:`fedsim.data.builtin`.
DATASETS: Registry[DatasetLoader] = Registry("dataset", builtin_package="fedsim.data.builtin")

#: ``[data]`` values a loader receives when its signature names them.
CONTEXT_PARAMETERS = ("seed", "test_fraction", "num_devices", "base_dir")


def register_dataset(
    name: str, loader: DatasetLoader, *, partitioned: bool = False, max_devices: int | None = None, data_keys: bool = False
) -> None:
    """Register ``loader`` as ``[data] dataset = name``, with how fedsim makes devices of it
    (:class:`~fedsim.dataset_traits.DatasetTraits`: ``partitioned`` by fedsim itself, the
    ``max_devices`` its training split serves, built from ``[data]``'s own keys)."""
    DATASETS.register(name, loader)
    register_traits(name, DatasetTraits(partitioned=partitioned, max_devices=max_devices, data_keys=data_keys))


def unregister_dataset(name: str) -> None:
    """Remove a dataset :func:`register_dataset` registered (for a session or a test), and its traits."""
    DATASETS.unregister(name)
    unregister_traits(name)
#: Devices of a user's FederatedData checked when the run starts (the rest as they are loaded).
SAMPLE_DEVICES = 8


def resolve_loader(name: str, base_dir: Path | None) -> DatasetLoader:
    """The loader callable a ``[data] dataset`` value names (``UnknownPluginError`` if none)."""
    if is_data_file(name):
        return load_file
    loader = DATASETS.get(name, base_dir=base_dir)
    if not callable(loader):
        raise UnknownPluginError(f"dataset {name!r} is not callable (a loader function returning a Dataset or FederatedData)")
    return loader


def resolve_data_file(name: str, base_dir: Path | None) -> Path:
    """A data file path, relative to the scenario's directory first, then the working directory."""
    path = Path(name)
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        return base_dir / path
    return path


def loader_parameters(loader: DatasetLoader) -> tuple[set[str], set[str], bool]:
    """``(accepted, required, takes_any)`` user parameters of a loader (context ones excluded)."""
    sig = inspect.signature(loader)
    accepted, required, takes_any = set(), set(), False
    for pname, p in sig.parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            takes_any = True
            continue
        if p.kind is inspect.Parameter.VAR_POSITIONAL or pname in CONTEXT_PARAMETERS:
            continue
        if loader is load_file and pname == "path":
            continue
        accepted.add(pname)
        if p.default is inspect.Parameter.empty:
            required.add(pname)
    return accepted, required, takes_any


def build_federated_data(scenario: Any) -> FederatedData:
    """The scenario's federated dataset, checked against its spec (errors: :class:`ScenarioError`).

    ``scenario`` is a :class:`fedsim.scenario.Scenario` (its ``data`` section, ``seed``,
    ``clients_per_round``, ``base_dir`` and ``source`` are read).
    """
    try:
        data = _build(scenario)
    except ScenarioError as exc:
        raise exc.with_source(scenario.source) if scenario.source else exc from None
    if scenario.clients_per_round > data.num_devices:
        raise ScenarioError(
            f"must be <= the dataset's {data.num_devices} devices, got {scenario.clients_per_round}",
            key="clients-per-round", source=scenario.source,
        )
    return data


def _build(scenario: Any) -> FederatedData:
    cfg = scenario.data
    name = cfg.dataset
    if name == "synthetic":
        if cfg.input_shape is not None:
            raise ScenarioError("applies to datasets with examples to reshape, not to synthetic data", key="data.input-shape")
        return SyntheticData(
            num_devices=cfg.num_devices or DEFAULT_NUM_DEVICES,
            examples_per_device=cfg.examples_per_device,
            num_features=cfg.num_features,
            num_classes=cfg.num_classes,
            seed=scenario.seed,
        )
    try:
        loader = resolve_loader(name, scenario.base_dir)
    except UnknownPluginError as exc:
        raise ScenarioError(str(exc), key="data.dataset") from None
    except Exception as exc:  # a plug-in file that fails to import
        raise ScenarioError(f"cannot load {name!r}: {type(exc).__name__}: {exc}", key="data.dataset") from None
    context = {
        "seed": scenario.seed,
        "test_fraction": cfg.test_fraction,
        "num_devices": cfg.num_devices,
        "base_dir": scenario.base_dir,
    }
    try:
        if loader is load_file:
            result = load_file(resolve_data_file(name, scenario.base_dir), seed=scenario.seed, test_fraction=cfg.test_fraction, **cfg.params)
        elif loader is load_digits:
            result = load_digits(test_fraction=cfg.test_fraction, seed=scenario.seed)
        else:
            sig = inspect.signature(loader)
            extra = {k: v for k, v in context.items() if k in sig.parameters}
            result = loader(**cfg.params, **extra)
    except ScenarioError:
        raise  # a loader that names the key itself (fedsim.data.shakespeare)
    except (FileFormatError, DataError) as exc:
        raise ScenarioError(str(exc), key="data.dataset") from None
    except Exception as exc:
        raise ScenarioError(f"loader {name!r} failed: {type(exc).__name__}: {exc}", key="data.dataset") from None
    if isinstance(result, Dataset):
        return _partition(scenario, _reshaped(result, cfg.input_shape))
    if isinstance(result, FederatedData):
        return _checked(scenario, result)
    raise ScenarioError(
        f"loader {name!r} returned {type(result).__name__}, not a fedsim.data.Dataset or FederatedData",
        key="data.dataset",
    )


def _reshaped(dataset: Dataset, shape: tuple[int, ...] | None) -> Dataset:
    if shape is None:
        return dataset
    assert dataset.spec is not None
    if dataset.spec.task != "classification":
        raise ScenarioError("reshapes classification inputs only", key="data.input-shape")
    if math.prod(shape) != dataset.spec.num_features:
        raise ScenarioError(
            f"{list(shape)} holds {math.prod(shape)} values, the dataset's examples have {dataset.spec.num_features} "
            f"(shape {list(dataset.spec.input_shape)})",
            key="data.input-shape",
        )
    spec = DataSpec("classification", tuple(shape), dataset.spec.num_classes)
    return Dataset(
        dataset.name,
        np.ascontiguousarray(dataset.x_train).reshape(len(dataset.x_train), *shape),
        dataset.y_train,
        np.ascontiguousarray(dataset.x_test).reshape(len(dataset.x_test), *shape),
        dataset.y_test,
        dataset.num_classes,
        spec=spec,
        user_ids=dataset.user_ids,
    )


def _partition(scenario: Any, dataset: Dataset) -> FederatedData:
    cfg = scenario.data
    assert dataset.spec is not None
    where = f"dataset {cfg.dataset!r}"
    try:
        check_examples(torch.as_tensor(dataset.x_train), torch.as_tensor(dataset.y_train), dataset.spec, f"{where}: training split")
        check_examples(torch.as_tensor(dataset.x_test), torch.as_tensor(dataset.y_test), dataset.spec, f"{where}: test split")
    except DataError as exc:
        raise ScenarioError(str(exc), key="data.dataset") from None
    if dataset.user_ids is not None and len(dataset.user_ids) != len(dataset.y_train):
        raise ScenarioError(
            f"{where}: {len(dataset.user_ids)} user ids for {len(dataset.y_train)} training examples", key="data.dataset"
        )
    partitioner = cfg.partitioner or ("natural" if dataset.user_ids is not None else "iid")
    n = len(dataset.y_train)
    if partitioner == "natural":
        if dataset.user_ids is None:
            raise ScenarioError(f"{where} has no user ids to partition by; use 'iid' or 'dirichlet'", key="data.partitioner")
        parts, names = natural_partition(dataset.user_ids)
        if cfg.num_devices is not None:
            if cfg.num_devices > len(parts):
                raise ScenarioError(
                    f"{where} has {len(parts)} users (one device each), got {cfg.num_devices}", key="data.num-devices"
                )
            parts, names = parts[: cfg.num_devices], names[: cfg.num_devices]
        return PartitionedData(dataset, parts, device_names=names)
    num_devices = cfg.num_devices or DEFAULT_NUM_DEVICES
    if num_devices > n:
        raise ScenarioError(f"{where} has {n} training examples, cannot serve {num_devices} devices", key="data.num-devices")
    from fedsim import seeds  # the run's seed derivation (partition stream)

    rng = seeds.round_rng(scenario.seed, seeds.STREAM_PARTITION, 0)
    if partitioner == "dirichlet":
        if dataset.spec.task != "classification":
            raise ScenarioError("'dirichlet' splits by label: classification datasets only", key="data.partitioner")
        parts = dirichlet_partition(dataset.y_train, num_devices, cfg.alpha, rng)
    else:
        parts = iid_partition(n, num_devices, rng)
    return PartitionedData(dataset, parts)


def _checked(scenario: Any, data: FederatedData) -> FederatedData:
    cfg = scenario.data
    where = f"dataset {cfg.dataset!r}"
    if cfg.partitioner not in (None, "natural"):
        raise ScenarioError(
            f"{where} comes partitioned ({type(data).__name__}); partitioner must be 'natural' or unset",
            key="data.partitioner",
        )
    if cfg.input_shape is not None:
        raise ScenarioError(f"{where} comes partitioned; reshape its examples in the loader", key="data.input-shape")
    try:
        spec = data.spec
        num_devices = int(data.num_devices)
    except AttributeError as exc:
        raise ScenarioError(f"{where}: {exc}", key="data.dataset") from None
    if not isinstance(spec, DataSpec):
        raise ScenarioError(f"{where}: spec must be a fedsim.data.DataSpec, got {type(spec).__name__}", key="data.dataset")
    if num_devices < 1:
        raise ScenarioError(f"{where} has no devices", key="data.dataset")
    if cfg.num_devices is not None and cfg.num_devices != num_devices:
        raise ScenarioError(f"{where} has {num_devices} devices, got {cfg.num_devices} (omit num-devices)", key="data.num-devices")
    checked = CheckedData(data, cfg.dataset)
    try:
        check_examples(torch.as_tensor(data.test_x), torch.as_tensor(data.test_y), spec, f"{where}: test split")
        sample = sorted({int(d) for d in np.linspace(0, num_devices - 1, min(SAMPLE_DEVICES, num_devices))})
        for dev in sample:
            checked.client_data(dev)
    except DataError as exc:
        raise ScenarioError(str(exc), key="data.dataset") from None
    except Exception as exc:
        raise ScenarioError(f"{where}: loading a device failed: {type(exc).__name__}: {exc}", key="data.dataset") from None
    return checked
