"""Centralised datasets (a loader's return value) and the embedded ones (no download at run time).

A :class:`Dataset` is a whole dataset in memory: training arrays of any example shape, a held-out
test split, its :class:`~fedsim.data.spec.DataSpec` and, for naturally partitioned data, the user
id of every training example. fedsim splits it across devices: one device per user id
(``partitioner = "natural"``, the default when user ids are present) or with a partitioner
(``iid``, ``dirichlet``).

``digits``: scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes; UCI optical
recognition of handwritten digits), pixel values scaled to [0, 1], split into train and a
held-out test set with a seeded, class-stratified shuffle. Examples are 64 features; with
``[data] input-shape = [1, 8, 8]`` they are 1x8x8 images (for ``[model] name = "cnn"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedsim.data.spec import DataSpec


@dataclass(frozen=True)
class Dataset:
    """A centralised dataset with a held-out test split.

    Attributes
    ----------
    name:
        For messages.
    x_train, y_train:
        Training inputs ``[n, *input_shape]`` and targets ``[n]`` (classification) or ``[n, L]``
        (next-token).
    x_test, y_test:
        The server-side test split, same layout.
    num_classes:
        Number of classes (vocabulary size for next-token); kept for existing callers, equal to
        ``spec.num_classes``.
    spec:
        The dataset's spec; ``None``: classification with ``input_shape = x_train.shape[1:]``.
    user_ids:
        ``[n]`` user id of every training example (any sortable values), or ``None``. With user
        ids the natural partition is one device per distinct id, in sorted id order.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    spec: DataSpec | None = None
    user_ids: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.spec is None:
            shape = tuple(int(s) for s in np.shape(self.x_train)[1:])
            object.__setattr__(self, "spec", DataSpec("classification", shape, int(self.num_classes)))

    @property
    def num_features(self) -> int:
        """Values per input example."""
        assert self.spec is not None
        return self.spec.num_features


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled digits, features in [0, 1], stratified train/test split."""
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    return _split("digits", x, y, 10, test_fraction, seed)


def _split(name: str, x: np.ndarray, y: np.ndarray, num_classes: int, test_fraction: float, seed: int) -> Dataset:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng([seed, 0xD1617])
    test_idx = []
    for cls in range(num_classes):
        idx = rng.permutation(np.flatnonzero(y == cls))
        test_idx.append(idx[: int(round(len(idx) * test_fraction))])
    test = np.sort(np.concatenate(test_idx))
    train = np.setdiff1d(np.arange(len(y)), test)
    return Dataset(name, x[train], y[train], x[test], y[test], num_classes)


DATASETS = {"digits": load_digits}
