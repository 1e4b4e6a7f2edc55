"""A user dataset for fedsim: ``[data] dataset = "../scripts/custom_data.py:load"``.

fedsim calls ``load(**params)`` with the ``[data]`` keys that are not its own (here ``users`` and
``per-user``), plus ``seed`` / ``test_fraction`` because the signature asks for them, and expects
a :class:`fedsim.data.Dataset` (centralised arrays that fedsim partitions: here naturally, one
device per user id) or a :class:`fedsim.data.FederatedData` (per-device access).

The data: each "user" is a writer with their own style: the embedded digits, shifted by a
per-user brightness offset and contrast, so devices differ the way real users' data do.
"""

from __future__ import annotations

import numpy as np

from fedsim.data import Dataset, DataSpec, load_digits


def load(*, seed: int, test_fraction: float, users: int = 60, per_user: int = 20) -> Dataset:
    """Digits re-styled per user; ``users`` users with up to ``per_user`` examples each."""
    digits = load_digits(test_fraction=test_fraction, seed=seed)
    rng = np.random.default_rng([seed, 2024])
    n = min(len(digits.y_train), users * per_user)
    order = rng.permutation(len(digits.y_train))[:n]
    user_ids = np.arange(n) % users
    contrast = rng.uniform(0.6, 1.4, size=users).astype(np.float32)
    offset = rng.uniform(-0.2, 0.2, size=users).astype(np.float32)
    x = digits.x_train[order] * contrast[user_ids, None] + offset[user_ids, None]
    spec = DataSpec("classification", (64,), 10)
    return Dataset(
        "styled-digits", x.astype(np.float32), digits.y_train[order], digits.x_test, digits.y_test, 10,
        spec=spec, user_ids=user_ids,
    )
