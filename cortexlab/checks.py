"""Argument checks shared across the package; each raises a ValueError that names the argument.

A bool is refused wherever a number is expected (Python counts True as the int 1, but it is never
meant as a count, a size or a rate).
"""
from __future__ import annotations

import math

__all__ = ["check_bool", "check_int", "check_number"]


def check_bool(name: str, value) -> None:
    """`value` must be True or False (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_int(name: str, value, minimum: int = 1, *, allow_none: bool = False) -> None:
    """`value` must be a Python int (not a bool) >= `minimum`; None also passes when `allow_none`. NumPy integers
    are refused: configs holding them could not be written as JSON."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        need = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {need}{' or None' if allow_none else ''}, got {value!r}")


def _bound(x: float) -> str:
    return str(int(x)) if math.isfinite(x) and x == int(x) else str(x)


def check_number(name: str, value, low: float = -math.inf, high: float = math.inf, *,
                 low_open: bool = False, high_open: bool = False, allow_inf: bool = False,
                 allow_none: bool = False) -> None:
    """`value` must be an int or float (not a bool) in the interval from `low` to `high`; None also passes
    when `allow_none`.

    The ends are closed unless `low_open` / `high_open`. The value must be finite, except that +inf
    passes when `allow_inf` (and `high` is inf and closed). A positive number:
    `check_number(name, value, 0, low_open=True)`.
    """
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)   # JSON-writable numbers only
    ok = ok and (math.isfinite(value) or (allow_inf and value == math.inf))
    ok = ok and (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not ok:
        left = "(" if low_open or low == -math.inf else "["
        right = ")" if high_open or (high == math.inf and not allow_inf) else "]"
        need = f"a number in {left}{_bound(low)}, {_bound(high)}{right}"
        if low == -math.inf and high == math.inf and not allow_inf:
            need = "a finite number"
        raise ValueError(f"{name} must be {need}, got {value!r}")
