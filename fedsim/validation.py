"""Value checks shared by every layer: one place for "a number > 0", "an integer >= k", ...

Each check takes the *name the user wrote* (a scenario key such as ``clip-norm``, a CLI flag, a
field name) and the value, returns the value converted to its plain Python type, and otherwise
raises :class:`ValueError` with a one-line message that starts with that name::

    clip-norm must be a number > 0, got -1.0

Booleans are never numbers here (``True`` is an ``int`` in Python, but ``clip-norm = true`` in a
scenario is a mistake). The scenario loader prefixes the file and section to the message, so the
user sees which file and key to fix.

This module imports nothing from fedsim and may be used from any layer.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any, Literal, overload

__all__ = [
    "MAX_ROUNDS",
    "boolean",
    "choice",
    "finite_number",
    "finite_numbers",
    "int_at_least",
    "is_int",
    "is_number",
    "number_at_least",
    "number_in",
    "positive_int",
    "positive_number",
    "run_id",
]


#: Largest number of rounds a scenario or a privacy plan may ask for (a run of more would take
#: years; a typo such as ``rounds = 100000000000000000000000`` is refused instead of running forever).
MAX_ROUNDS = 10_000_000


def is_number(value: Any) -> bool:
    """A real number that is not a ``bool`` (ints, floats, NumPy scalars)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    """An integer that is not a ``bool`` (``int`` or a NumPy integer)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def finite_number(key: str, value: Any) -> float:
    """``value`` as a finite float."""
    if not is_number(value) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def finite_numbers(key: str, values: Any) -> tuple[float, ...]:
    """``values`` (a list, tuple or array of numbers) as a tuple of finite floats."""
    if isinstance(values, str | bytes) or not hasattr(values, "__iter__"):
        raise ValueError(f"{key} must be a list of numbers, got {values!r}")
    out = []
    for v in values:
        if not is_number(v) or not math.isfinite(v):
            raise ValueError(f"{key} must hold finite numbers, got {v!r}")
        out.append(float(v))
    return tuple(out)


def positive_number(key: str, value: Any) -> float:
    """``value`` as a float that must be finite and > 0."""
    if not is_number(value):
        raise ValueError(f"{key} must be a number > 0, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number > 0, got {value!r}")
    if value <= 0:
        raise ValueError(f"{key} must be > 0, got {value!r}")
    return float(value)


def number_at_least(key: str, value: Any, low: float) -> float:
    """``value`` as a finite float ``>= low``."""
    if not is_number(value) or not math.isfinite(value) or value < low:
        raise ValueError(f"{key} must be a number >= {low:g}, got {value!r}")
    return float(value)


def number_in(
    key: str, value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> float:
    """``value`` as a float in the interval from ``low`` to ``high`` (closed unless ``*_open``)."""
    ok = is_number(value) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{key} must be a number in {interval}, got {value!r}")
    return float(value)


@overload
def int_at_least(key: str, value: Any, low: int, *, optional: Literal[False] = ...) -> int: ...
@overload
def int_at_least(key: str, value: Any, low: int, *, optional: bool) -> int | None: ...
def int_at_least(key: str, value: Any, low: int, *, optional: bool = False) -> int | None:
    """An integer ``>= low`` (or ``None`` when ``optional`` and ``value is None``)."""
    if value is None and optional:
        return None
    if not is_int(value) or value < low:
        extra = " (or omit it)" if optional else ""
        raise ValueError(f"{key} must be an integer >= {low}{extra}, got {value!r}")
    return int(value)


def positive_int(key: str, value: Any) -> int:
    """An integer ``>= 1``."""
    return int_at_least(key, value, 1)


def boolean(key: str, value: Any) -> bool:
    """``value`` as a ``bool``: only ``True`` / ``False`` (not 0, 1 or strings)."""
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def choice(key: str, value: Any, options: Iterable[str]) -> str:
    """One of ``options`` (strings); the message lists them."""
    opts = list(options)
    if not isinstance(value, str) or value not in opts:
        if len(opts) == 2:
            listed = f"{opts[0]!r} or {opts[1]!r}"
        else:
            listed = "one of " + ", ".join(repr(o) for o in opts)
        raise ValueError(f"{key} must be {listed}, got {value!r}")
    return value


#: Hex digits of a run id (128 bits).
RUN_ID_HEX = 32


def run_id(key: str, value: Any) -> str:
    """A run id: exactly 32 hex digits (128 bits), returned lower-cased."""
    if not isinstance(value, str) or len(value) != RUN_ID_HEX or any(c not in "0123456789abcdefABCDEF" for c in value):
        raise ValueError(
            f"{key} must be {RUN_ID_HEX} hex digits (128 bits, e.g. `python -c 'import secrets; "
            f"print(secrets.token_hex(16))'`), got {value!r}"
        )
    return value.lower()
