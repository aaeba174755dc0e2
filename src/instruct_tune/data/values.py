"""Numeric checks of the row converters: scores and margins must be finite numbers.

An infinite score or margin makes the reward model's margin loss infinite (logged as 0.0), so the shared row
validation refuses it, for `data check` and every training stage alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["finite_number", "margin_problem"]


def finite_number(value: Any) -> float | None:
    """`value` as a float when it is a finite number (not a bool); else None. Text numbers (CSV) count."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the float range
        return None
    return number if math.isfinite(number) else None


def margin_problem(column: Any, examples: Iterable[Mapping[str, Any]]) -> str | None:
    """What is wrong with a preference row's margins (its `margin` column, or the score differences of its
    pairs), or None when every one is a finite number."""
    if column is not None and finite_number(column) is None:
        shown = (
            column
            if isinstance(column, (float, int, str)) and not isinstance(column, bool)
            else type(column).__name__
        )
        return f"margin is not a finite number (got {shown!r})"
    for example in examples:
        margin = example.get("margin")
        if margin is not None and not math.isfinite(margin):
            return f"score difference of a pair is {margin} (the scores are too far apart for a float margin)"
    return None
