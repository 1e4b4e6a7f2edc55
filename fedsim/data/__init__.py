"""Datasets, partitioners and federated (per-device) data access.

The dataset contract: :class:`DataSpec` (task, example shape, classes / vocabulary, special
tokens), :class:`Dataset` (centralised arrays a loader returns, partitioned by fedsim) and
:class:`FederatedData` (per-device access: :class:`PartitionedData`, :class:`SyntheticData`,
:class:`LazyData`). See :mod:`fedsim.data.loaders` for ``[data] dataset`` names, import paths
and data files.
"""

from fedsim.data.datasets import DATASETS, Dataset, load_digits
from fedsim.data.federated import (
    CheckedData,
    FederatedData,
    LazyData,
    PartitionedData,
    SyntheticData,
)
from fedsim.data.partition import dirichlet_partition, iid_partition, label_skew, natural_partition
from fedsim.data.spec import DataError, DataSpec, check_examples

__all__ = [
    "DATASETS",
    "CheckedData",
    "DataError",
    "DataSpec",
    "Dataset",
    "FederatedData",
    "LazyData",
    "PartitionedData",
    "SyntheticData",
    "check_examples",
    "dirichlet_partition",
    "iid_partition",
    "label_skew",
    "load_digits",
    "natural_partition",
]
