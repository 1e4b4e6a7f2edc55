"""What a dataset is: :class:`DataSpec`, the facts a model builder and the task's loss need.

A dataset's spec names its task and the shape of one example:

* ``"classification"``: inputs ``x [n, *input_shape]`` (any numeric dtype), targets ``y [n]``
  (``int64`` in ``[0, num_classes)``); the model maps ``[b, *input_shape]`` to logits
  ``[b, num_classes]``.
* ``"next-token"``: inputs ``x [n, L]`` (``int64`` token ids, ``input_shape = (L,)``), targets
  ``y [n, L]`` (the next token at every position, ``int64`` in ``[0, vocab)``; ``num_classes`` is
  the vocabulary size); the model maps ``[b, L]`` to logits ``[b, L, vocab]``. Target positions
  equal to ``pad_id`` carry no loss; ``pad_id``, ``eos_id`` and every id in ``oov_ids`` are left
  out of the next-token accuracy (as the Gboard papers report it).

:func:`check_examples` checks one device's (or the test split's) arrays against a spec and names
what is wrong, so a bad dataset fails before a round runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from fedsim.validation import int_at_least, is_int

Task = Literal["classification", "next-token"]
TASKS: tuple[str, ...] = ("classification", "next-token")


@dataclass(frozen=True)
class DataSpec:
    """The dataset facts a model and its loss depend on.

    Attributes
    ----------
    task:
        ``"classification"`` or ``"next-token"``.
    input_shape:
        Shape of one input example (``(F,)`` tabular, ``(C, H, W)`` images, ``(L,)`` token
        sequences).
    num_classes:
        Number of classes; for ``"next-token"`` the vocabulary size.
    pad_id:
        Padding token (``"next-token"``): no loss, not counted in accuracy. ``None``: no padding.
    oov_ids:
        Out-of-vocabulary token ids (``"next-token"``), excluded from accuracy.
    eos_id:
        End-of-sequence token (``"next-token"``), excluded from accuracy.
    """

    task: Task
    input_shape: tuple[int, ...]
    num_classes: int
    pad_id: int | None = None
    oov_ids: tuple[int, ...] = ()
    eos_id: int | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(repr(t) for t in TASKS)}, got {self.task!r}")
        shape = tuple(self.input_shape)
        if not shape or any(not is_int(s) or s < 1 for s in shape):
            raise ValueError(f"input_shape must be a non-empty tuple of integers >= 1, got {self.input_shape!r}")
        object.__setattr__(self, "input_shape", shape)
        int_at_least("num_classes", self.num_classes, 2)
        object.__setattr__(self, "oov_ids", tuple(int(i) for i in self.oov_ids))
        if self.task == "next-token":
            if len(shape) != 1:
                raise ValueError(f"a next-token dataset has input_shape (L,), got {shape}")
            for name, value in (("pad_id", self.pad_id), ("eos_id", self.eos_id)):
                if value is not None and not 0 <= value < self.num_classes:
                    raise ValueError(f"{name} must be a token id in [0, {self.num_classes}), got {value!r}")
            for value in self.oov_ids:
                if not 0 <= value < self.num_classes:
                    raise ValueError(f"oov_ids must be token ids in [0, {self.num_classes}), got {value!r}")
        elif self.pad_id is not None or self.oov_ids or self.eos_id is not None:
            raise ValueError("pad_id, oov_ids and eos_id apply to next-token datasets only")

    @property
    def num_features(self) -> int:
        """Values per input example (the product of ``input_shape``)."""
        return math.prod(self.input_shape)

    @property
    def vocab_size(self) -> int:
        """The vocabulary size of a next-token dataset (``num_classes``)."""
        return self.num_classes

    @property
    def target_shape(self) -> tuple[int, ...]:
        """Shape of one target: ``()`` for classification, ``(L,)`` for next-token."""
        return () if self.task == "classification" else self.input_shape

    def excluded_ids(self) -> tuple[int, ...]:
        """Token ids left out of the next-token accuracy (pad, OOV, EOS)."""
        ids = [*self.oov_ids]
        for value in (self.pad_id, self.eos_id):
            if value is not None:
                ids.append(value)
        return tuple(sorted(set(ids)))


class DataError(ValueError):
    """A dataset does not match its spec (shape, dtype or label range); the message says where."""


def check_examples(x: torch.Tensor, y: torch.Tensor, spec: DataSpec, where: str) -> None:
    """Check ``(x, y)`` against ``spec``; raise :class:`DataError` naming ``where`` and the problem.

    Checks: tensors, as many inputs as targets, input shape ``[n, *input_shape]``, target shape
    ``[n]`` / ``[n, L]`` of an integer dtype, targets in range (``pad_id`` allowed), token inputs
    integer and in range, float inputs finite.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise DataError(f"{where}: inputs and targets must be torch tensors, got {type(x).__name__}, {type(y).__name__}")
    if x.dim() < 1 or y.dim() < 1 or x.shape[0] != y.shape[0]:
        raise DataError(f"{where}: {tuple(x.shape)[:1]} inputs but {tuple(y.shape)[:1]} targets")
    n = int(x.shape[0])
    if tuple(x.shape[1:]) != spec.input_shape:
        raise DataError(f"{where}: inputs have shape {tuple(x.shape)}, the dataset's examples are {spec.input_shape}")
    if tuple(y.shape[1:]) != spec.target_shape:
        raise DataError(
            f"{where}: targets have shape {tuple(y.shape)}, the {spec.task} task needs {(n, *spec.target_shape)}"
        )
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise DataError(f"{where}: targets must be integers, got {y.dtype}")
    if n == 0:
        return
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= spec.num_classes:
        bad = low if low < 0 else high
        what = "token" if spec.task == "next-token" else "label"
        raise DataError(f"{where}: {what} {bad} out of range [0, {spec.num_classes})")
    if spec.task == "next-token":
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise DataError(f"{where}: next-token inputs must be integer token ids, got {x.dtype}")
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= spec.num_classes:
            raise DataError(f"{where}: input token {lo if lo < 0 else hi} out of range [0, {spec.num_classes})")
    elif x.dtype.is_floating_point and not bool(torch.isfinite(x).all()):
        raise DataError(f"{where}: inputs contain NaN or infinite values")
