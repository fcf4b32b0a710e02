"""cortexlab.checks: the shared argument validators."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cortexlab.checks import check_bool, check_int, check_number


def test_check_bool_takes_only_true_and_false():
    check_bool("flag", True)
    check_bool("flag", False)
    for bad in (1, 0, "yes", None, np.bool_(True)):
        with pytest.raises(ValueError, match="flag must be True or False"):
            check_bool("flag", bad)


@pytest.mark.parametrize("value, minimum", [(1, 1), (7, 1), (0, 0), (2, 2), (-3, -5)])
def test_check_int_accepts_ints_at_or_above_the_minimum(value, minimum):
    check_int("n", value, minimum)


@pytest.mark.parametrize("value, minimum, message", [
    (0, 1, "n must be a positive int, got 0"),
    (-1, 1, "n must be a positive int, got -1"),
    (1, 2, "n must be an int >= 2, got 1"),
    (-1, 0, "n must be an int >= 0, got -1"),
    (2.0, 1, "n must be a positive int, got 2.0"),
    ("3", 1, "n must be a positive int, got '3'"),
    (None, 1, "n must be a positive int, got None"),
    (np.int64(4), 1, "n must be a positive int, got np.int64(4)"),      # a config holding it cannot be JSON
    (True, 1, "n must be a positive int, got True"),
    (False, 0, "n must be an int >= 0, got False"),
])
def test_check_int_refuses_with_a_message_naming_the_argument(value, minimum, message):
    with pytest.raises(ValueError) as info:
        check_int("n", value, minimum)
    assert str(info.value) == message


def test_check_int_allow_none():
    check_int("max_files", None, allow_none=True)
    check_int("max_files", 3, allow_none=True)
    with pytest.raises(ValueError) as info:
        check_int("max_files", 0, allow_none=True)
    assert str(info.value) == "max_files must be a positive int or None, got 0"
    with pytest.raises(ValueError, match=r"^num_layers must be an int >= 2 or None, got True$"):
        check_int("num_layers", True, 2, allow_none=True)


@pytest.mark.parametrize("value, kwargs", [
    (0.5, {}), (-1e9, {}), (3, {}), (np.float64(0.25), {}),            # np.float64 is a float
    (0, dict(low=0, high=1)), (1, dict(low=0, high=1)), (0.5, dict(low=0, high=1, low_open=True, high_open=True)),
    (math.inf, dict(low=0, allow_inf=True)), (1e-12, dict(low=0, low_open=True)),
])
def test_check_number_accepts_numbers_in_the_interval(value, kwargs):
    check_number("x", value, **kwargs)


@pytest.mark.parametrize("value, kwargs, message", [
    (0, dict(low=0, high=1, low_open=True), "x must be a number in (0, 1], got 0"),
    (1, dict(low=0, high=1, high_open=True), "x must be a number in [0, 1), got 1"),
    (1.5, dict(low=0, high=1), "x must be a number in [0, 1], got 1.5"),
    (-0.1, dict(low=0), "x must be a number in [0, inf), got -0.1"),
    (0, dict(low=0, low_open=True, allow_inf=True), "x must be a number in (0, inf], got 0"),
    (2.5, dict(low=0.5, high=2.25), "x must be a number in [0.5, 2.25], got 2.5"),
    (math.inf, dict(low=0), "x must be a number in [0, inf), got inf"),
    (math.inf, {}, "x must be a finite number, got inf"),
    (-math.inf, dict(allow_inf=True), "x must be a number in (-inf, inf], got -inf"),
    (math.nan, {}, "x must be a finite number, got nan"),
    (math.nan, dict(low=0, allow_inf=True), "x must be a number in [0, inf], got nan"),
    (True, {}, "x must be a finite number, got True"),
    (False, dict(low=0, high=1), "x must be a number in [0, 1], got False"),
    ("0.5", dict(low=0, high=1), "x must be a number in [0, 1], got '0.5'"),
    (None, {}, "x must be a finite number, got None"),
    (np.float32(0.5), {}, "x must be a finite number, got np.float32(0.5)"),
])
def test_check_number_refuses_with_a_message_naming_the_argument(value, kwargs, message):
    with pytest.raises(ValueError) as info:
        check_number("x", value, **kwargs)
    assert str(info.value) == message


def test_check_number_inf_needs_an_open_top():
    with pytest.raises(ValueError, match="^x must be"):
        check_number("x", math.inf, 0, 1, allow_inf=True)         # inf is still above high = 1
    with pytest.raises(ValueError, match="^x must be"):
        check_number("x", math.inf, 0, high_open=True, allow_inf=True)
