"""A dataset's registration says whether fedsim partitions it (no list of names in the scenario)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from fedsim.data import Dataset
from fedsim.data.loaders import DATASETS, build_federated_data, register_dataset, unregister_dataset
from fedsim.dataset_traits import BUILTIN_TRAITS, dataset_traits
from fedsim.errors import ScenarioError
from fedsim.scenario import scenario_from_dict


def load_blobs(*, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """300 examples of 4 features in 3 classes, no user ids."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, 300)
    x = (rng.normal(size=(300, 4)) + y[:, None]).astype(np.float32)
    return Dataset("blobs", x[:240], y[:240], x[240:], y[240:], 3)


@pytest.fixture
def registered() -> Iterator[None]:
    register_dataset("blobs-partitioned", load_blobs, partitioned=True, max_devices=240)
    register_dataset("blobs-own", load_blobs)
    yield
    for name in ("blobs-partitioned", "blobs-own"):
        unregister_dataset(name)
    assert not dataset_traits("blobs-partitioned").partitioned


def _scenario(dataset: str, **data: object):
    return scenario_from_dict({"name": "reg", "rounds": 1, "clients-per-round": 4, "data": {"dataset": dataset, **data}, "model": {"name": "logreg"}})


def test_a_dataset_registered_as_partitioned_gets_fedsims_devices(registered: None) -> None:
    sc = _scenario("blobs-partitioned")
    assert sc.data.num_devices == 100 and sc.data.partitioner == "iid"
    assert build_federated_data(sc).num_devices == 100
    with pytest.raises(ScenarioError, match="has no user ids; use 'iid' or 'dirichlet'"):
        _scenario("blobs-partitioned", partitioner="natural")
    with pytest.raises(ScenarioError, match="training split has 240 examples, cannot serve 241 devices"):
        _scenario("blobs-partitioned", **{"num-devices": 241})


def test_a_dataset_registered_without_it_keeps_the_scenarios_unset_keys(registered: None) -> None:
    sc = _scenario("blobs-own")
    assert sc.data.num_devices is None and sc.data.partitioner is None


def test_the_builtins_say_it_in_their_registration() -> None:
    assert {"digits", "shakespeare", "synthetic"} <= set(DATASETS.names())
    assert dataset_traits("digits").partitioned and dataset_traits("synthetic").partitioned
    assert not dataset_traits("shakespeare").partitioned and not dataset_traits("some.module:load").partitioned
    assert {name: dataset_traits(name) for name in BUILTIN_TRAITS} == BUILTIN_TRAITS
