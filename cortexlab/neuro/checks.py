"""Argument checks shared by the mechanism modules (each raises a ValueError naming the argument)."""
from __future__ import annotations

import numbers


def check_positive_int(name: str, value) -> None:
    """`value` must be an int >= 1 (a bool is refused)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
