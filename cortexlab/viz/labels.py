"""Axis labels shared by the figure builders."""
from __future__ import annotations

from collections.abc import Sequence


def token_labels(tokens: Sequence[str] | None, n: int) -> list[str]:
    """'i:token' for each of n positions (short enough for an axis), or the positions alone without tokens."""
    if tokens is None:
        return [str(i) for i in range(n)]
    if len(tokens) != n:
        raise ValueError(f"{len(tokens)} tokens for {n} positions")
    return [f"{i}:{t!r}"[:24] for i, t in enumerate(tokens)]
