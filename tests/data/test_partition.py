"""Partitioners: each example exactly once; Dirichlet label skew measurable and monotone in alpha."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.data import dirichlet_partition, iid_partition, label_skew, load_digits


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert len(allidx) == n
    assert np.array_equal(np.sort(allidx), np.arange(n))


def test_iid_exact_cover_and_balanced() -> None:
    parts = iid_partition(1000, 37, np.random.default_rng(0))
    _assert_exact_cover(parts, 1000)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("alpha", [0.05, 0.5, 5.0])
def test_dirichlet_exact_cover_no_empty_device(alpha: float) -> None:
    ds = load_digits(seed=0)
    parts = dirichlet_partition(ds.y_train, 100, alpha, np.random.default_rng(1))
    _assert_exact_cover(parts, len(ds.y_train))
    assert min(len(p) for p in parts) >= 1


def test_dirichlet_skew_measurable_and_decreasing_in_alpha() -> None:
    ds = load_digits(seed=0)
    rng = np.random.default_rng
    skew = {a: label_skew(ds.y_train, dirichlet_partition(ds.y_train, 100, a, rng(2)), 10) for a in (0.1, 1.0, 100.0)}
    iid = label_skew(ds.y_train, iid_partition(len(ds.y_train), 100, rng(2)), 10)
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[0.1] > 0.6  # strongly skewed: most devices dominated by a few labels
    assert skew[100.0] < iid + 0.05  # large alpha: no more skew than random dealing


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="alpha must be > 0"):
        dirichlet_partition(np.zeros(10, int), 2, 0.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="cannot split"):
        iid_partition(3, 5, np.random.default_rng(0))


def test_digits_split_is_held_out_and_stratified() -> None:
    ds = load_digits(test_fraction=0.2, seed=0)
    assert len(ds.y_train) + len(ds.y_test) == 1797
    assert abs(len(ds.y_test) / 1797 - 0.2) < 0.01
    assert set(np.unique(ds.y_test)) == set(range(10))
    assert ds.x_train.max() <= 1.0 and ds.x_train.min() >= 0.0
