"""Built-in datasets, registered by name in :data:`fedsim.data.loaders.DATASETS`.

Imported by the registry on its first lookup. Their traits (whether fedsim partitions them, how
many devices the digits serve) are :data:`fedsim.dataset_traits.BUILTIN_TRAITS`. ``digits`` (scikit-learn's bundled handwritten
digits) and ``synthetic`` (Gaussian mixtures generated per device) are built by
:func:`fedsim.data.loaders.build_federated_data` from the ``[data]`` section's own keys; other
built-in dataset modules register their loader here.
"""

from __future__ import annotations

from fedsim.data.datasets import load_digits
from fedsim.data.federated import SyntheticData
from fedsim.data.loaders import DatasetLoader, register_dataset
from fedsim.data.shakespeare import load_shakespeare
from fedsim.dataset_traits import BUILTIN_TRAITS


def _register(name: str, loader: DatasetLoader) -> None:
    traits = BUILTIN_TRAITS[name]  # declared where the scenario reads them without importing data
    register_dataset(name, loader, partitioned=traits.partitioned, max_devices=traits.max_devices, data_keys=traits.data_keys)


_register("digits", load_digits)
_register("synthetic", SyntheticData)
_register("shakespeare", load_shakespeare)
