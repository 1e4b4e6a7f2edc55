"""fedsim.validation: the one set of value checks every layer uses (message: KEY ..., got VALUE)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsim.validation import (
    choice,
    finite_number,
    int_at_least,
    is_int,
    is_number,
    number_at_least,
    number_in,
    positive_int,
    positive_number,
)


def test_booleans_are_neither_numbers_nor_integers() -> None:
    assert is_number(1) and is_number(0.5) and is_number(np.float32(2)) and is_number(np.int64(3))
    assert not is_number(True) and not is_number("1") and not is_number(None)
    assert is_int(3) and is_int(np.int32(3)) and not is_int(True) and not is_int(3.0)


@pytest.mark.parametrize(
    ("check", "value", "message"),
    [
        (lambda v: positive_number("clip-norm", v), -1.0, "^clip-norm must be > 0, got -1.0$"),
        (lambda v: positive_number("clip-norm", v), "big", "^clip-norm must be a number > 0, got 'big'$"),
        (lambda v: positive_number("clip-norm", v), math.inf, "^clip-norm must be a finite number > 0, got inf$"),
        (lambda v: positive_number("clip-norm", v), True, "^clip-norm must be a number > 0, got True$"),
        (lambda v: finite_number("x", v), math.nan, "^x must be a finite number, got nan$"),
        (lambda v: number_at_least("x", v, 2), 1, "^x must be a number >= 2, got 1$"),
        (lambda v: number_in("momentum", v, 0, 1, high_open=True), 1.0, r"^momentum must be a number in \[0, 1\), got 1.0$"),
        (lambda v: number_in("q", v, 0, 1, low_open=True), 0, r"^q must be a number in \(0, 1\], got 0$"),
        (lambda v: int_at_least("k", v, 1), 2.5, "^k must be an integer >= 1, got 2.5$"),
        (lambda v: int_at_least("k", v, 1, optional=True), 0, r"^k must be an integer >= 1 \(or omit it\), got 0$"),
        (lambda v: positive_int("n", v), False, "^n must be an integer >= 1, got False$"),
        (lambda v: choice("estimator", v, ("vanilla", "efficient")), "x", "^estimator must be 'vanilla' or 'efficient', got 'x'$"),
        (lambda v: choice("mode", v, ("a", "b", "c")), 1, "^mode must be one of 'a', 'b', 'c', got 1$"),
    ],
)
def test_bad_values_give_one_line_naming_the_key(check, value, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check(value)


def test_good_values_come_back_as_plain_python_types() -> None:
    assert positive_number("x", np.float32(0.5)) == 0.5 and type(positive_number("x", 2)) is float
    assert int_at_least("k", np.int64(3), 1) == 3 and type(int_at_least("k", np.int64(3), 1)) is int
    assert int_at_least("k", None, 1, optional=True) is None
    assert number_in("m", 0, 0, 1, high_open=True) == 0.0
    assert choice("e", "vanilla", ("vanilla", "efficient")) == "vanilla"
