"""Built-in datasets, registered by name in :data:`fedsim.data.loaders.DATASETS`.

Imported by the registry on its first lookup. ``digits`` (scikit-learn's bundled handwritten
digits) and ``synthetic`` (Gaussian mixtures generated per device) are built by
:func:`fedsim.data.loaders.build_federated_data` from the ``[data]`` section's own keys; other
built-in dataset modules register their loader here.
"""

from __future__ import annotations

from fedsim.data.datasets import load_digits
from fedsim.data.federated import SyntheticData
from fedsim.data.loaders import DATASETS
from fedsim.data.shakespeare import load_shakespeare

DATASETS.register("digits", load_digits)
DATASETS.register("synthetic", SyntheticData)
DATASETS.register("shakespeare", load_shakespeare)
