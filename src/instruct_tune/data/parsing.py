"""What every format parser shares: the per-row problem, typed field access, and the parsed ``Example``.

A parser turns one source row into an :class:`Example`; the kind's emitter (``kinds.py``) then checks it and
writes the output rows. Parsers raise :class:`RowProblem`; the converter adds the source and row number.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Example", "Message", "Pairs", "Parser", "RowProblem", "as_text", "column", "type_name"]

Message = dict[str, str]

# (chosen, rejected), or (chosen, rejected, margin) when the source gives scores.
Pairs = list[tuple[str, str] | tuple[str, str, float]]


class RowProblem(Exception):
    """A problem with one row; the converter adds the source and row number."""


@dataclass
class Example:
    """One source row, normalized: a full conversation, or a prompt with (chosen, rejected) pairs, or text."""

    conversation: list[Message] | None = None
    label: str = "messages"
    prompt: list[Message] | None = None
    prompt_label: str = "prompt"
    # Deferred so that loading a preference set as prompts does not reject rows for their responses.
    pairs: Callable[[], Pairs] | None = None
    text: str | None = None


# A format's parser: (row, row number) -> the row normalized.
Parser = Callable[[Mapping[str, Any], int], Example]


def type_name(value: Any) -> str:
    """The JSON name of ``value``'s type, for problem messages."""
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


def column(row: Mapping[str, Any], key: str) -> Any:
    """The row's value for a required column."""
    if key not in row:
        raise RowProblem(f"missing column '{key}'")
    return row[key]


def as_text(value: Any, what: str) -> str:
    """``value``, which must be a string (``what`` names it in the problem)."""
    if not isinstance(value, str):
        raise RowProblem(f"{what} is not a string (got {type_name(value)})")
    return value
