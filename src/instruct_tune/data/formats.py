"""Detect the format of a data source and convert its rows to TRL's conversational form.

The kinds of data and their output schema are in ``kinds.py``; in short, ``sft`` rows are ``messages``,
``preference`` rows are ``prompt`` + ``chosen`` + ``rejected`` (+ ``group_id``, ``margin``), ``prompts`` rows
are a ``prompt`` and ``text`` rows a ``text``. Columns a format does not consume (``task``, ids, ...) are carried
through unchanged.

This module is the registry of source formats, in ``_REGISTRY``: one :class:`_Format` per format names its
kind, its parser, the columns it reads and the rule that recognizes it. The parsers live in
``sft_formats.py`` (conversations, prompts, text) and ``preference_formats.py`` (pairs and rankings), on top
of the turn helpers in ``messages.py``; the kinds' emitters in ``kinds.py`` check the parsed rows.

Adding a format means one parser function (``(row, row_num) -> Example``, raising ``RowProblem`` for a
bad row) and one ``_Format`` line in ``_REGISTRY``; ``FORMATS``, ``KIND_FORMATS``, ``FORMAT_KIND``, the
detection and the error messages all follow from the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import DataError, LoadReport
from .kinds import EMITTERS, KINDS, OUTPUT_COLUMNS, Kind, require_kind
from .parsing import Parser, RowProblem
from .preference_formats import (
    is_hh_text,
    parse_hh,
    parse_preference,
    parse_ranking,
    parse_sharegpt_preference,
)
from .sft_formats import (
    parse_alpaca,
    parse_messages,
    parse_prompt_completion,
    parse_prompt_only,
    parse_sharegpt,
    parse_text,
)
from .values import margin_problem

__all__ = [
    "FORMATS",
    "FORMAT_KIND",
    "KINDS",
    "KIND_FORMATS",
    "PREFERENCE_FORMATS",
    "SFT_FORMATS",
    "Kind",
    "convert_rows",
    "detect_format",
    "format_candidates",
]

# fits(columns, first_row): whether a source with these columns is in the format.
Fits = Callable[[set[str], Mapping[str, Any]], bool]


@dataclass(frozen=True)
class _Format:
    name: str
    kind: str  # the kind the format naturally is, used to guess the kind when none is given
    parse: Parser
    columns: str  # its columns, as error messages name them
    consumed: frozenset[str]  # the columns it reads; the others are carried through
    rank: int  # detection tries lower ranks first, so that the most specific format wins
    fits: Fits


def _pairs(cols: set[str]) -> bool:
    return {"chosen", "rejected"} <= cols


def _hh(cols: set[str], row: Mapping[str, Any]) -> bool:
    return _pairs(cols) and not cols & {"conversations", "prompt"} and is_hh_text(row.get("chosen"))


def _preference(cols: set[str], row: Mapping[str, Any]) -> bool:
    return _pairs(cols) and "conversations" not in cols and not _hh(cols, row)


def _has(*needed: str) -> Fits:
    return lambda cols, row: set(needed) <= cols


# Listed in the order error messages name them; ``rank`` orders detection (the three rank-1 pair formats
# exclude one another). A preference set with ``messages`` fits both: a kind takes the first it can use.
_REGISTRY: tuple[_Format, ...] = (
    _Format(
        "messages", "sft", parse_messages, "messages", frozenset({"messages"}),
        rank=2, fits=_has("messages"),
    ),
    _Format(
        "prompt_completion", "sft", parse_prompt_completion, "prompt + completion",
        frozenset({"prompt", "completion"}),
        rank=5, fits=_has("prompt", "completion"),
    ),
    _Format(
        "alpaca", "sft", parse_alpaca, "instruction + output (+ input)",
        frozenset({"instruction", "input", "output", "system", "history"}),
        rank=4, fits=_has("instruction", "output"),
    ),
    _Format(
        "sharegpt", "sft", parse_sharegpt, "conversations", frozenset({"conversations", "system"}),
        rank=3, fits=lambda cols, row: "conversations" in cols and not _pairs(cols),
    ),
    _Format(
        "preference", "preference", parse_preference, "chosen + rejected (+ prompt)",
        frozenset({"prompt", "chosen", "rejected"}),
        rank=1, fits=_preference,
    ),
    _Format(
        "hh_rlhf", "preference", parse_hh, "chosen + rejected as 'Human: ... Assistant: ...' text",
        frozenset({"chosen", "rejected"}),
        rank=1, fits=_hh,
    ),
    _Format(
        "sharegpt_preference", "preference", parse_sharegpt_preference, "conversations + chosen + rejected",
        frozenset({"conversations", "chosen", "rejected", "system"}),
        rank=1, fits=_has("conversations", "chosen", "rejected"),
    ),
    _Format(
        "ranking", "preference", parse_ranking, "prompt + responses + ranking or scores",
        frozenset({"prompt", "responses", "ranking", "scores"}),
        rank=0, fits=lambda cols, row: {"prompt", "responses"} <= cols and bool(cols & {"ranking", "scores"}),
    ),
    _Format(
        "prompt_only", "prompts", parse_prompt_only, "prompt", frozenset({"prompt"}),
        rank=6, fits=_has("prompt"),
    ),
    _Format("text", "text", parse_text, "text", frozenset({"text"}), rank=7, fits=_has("text")),
)
_BY_NAME: dict[str, _Format] = {f.name: f for f in _REGISTRY}
_BY_RANK: tuple[_Format, ...] = tuple(sorted(_REGISTRY, key=lambda f: f.rank))

# The natural kinds whose formats each kind can read: prompts can be taken from any conversation or pair.
_READS: dict[str, tuple[str, ...]] = {
    "sft": ("sft",),
    "preference": ("preference",),
    "prompts": ("prompts", "sft", "preference"),
    "text": ("text",),
}


def _names(kind: str) -> tuple[str, ...]:
    return tuple(f.name for f in _REGISTRY if f.kind == kind)


FORMATS: tuple[str, ...] = tuple(_BY_NAME)
SFT_FORMATS = _names("sft")
PREFERENCE_FORMATS = _names("preference")
KIND_FORMATS: dict[str, tuple[str, ...]] = {
    kind: tuple(name for natural in _READS[kind] for name in _names(natural)) for kind in KINDS
}
FORMAT_KIND: dict[str, str] = {f.name: f.kind for f in _REGISTRY}


# --- detection -----------------------------------------------------------------------------------------


def format_candidates(columns: Sequence[str], first_row: Mapping[str, Any]) -> list[str]:
    """Every format the columns fit, most specific first (a preference set with ``messages`` fits both)."""
    cols = set(columns)
    return [f.name for f in _BY_RANK if f.fits(cols, first_row)]


def detect_format(
    columns: Sequence[str],
    first_row: Mapping[str, Any],
    *,
    kind: str | None = None,
    source: str = "<data>",
) -> str:
    """Name a source's format from its columns (and first row); with ``kind``, the first usable as it.

    Raises :class:`DataError` naming the expected and the found columns when nothing fits.
    """
    if kind is not None:
        require_kind(kind)
    candidates = format_candidates(columns, first_row)
    usable = [f for f in candidates if kind is None or f in KIND_FORMATS[kind]]
    if usable:
        return usable[0]
    found = ", ".join(columns) or "(none)"
    if kind is None:
        wanted = " | ".join(_BY_NAME[f].columns for f in FORMATS)
        raise DataError(source, f"missing column: expected one of {wanted}; found columns: {found}")
    wanted = " | ".join(_BY_NAME[f].columns for f in KIND_FORMATS[kind])
    if candidates:
        raise DataError(
            source,
            f"format '{candidates[0]}' ({FORMAT_KIND[candidates[0]]} data) cannot be used as {kind} data, "
            f"which needs columns {wanted}; "
            f"found columns: {found}",
        )
    raise DataError(source, f"missing column: {kind} data needs columns {wanted}; found columns: {found}")


# --- conversion ----------------------------------------------------------------------------------------


def _without_columns(
    rows: Iterable[tuple[int, Mapping[str, Any] | DataError]], source: str, skip_invalid: bool
) -> tuple[list[dict[str, Any]], LoadReport]:
    # No readable row had a field (e.g. every JSON line is malformed): report the rows, not a missing format.
    report = LoadReport(source=source, format="unknown")
    for row_num, row in rows:
        report.rows_in += 1
        problem = row if isinstance(row, DataError) else DataError(source, "row has no columns", row=row_num)
        if not skip_invalid:
            raise problem
        report.problems.append(problem)
    if report.rows_in == 0:
        raise DataError(source, "no rows")
    return [], report


def convert_rows(
    rows: Iterable[tuple[int, Mapping[str, Any] | DataError]],
    kind: str,
    *,
    source: str,
    columns: Sequence[str],
    first_row: Mapping[str, Any],
    skip_invalid: bool = False,
) -> tuple[list[dict[str, Any]], LoadReport]:
    """Detect the format and convert every ``(row_number, row)`` pair to ``kind``'s schema, validating each.

    Without ``skip_invalid`` the first bad row raises :class:`DataError`; with it, bad rows are dropped
    and recorded in the report's ``problems``. Whole-source problems (no usable format, no rows) always raise.
    """
    if not columns:
        return _without_columns(rows, source, skip_invalid)
    fmt = detect_format(columns, first_row, kind=kind, source=source)
    if fmt == "preference" and "prompt" not in columns and isinstance(first_row.get("chosen"), str):
        raise DataError(
            source,
            "missing column: chosen/rejected are plain strings, so a 'prompt' column is needed "
            f"(or HH-RLHF 'Human: ... Assistant: ...' text); found columns: {', '.join(columns)}",
        )
    parse, emit = _BY_NAME[fmt].parse, EMITTERS[kind]
    extras = [c for c in columns if c not in _BY_NAME[fmt].consumed and c not in OUTPUT_COLUMNS[kind]]
    report = LoadReport(source=source, format=fmt)
    out: list[dict[str, Any]] = []
    for row_num, row in rows:
        report.rows_in += 1
        problem = row if isinstance(row, DataError) else None
        produced: list[dict[str, Any]] = []
        if problem is None:
            try:
                produced = emit(parse(row, row_num), row_num)
                if kind == "preference" and (bad := margin_problem(row.get("margin"), produced)):
                    raise RowProblem(bad)
            except RowProblem as e:
                problem = DataError(source, str(e), row=row_num)
        if problem is not None:
            if not skip_invalid:
                raise problem
            report.problems.append(problem)
            continue
        # Every output row gets every extra column so that the rows form one table.
        carried = {c: row.get(c) for c in extras}
        for example in produced:
            example.update(carried)
        out.extend(produced)
    if report.rows_in == 0:
        raise DataError(source, "no rows")
    if any("margin" in example for example in out):
        # Rankings by scores carry a margin, rankings by order do not: one table needs it on every row.
        for example in out:
            example.setdefault("margin", None)
    report.rows_out = len(out)
    return out, report
