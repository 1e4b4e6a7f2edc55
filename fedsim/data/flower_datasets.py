"""Adapter for Flower Datasets partitioners (an extra: ``pip install flwr-datasets``).

Flower users keep their partitioning: a loader returns
``from_partitioner(partitioner, spec=..., test_x=..., test_y=...)``, where ``partitioner`` is a
``flwr_datasets.partitioner.Partitioner`` with its dataset assigned (``partitioner.dataset =
...``, or one taken from a ``FederatedDataset``). Partition ``i`` becomes fedsim device ``i``,
loaded lazily (``partitioner.load_partition(i)``) the first time the device trains, through
:class:`~fedsim.data.federated.LazyData`, so only the devices a round samples are ever read.

A partition is read as columns: ``input_column`` and ``target_column`` of the (Hugging Face)
dataset the partitioner returns, converted with ``with_format("numpy")`` when it offers that;
``transform(x, y) -> (x, y)`` reshapes or scales them (e.g. images to ``[n, 1, 28, 28]``
floats). The result is checked against ``spec`` when loaded, like every user dataset.

Example (a loader file named in ``[data] dataset = "my_data.py:load"``)::

    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import DirichletPartitioner
    from fedsim.data import DataSpec
    from fedsim.data.flower_datasets import from_partitioner

    def load(num_partitions: int = 100):
        part = DirichletPartitioner(num_partitions=num_partitions, partition_by="label", alpha=0.5)
        fds = FederatedDataset(dataset="mnist", partitioners={"train": part})
        test = fds.load_split("test").with_format("numpy")
        scale = lambda x, y: (x.reshape(len(x), 1, 28, 28).astype("float32") / 255, y)
        tx, ty = scale(test["image"], test["label"])
        return from_partitioner(fds.partitioners["train"], spec=DataSpec("classification", (1, 28, 28), 10),
                                test_x=tx, test_y=ty, input_column="image", transform=scale)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fedsim.data.federated import LazyData
from fedsim.data.spec import DataSpec


def from_partitioner(
    partitioner: Any,
    *,
    spec: DataSpec,
    test_x: Any,
    test_y: Any,
    input_column: str = "x",
    target_column: str = "label",
    transform: Callable[[np.ndarray, np.ndarray], tuple[Any, Any]] | None = None,
    cache_size: int = 256,
) -> LazyData:
    """fedsim devices from a Flower Datasets partitioner (partition ``i`` is device ``i``).

    Parameters
    ----------
    partitioner:
        A ``flwr_datasets.partitioner.Partitioner`` with its dataset assigned (anything with
        ``num_partitions`` and ``load_partition(i)`` returning a table of columns).
    spec:
        The dataset's spec (what the model builder receives).
    test_x, test_y:
        The server-side test split.
    input_column, target_column:
        Columns holding the inputs and the targets.
    transform:
        Optional ``(x, y) -> (x, y)`` applied to every partition's columns.
    cache_size:
        Devices kept in memory after loading.
    """
    num = int(partitioner.num_partitions)

    def load(device: int) -> tuple[Any, Any]:
        part = partitioner.load_partition(device)
        if hasattr(part, "with_format"):
            part = part.with_format("numpy")
        try:
            x, y = np.asarray(part[input_column]), np.asarray(part[target_column])
        except KeyError as exc:
            raise ValueError(f"partition {device} has no column {exc.args[0]!r}") from None
        if transform is not None:
            x, y = transform(x, y)
        return np.asarray(x), np.asarray(y).astype(np.int64)

    return LazyData(spec, num, load, test_x=test_x, test_y=test_y, cache_size=cache_size)
