"""``instruct-tune data check PATH``: report a source's format, row count and every bad row."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import DataError
from .formats import FORMAT_KIND, convert_rows, detect_format
from .kinds import KINDS, require_kind
from .readers import read_source

__all__ = ["CheckResult", "build_parser", "check_source", "format_check", "main"]


@dataclass
class CheckResult:
    """Outcome of checking one source; ``problems`` holds every bad row (and whole-source problems)."""

    source: str
    kind: str | None
    format: str | None
    rows: int
    examples: int = 0
    problems: list[DataError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_source(
    path: str,
    kind: str | None = None,
    *,
    split: str = "train",
    name: str | None = None,
    revision: str | None = None,
) -> CheckResult:
    """Read and convert the whole source, collecting every problem instead of stopping at the first.

    ``kind`` defaults to the natural kind of the detected format. Raises :class:`DataError` only when the
    source cannot be read at all (missing file, unreadable file, Hub load failure).
    """
    if kind is not None:
        require_kind(kind)
    raw = read_source(path, split=split, name=name, revision=revision)
    result = CheckResult(source=raw.source, kind=kind, format=None, rows=raw.num_rows)
    try:
        if result.kind is None and raw.columns:
            result.kind = FORMAT_KIND[detect_format(raw.columns, raw.first_row, source=raw.source)]
        # Without columns there is no format to check against; conversion then reports the unreadable rows.
        _, report = convert_rows(
            raw,
            result.kind or "text",
            source=raw.source,
            columns=raw.columns,
            first_row=raw.first_row,
            skip_invalid=True,
        )
    except DataError as e:  # whole-source problems: missing columns, wrong kind, no rows
        result.problems.append(e)
        return result
    result.format = None if report.format == "unknown" else report.format
    result.rows = report.rows_in
    result.examples = report.rows_out
    result.problems = report.problems
    return result


def format_check(result: CheckResult) -> str:
    """Human-readable report: source, format, kind, counts, then one line per problem."""
    lines = [
        f"source: {result.source}",
        f"format: {result.format or 'unknown'}",
        f"kind: {result.kind or 'unknown'}",
        f"rows: {result.rows}",
        f"examples: {result.examples}",
        f"problems: {len(result.problems)}",
    ]
    lines += [str(p) for p in result.problems]
    return "\n".join(lines)


def build_parser(prog: str = "instruct-tune data check") -> argparse.ArgumentParser:
    """Argument parser for ``data check`` (arguments after ``data check``)."""
    parser = argparse.ArgumentParser(prog=prog, description="Check a data source and list every bad row.")
    parser.add_argument("path", help="local file (.json/.jsonl/.csv/.parquet), save_to_disk folder or Hub id")
    parser.add_argument("--kind", choices=KINDS, help="kind of data to check for (default: from the format)")
    parser.add_argument("--split", default="train", help="split of a DatasetDict folder or Hub dataset")
    parser.add_argument("--name", default=None, help="Hub dataset configuration name")
    parser.add_argument("--revision", default=None, help="Hub dataset git revision")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``data check``; returns 0 when clean, 1 when there are problems, 2 for an unreadable source."""
    args = build_parser().parse_args(argv)
    try:
        result = check_source(args.path, args.kind, split=args.split, name=args.name, revision=args.revision)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_check(result))
    return 0 if result.ok else 1
