"""Datasets, partitioners and federated (per-device) data access."""

from fedsim.data.datasets import DATASETS, Dataset, load_digits
from fedsim.data.federated import FederatedData, PartitionedData, SyntheticData
from fedsim.data.partition import dirichlet_partition, iid_partition, label_skew

__all__ = [
    "DATASETS",
    "Dataset",
    "FederatedData",
    "PartitionedData",
    "SyntheticData",
    "dirichlet_partition",
    "iid_partition",
    "label_skew",
    "load_digits",
]
