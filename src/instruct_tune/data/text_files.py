"""Parse the text of local ``.json``, ``.jsonl`` and ``.csv`` files into ``(row_number, row)`` items.

A row that cannot be read comes out as a :class:`DataError` in its place; a file that is something else than
its suffix says (a JSON array saved as ``.jsonl``, JSON saved as ``.csv``) is one DataError saying what it
holds. JSON nesting is bounded (``MAX_DEPTH``): deeper rows would overflow the stack of every later step.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from typing import Any

from .errors import DataError

__all__ = ["MAX_DEPTH", "nesting_depth", "parse_csv_text", "parse_json_text"]

RowItem = tuple[int, "dict[str, Any] | DataError"]

# Chat rows nest 3 levels (row, messages, turn); tool calls a few more. datasets and pyarrow recurse per level.
MAX_DEPTH = 100
_TOO_DEEP = f"JSON nested more than {MAX_DEPTH} levels deep (the most a row may nest)"


def nesting_depth(obj: Any, limit: int = MAX_DEPTH) -> int:
    """Levels of lists and objects in `obj` (a scalar is 0), counted without recursion; stops above `limit`."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _row(source: str, row: int, obj: Any) -> dict[str, Any] | DataError:
    if not isinstance(obj, dict):
        kind = "null" if obj is None else type(obj).__name__
        return DataError(source, f"row is not a JSON object (got {kind})", row=row)
    if nesting_depth(obj) > MAX_DEPTH:
        return DataError(source, _TOO_DEEP, row=row)
    return obj


def parse_json_text(source: str, text: str, suffix: str) -> list[RowItem]:
    """Rows of a ``.json`` file (an array of objects, one object, or JSON lines) or of a ``.jsonl`` file."""
    stripped = text.lstrip()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except RecursionError:
            raise _deep_document(source, text) from None
        except json.JSONDecodeError as e:
            if stripped.startswith("["):
                # An array is one document: a syntax error anywhere makes the whole file unreadable.
                raise DataError(source, f"malformed JSON ({e})") from e
        else:
            if isinstance(data, list):
                return [(i, _row(source, i, obj)) for i, obj in enumerate(data, 1)]
            return [(1, _row(source, 1, data))]
    elif stripped.startswith("["):
        _refuse_array(source, text)
    items: list[RowItem] = []
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028 or \x85, which splitlines() breaks on.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except RecursionError:
            items.append((lineno, DataError(source, _TOO_DEEP, row=lineno)))
            continue
        except json.JSONDecodeError as e:
            items.append((lineno, DataError(source, f"malformed JSON ({e})", row=lineno)))
            continue
        items.append((lineno, _row(source, lineno, obj)))
    return items


def _refuse_array(source: str, text: str) -> None:
    """A ``.jsonl`` file starting with '[' that is one JSON array: say so instead of one error per line."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        first = text.lstrip().split("\n", 1)[0].strip()
        if first == "[":
            raise DataError(
                source,
                "this file starts like one JSON array (its first line is '['), not JSON lines, and that "
                f"array is malformed ({e}): fix it and rename it .json",
            ) from None
        return
    if isinstance(data, list):
        raise DataError(source, "this file holds one JSON array, not JSON lines: rename it .json")


def _deep_document(source: str, text: str) -> DataError:
    """The error for a ``.json`` document too deep to parse: names the array element that is."""
    if not text.lstrip().startswith("["):
        return DataError(source, _TOO_DEEP, row=1)
    decoder, index, row = json.JSONDecoder(), text.index("[") + 1, 0
    try:
        while True:
            while text[index].isspace() or (row and text[index] == ","):
                index += 1
            if text[index] == "]":
                break
            row += 1
            _, index = decoder.raw_decode(text, index)
    except RecursionError:
        return DataError(source, _TOO_DEEP, row=row)
    except (json.JSONDecodeError, IndexError):
        pass
    return DataError(source, _TOO_DEEP)


def parse_csv_text(source: str, text: str) -> tuple[list[str], list[RowItem]]:
    """Header and rows of a CSV file; every cell stays a string (numbers-as-text stay text)."""
    head = text.lstrip()[:1]
    if head in ("{", "["):
        _refuse_json(source, text)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    items: list[RowItem] = []
    previous_limit = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long documents are legitimate cells
    try:
        for i, row in enumerate(reader, 1):
            items.append((i, _csv_row(source, i, row, reader)))
    except csv.Error as e:
        # The reader cannot resynchronise after a broken quote, so the rest of the file is one problem.
        n = len(items) + 1
        items.append((n, DataError(source, f"malformed CSV at line {reader.line_num} ({e})", row=n)))
    finally:
        csv.field_size_limit(previous_limit)
    return [c for c in reader.fieldnames or [] if c], items


def _csv_row(source: str, n: int, row: dict[Any, Any], reader: csv.DictReader) -> dict[str, Any] | DataError:
    header = [c for c in reader.fieldnames or []]
    extra = [v for v in row.get(None) or [] if v.strip()]  # cells beyond the header (empty ones are padding)
    if extra:
        return DataError(
            source,
            f"CSV row has {len(header) + len(row[None])} cells but the header has {len(header)} "
            f"({', '.join(header)}): an unquoted comma in a value? (line {reader.line_num})",
            row=n,
        )
    missing = [c for c in header if row.get(c) is None]
    if missing:
        values = [row[c] for c in header if row.get(c) is not None]
        hint = (
            ": a quote opened in it is never closed, so every line after it became part of one cell"
            if values and "\n" in values[-1]
            else ""
        )
        return DataError(
            source,
            f"CSV row has {len(values)} of the header's {len(header)} cells (missing {', '.join(missing)})"
            f"{hint} (line {reader.line_num})",
            row=n,
        )
    return {k: v for k, v in row.items() if k is not None}


def _refuse_json(source: str, text: str) -> None:
    """A ``.csv`` file holding JSON: say which JSON and the suffix to use."""
    try:
        whole = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        whole = None
    if isinstance(whole, list):
        raise DataError(source, "this file holds a JSON array, not CSV: rename it .json")
    if isinstance(whole, dict):
        raise DataError(source, "this file holds a JSON object, not CSV: rename it .json")
    try:
        first = json.loads(text.lstrip().split("\n", 1)[0])
    except (json.JSONDecodeError, RecursionError):
        return
    if isinstance(first, dict):
        raise DataError(source, "this file holds JSON lines, not CSV: rename it .jsonl")
