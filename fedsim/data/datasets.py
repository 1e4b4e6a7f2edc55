"""Embedded datasets (no download at run time).

``digits``: scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes; UCI optical
recognition of handwritten digits), pixel values scaled to [0, 1], split into train and a
held-out test set with a seeded, class-stratified shuffle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Dataset:
    """A centralised classification dataset with a held-out test split."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])


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
