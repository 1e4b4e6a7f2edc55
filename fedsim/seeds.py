"""Seed derivation: every random choice of a run is a pure function of (root seed, stream, round).

Nothing in fedsim draws from a global RNG. Deriving instead of carrying generator state means a
round re-executed after a crash makes exactly the same choices (availability, cohort, client
shuffles), and a checkpoint needs no RNG state beyond the round number.
"""

from __future__ import annotations

import numpy as np

STREAM_PARTITION = 1
STREAM_AVAILABILITY = 2
STREAM_SELECTION = 3
STREAM_CLIENT = 4
STREAM_MODEL_INIT = 5
STREAM_NOISE = 6


def round_rng(seed: int, stream: int, round: int) -> np.random.Generator:
    """Generator for one stream at one round."""
    return np.random.default_rng([seed, stream, round])


def client_seed(seed: int, round: int, device_id: int) -> int:
    """Seed of one device's local randomness in one round (a 63-bit int for torch.Generator)."""
    state = np.random.SeedSequence([seed, STREAM_CLIENT, round, device_id]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def derived_seed(seed: int, stream: int) -> int:
    """A 63-bit seed for a whole stream (model initialisation, noise)."""
    state = np.random.SeedSequence([seed, stream]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))
