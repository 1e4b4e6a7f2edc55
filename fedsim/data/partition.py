"""Partitioners: split a centralised dataset into per-device index sets.

Every example is assigned to exactly one device. ``iid`` shuffles and deals evenly;
``dirichlet`` draws, for every class, the share each device gets from Dirichlet(alpha)
(Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification"): small alpha gives strong label skew, large alpha approaches IID;
``natural`` makes one device per distinct user id (real cross-device data comes this way).
"""

from __future__ import annotations

import numpy as np


def iid_partition(num_examples: int, num_devices: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle the indices and deal them into ``num_devices`` near-equal parts."""
    _check(num_examples, num_devices)
    perm = rng.permutation(num_examples)
    return [np.sort(part) for part in np.array_split(perm, num_devices)]


def dirichlet_partition(
    labels: np.ndarray, num_devices: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Label-skewed split: for each class, device shares ~ Dirichlet(alpha * 1).

    A device may end up with few examples when ``alpha`` is small; every device gets at least one
    example when there are at least as many examples as devices (examples are moved from the
    largest devices to empty ones, which keeps "each example exactly once").
    """
    labels = np.asarray(labels)
    _check(len(labels), num_devices)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    parts: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(num_devices, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
        for dev, piece in enumerate(np.split(idx, cuts)):
            parts[dev].append(piece)
    out = [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]
    # Give empty devices one example each, taken from the largest devices.
    for dev in range(num_devices):
        if len(out[dev]) == 0:
            donor = int(np.argmax([len(p) for p in out]))
            out[dev], out[donor] = out[donor][-1:], out[donor][:-1]
    return [np.sort(p.astype(np.int64)) for p in out]


def natural_partition(user_ids: np.ndarray) -> tuple[list[np.ndarray], list]:
    """One device per distinct user id: ``(parts, names)``, devices in sorted id order.

    ``parts[d]`` are the (sorted) indices of the examples of user ``names[d]``; every example is
    in exactly one part. Ids may be integers or strings (anything NumPy sorts).
    """
    ids = np.asarray(user_ids)
    if ids.ndim != 1:
        raise ValueError(f"user ids must be one-dimensional, got shape {ids.shape}")
    if len(ids) == 0:
        raise ValueError("no examples to partition")
    names, inverse = np.unique(ids, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(names)))[:-1]
    parts = [np.asarray(p, dtype=np.int64) for p in np.split(order, bounds)]
    return parts, [n.item() if hasattr(n, "item") else n for n in names]


def label_skew(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> float:
    """Mean total-variation distance between each device's label distribution and the global one.

    0 for a perfectly balanced split, approaching 1 when every device holds one class only.
    """
    labels = np.asarray(labels)
    global_dist = np.bincount(labels, minlength=num_classes) / len(labels)
    dists = []
    for part in parts:
        if len(part) == 0:
            continue
        local = np.bincount(labels[part], minlength=num_classes) / len(part)
        dists.append(0.5 * np.abs(local - global_dist).sum())
    return float(np.mean(dists))


def _check(num_examples: int, num_devices: int) -> None:
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    if num_examples < num_devices:
        raise ValueError(f"cannot split {num_examples} examples across {num_devices} devices")
