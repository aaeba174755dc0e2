"""Errors raised for bad input data, and the per-source load report."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DataError", "LoadReport"]


class DataError(ValueError):
    """Bad input data: ``"<source>: row <n>: <problem>"`` (no row part for whole-source problems)."""

    def __init__(self, source: str, problem: str, row: int | None = None) -> None:
        self.source = source
        self.problem = problem
        self.row = row
        where = source if row is None else f"{source}: row {row}"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self) -> tuple[type[DataError], tuple[str, str, int | None]]:
        # The default exception pickling replays only the message, which does not fit this __init__.
        return (type(self), (self.source, self.problem, self.row))


@dataclass
class LoadReport:
    """What loading one source did: detected format, rows read and written, and the rows dropped."""

    source: str
    format: str
    rows_in: int = 0
    rows_out: int = 0
    problems: list[DataError] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        """Number of source rows dropped (one problem is recorded per dropped row)."""
        return len(self.problems)

    def summary(self) -> str:
        """One line, e.g. ``"data/x.jsonl: format=alpaca rows=100 kept=98 skipped=2"``."""
        kept = self.rows_in - self.skipped
        line = f"{self.source}: format={self.format} rows={self.rows_in} kept={kept} skipped={self.skipped}"
        # Rankings expand to several pairs per row, so the example count can differ from the rows kept.
        if self.rows_out != kept:
            line += f" examples={self.rows_out}"
        return line
