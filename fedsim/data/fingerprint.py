"""A fingerprint of a run's federated data, to refuse resuming a run on data other than its own.

A DP run that is resumed re-executes rounds under its secret noise key. On the same data the
re-executed rounds release exactly what they released before; on changed data (one user deleted
from a file, say) they would add the *same* noise to a *different* sum, and the difference of the
two releases would be the exact difference of the sums: one user's clipped update. The run
therefore records :func:`data_fingerprint` when it starts (``private/releases.jsonl``, and in
every checkpoint) and a resume whose data give another fingerprint is refused.

What it covers, by kind of data:

* :class:`~fedsim.data.federated.PartitionedData` (built-in datasets, data files such as CSV,
  NPZ or JSONL, and loaders returning a :class:`~fedsim.data.datasets.Dataset`): **everything**,
  the SHA-256 of the whole training split (inputs and targets), every device's index set (so a
  deleted, added or re-assigned example, or a changed partition, is caught) and the test split.
  It costs one pass over arrays already in memory (about 0.3 s per GB);
* any other :class:`~fedsim.data.federated.FederatedData` (a loader's per-device
  :class:`~fedsim.data.federated.LazyData`, synthetic data): the number of devices, every
  device's example count when the data know them without loading (``LazyData`` given
  ``num_examples``; :class:`~fedsim.data.federated.SyntheticData`), the content of
  :data:`SAMPLE_DEVICES` devices spread over the population (the first and the last among them)
  and the test split. A change confined to the content of devices outside the sample, with their
  counts unchanged, is not seen here; the release record's digests still catch it in every
  re-executed round the change would alter (``fedsim.engine.releases``).

The fingerprint is secret (a digest of the data lets whoever holds candidate data test it): it is
kept in the run's private files and checkpoints only, never published.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from fedsim.data.federated import (
    CheckedData,
    FederatedData,
    LazyData,
    PartitionedData,
    SyntheticData,
)

__all__ = ["FINGERPRINT_VERSION", "SAMPLE_DEVICES", "data_fingerprint", "fingerprint_diff"]

#: Format of :func:`data_fingerprint`'s result (a change of format is a change of fingerprint).
FINGERPRINT_VERSION = 1
#: Devices whose content is hashed when the data are not all in memory.
SAMPLE_DEVICES = 16


def _update(h: Any, value: Any) -> None:
    """Feed an array (its dtype, shape and bytes) into hash ``h``."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous().numpy()
    arr = np.ascontiguousarray(np.asarray(value))
    h.update(f"{arr.dtype.str}{arr.shape}".encode("ascii"))
    h.update(arr.tobytes())


def _counts(data: FederatedData) -> np.ndarray | None:
    """Every device's example count, if the data know them without loading any device."""
    inner = data.inner if isinstance(data, CheckedData) else data
    if isinstance(inner, PartitionedData):
        return np.asarray([len(p) for p in inner.parts], dtype=np.int64)
    if isinstance(inner, SyntheticData):
        return np.full(inner.num_devices, inner.examples_per_device, dtype=np.int64)
    if isinstance(inner, LazyData) and inner._counts is not None:
        return np.asarray(inner._counts, dtype=np.int64)
    return None


def data_fingerprint(data: FederatedData) -> dict[str, Any]:
    """The fingerprint of ``data``: a small JSON-able dict (see the module docstring).

    Keys: ``version``, ``kind`` (the data's class), ``devices``, ``spec``, ``counts`` (SHA-256 of
    every device's example count, or ``None`` when they are not known without loading),
    ``content`` (SHA-256 of the content hashed), ``coverage`` (``"all"`` or the number of devices
    sampled) and ``test`` (SHA-256 of the test split). Two fingerprints are equal exactly when
    every part is.
    """
    inner = data.inner if isinstance(data, CheckedData) else data
    spec = data.spec
    counts = _counts(data)
    content = hashlib.sha256()
    if isinstance(inner, PartitionedData):
        _update(content, inner._x)
        _update(content, inner._y)
        for part in inner.parts:
            _update(content, np.asarray(part, dtype=np.int64))
        coverage: str | int = "all"
    else:
        n = int(data.num_devices)
        sample = np.unique(np.linspace(0, n - 1, num=min(n, SAMPLE_DEVICES)).round().astype(np.int64))
        for device in sample:
            x, y = data.client_data(int(device))
            content.update(int(device).to_bytes(8, "little"))
            _update(content, x)
            _update(content, y)
        coverage = int(len(sample))
    test = hashlib.sha256()
    _update(test, data.test_x)
    _update(test, data.test_y)
    return {
        "version": FINGERPRINT_VERSION,
        "kind": type(inner).__name__,
        "devices": int(data.num_devices),
        "spec": [spec.task, list(spec.input_shape), int(spec.num_classes)],
        "counts": hashlib.sha256(counts.tobytes()).hexdigest() if counts is not None else None,
        "content": content.hexdigest(),
        "coverage": coverage,
        "test": test.hexdigest(),
    }


_PARTS = {
    "version": "fingerprint format",
    "kind": "kind of data",
    "devices": "number of devices",
    "spec": "examples' shape or classes",
    "counts": "per-device example counts",
    "content": "training data",
    "coverage": "devices sampled",
    "test": "test split",
}


def fingerprint_diff(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, in words (``[]`` when they are equal).

    The number of devices is given with both values (``number of devices 40 -> 39``); digests are
    named, not shown.
    """
    out = []
    for key, label in _PARTS.items():
        if recorded.get(key) != current.get(key):
            if key == "devices":
                out.append(f"{label} {recorded.get(key)} -> {current.get(key)}")
            else:
                out.append(label)
    return out
