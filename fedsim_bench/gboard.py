"""The Gboard-scale round of ``fedsim bench``: DP-FTRL on the showcase's word LSTM.

Google's Spanish Gboard model was trained with DP-FTRL on 6,500 devices per round (noise
multiplier 7, at most 6 contributions 313 rounds apart, 2,000 rounds). The showcase
(``scenarios/shakespeare_dp_ftrl.toml``, docs/gboard.md) has the model and the data of that
recipe at laptop scale: next-word prediction on Shakespeare (933 devices, one per speaking
character, 5,000-word vocabulary), an LSTM of 64 units over 32-dimensional embeddings (510k
parameters). Its population is too small for 6,500 clients per round under a 313-round
separation, so the benchmark's population is **synthetic**: ``num-devices`` devices, device ``d``
holding exactly the training text of Shakespeare device ``d mod 933`` (:func:`load`). Each device
is a distinct participant for selection, the participation ledger and the accounting; the
per-client work is the showcase's own.

:func:`scenario` is the round's scenario: the showcase's data, model and client recipe, the
Gboard strategy parameters, ``clients`` per round from ``population`` devices.
"""

from __future__ import annotations

from typing import Any

import torch

from fedsim.data.federated import FederatedData

#: Gboard es-ES DP-FTRL (McMahan & Thakurta 2022): noise multiplier, participation bound and
#: separation, rounds of a training run.
GBOARD_NOISE_MULTIPLIER = 7.0
GBOARD_MAX_PARTICIPATIONS = 6
GBOARD_MIN_SEPARATION = 313
GBOARD_ROUNDS = 2000
#: The showcase's clip norm (scenarios/shakespeare_dp_ftrl.toml).
CLIP_NORM = 0.3


class ReplicatedData(FederatedData):
    """``num_devices`` devices, device ``d`` holding the data of ``inner``'s device ``d mod inner.num_devices``."""

    def __init__(self, inner: FederatedData, num_devices: int) -> None:
        if num_devices < 1:
            raise ValueError(f"num_devices must be >= 1, got {num_devices}")
        self.inner = inner
        self.num_devices = int(num_devices)
        self.spec = inner.spec
        self.test_x, self.test_y = inner.test_x, inner.test_y

    def client_data(self, device_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= device_id < self.num_devices:
            raise IndexError(f"device {device_id} out of range [0, {self.num_devices})")
        return self.inner.client_data(device_id % self.inner.num_devices)

    def num_examples(self, device_id: int) -> int:
        return self.inner.num_examples(device_id % self.inner.num_devices)


def load(num_devices: int | None = None, **shakespeare: Any) -> ReplicatedData:
    """``[data] dataset = "fedsim_bench.gboard:load"``: Shakespeare devices replicated to ``num-devices``.

    Parameters
    ----------
    num_devices:
        Devices of the synthetic population (``[data] num-devices``; default: the plays' own).
    **shakespeare:
        The ``[data]`` keys of :func:`fedsim.data.shakespeare.load_shakespeare` (``level``,
        ``vocab-size``, ``seq-length``, ``min-lines``, ``max-test``, ...).
    """
    from fedsim.data.shakespeare import load_shakespeare

    inner = load_shakespeare(**shakespeare)
    return ReplicatedData(inner, num_devices or inner.num_devices)


def scenario(*, clients: int, population: int, rounds: int, threads: int) -> dict[str, Any]:
    """The Gboard-scale DP-FTRL scenario (a raw, TOML-shaped dict) on the showcase's word LSTM."""
    return {
        "name": "bench-gboard-word-lstm",
        "seed": 0,
        "rounds": rounds,
        "clients-per-round": clients,
        "data": {
            "dataset": "fedsim_bench.gboard:load", "num-devices": population, "level": "word", "vocab-size": 5000,
            "seq-length": 12, "min-lines": 4, "max-test": 1000,
        },
        "model": {"name": "lstm-lm", "embedding": 32, "hidden": 64, "layers": 1},
        "client": {"local-epochs": 1, "batch-size": 8, "lr": 1.0},
        "strategy": {
            "name": "dp-ftrl", "noise-multiplier": GBOARD_NOISE_MULTIPLIER, "clip-norm": CLIP_NORM,
            "server-lr": 2.0, "momentum": 0.0, "max-participations": GBOARD_MAX_PARTICIPATIONS,
            "min-separation": GBOARD_MIN_SEPARATION, "estimator": "efficient",
        },
        "engine": {"threads": threads, "eval-every": 10**6},
    }
