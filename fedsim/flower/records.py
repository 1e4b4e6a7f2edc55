"""Conversion between fedsim's flat parameter vectors and Flower records.

fedsim moves one flat ``float32`` vector per model between clients and server (clipping, noise and
aggregation are one-tensor operations). On the wire, Flower carries an ``ArrayRecord``: here one
named array per model parameter (``"0.weight"``, ``"0.bias"``, ...), in the order of
``model.named_parameters()``, so a Flower user sees an ordinary PyTorch state dict. The same layout
is used for the global model (server -> client) and for a client's delta (client -> server).

Decoding a reply is the first line of the server's validation: the keys, every array's shape and
its dtype must match the model exactly, otherwise the update is rejected with a reason
(``wrong_shape``, ``wrong_dtype``, ``malformed_record``) before it can reach the aggregate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from torch import nn

from fedsim.validation import is_int

#: RecordDict keys used by the fedsim Flower protocol.
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"


class RecordError(ValueError):
    """A client's record does not decode to a valid update; ``reason`` is the rejection reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of a model's parameters, in flat-vector order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, model: nn.Module) -> ParamLayout:
        """Layout of ``model`` (the order of ``parameters_to_vector``)."""
        named = list(model.named_parameters())
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))

    @property
    def num_params(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.shapes))

    def to_arrays(self, flat: torch.Tensor) -> ArrayRecord:
        """Split a flat vector into a named ``ArrayRecord`` (``float32``)."""
        if flat.dim() != 1 or flat.numel() != self.num_params:
            raise ValueError(f"flat vector has shape {tuple(flat.shape)}, layout needs ({self.num_params},)")
        values = flat.detach().to(torch.float32).cpu().numpy()
        out: dict[str, Array] = {}
        start = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = int(np.prod(shape))
            out[name] = Array(np.ascontiguousarray(values[start : start + size].reshape(shape)))
            start += size
        return ArrayRecord(out)

    def to_flat(self, record: Any) -> torch.Tensor:
        """Validate and join an ``ArrayRecord`` into a flat ``float32`` vector.

        Raises
        ------
        RecordError
            With ``reason`` ``"malformed_record"`` (not an ArrayRecord, undecodable arrays),
            ``"wrong_shape"`` (other keys or shapes than the model's) or ``"wrong_dtype"``
            (anything but ``float32``).
        """
        if not isinstance(record, ArrayRecord):
            raise RecordError("malformed_record", f"expected an ArrayRecord, got {type(record).__name__}")
        keys = list(record.keys())
        if keys != list(self.names):
            raise RecordError("wrong_shape", f"arrays {keys} do not match the model's {list(self.names)}")
        parts: list[np.ndarray] = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            try:
                arr = record[name].numpy()
            except Exception as exc:  # a client controls these bytes: any decoding failure rejects
                raise RecordError("malformed_record", f"array {name!r} does not decode: {exc}") from None
            if not isinstance(arr, np.ndarray) or tuple(arr.shape) != shape:
                got = tuple(arr.shape) if isinstance(arr, np.ndarray) else type(arr).__name__
                raise RecordError("wrong_shape", f"array {name!r} has shape {got}, model needs {shape}")
            if arr.dtype != np.float32:
                raise RecordError("wrong_dtype", f"array {name!r} has dtype {arr.dtype}, expected float32")
            parts.append(arr.reshape(-1))
        flat = np.concatenate(parts) if parts else np.empty(0, np.float32)
        return torch.from_numpy(np.ascontiguousarray(flat))


def config_get(config: ConfigRecord, key: str, kind: type, default: Any = ...) -> Any:
    """A typed value from a ConfigRecord; a missing or mistyped key raises ``ValueError``."""
    if key not in config:
        if default is ...:
            raise ValueError(f"config record lacks {key!r}")
        return default
    value = config[key]
    if kind is float and is_int(value):
        value = float(value)
    if not (is_int(value) if kind is int else isinstance(value, kind)):
        raise ValueError(f"config {key!r} must be {kind.__name__}, got {value!r}")
    return value


def dumps(obj: Any) -> str:
    """Compact, key-sorted JSON (for scenario sections sent inside a ConfigRecord)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
