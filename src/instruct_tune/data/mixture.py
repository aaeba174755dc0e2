"""Build datasets from sources: one source with a task tag, weighted mixtures, and train/eval splits."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import datasets

from .errors import DataError, LoadReport
from .formats import convert_rows
from .kinds import Kind, require_kind
from .readers import read_source

__all__ = ["DataSource", "load_mixture", "load_source", "split_train_eval"]

logger = logging.getLogger("instruct_tune.data")

_LOGGED_PROBLEMS = 5


def load_source(
    path: str,
    kind: Kind,
    *,
    split: str = "train",
    name: str | None = None,
    revision: str | None = None,
    skip_invalid: bool = False,
    task: str | None = None,
) -> tuple[datasets.Dataset, LoadReport]:
    """Load one source as ``kind`` data, with a ``task`` column.

    The task is ``task`` if given, else the row's own ``task`` value, else the source's file stem (or the
    Hub id's last part). Raises :class:`DataError` on the first bad row unless ``skip_invalid``.
    """
    require_kind(kind)
    raw = read_source(path, split=split, name=name, revision=revision)
    rows, report = convert_rows(
        raw, kind, source=raw.source, columns=raw.columns, first_row=raw.first_row, skip_invalid=skip_invalid
    )
    if not rows:
        first = report.problems[0] if report.problems else None
        raise DataError(
            raw.source, f"no valid rows: all {report.rows_in} rows have problems (first: {first})"
        )
    default_task = task if task is not None else raw.default_task
    for row in rows:
        current = row.get("task")
        # A per-row tag is kept unless the caller names the task; str() keeps mixtures to one column type.
        row["task"] = default_task if task is not None or current is None else str(current)
    ds = _to_dataset(rows, raw.source)
    _log_report(report)
    return ds, report


def _to_dataset(rows: list[dict[str, Any]], source: str) -> datasets.Dataset:
    try:
        return datasets.Dataset.from_list(rows)
    except (TypeError, ValueError) as e:  # pyarrow's ArrowInvalid/ArrowTypeError derive from these
        raise DataError(source, f"cannot build a dataset from the converted rows ({e})") from e


def _log_report(report: LoadReport) -> None:
    if not report.problems:
        logger.info(report.summary())
        return
    logger.warning(report.summary())
    for problem in report.problems[:_LOGGED_PROBLEMS]:
        logger.warning("skipped %s", problem)
    if report.skipped > _LOGGED_PROBLEMS:
        logger.warning(
            "... and %d more skipped rows (run `instruct-tune data check` for all)",
            report.skipped - _LOGGED_PROBLEMS,
        )


@dataclass
class DataSource:
    """One entry of a data mixture: where to read, how much of it (``weight``) and its task tag."""

    path: str
    weight: float = 1.0
    task: str | None = None
    split: str = "train"
    name: str | None = None
    revision: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"data source path must be a non-empty string (got {self.path!r})")
        try:
            self.weight = float(self.weight)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{self.path}: weight must be a number (got {self.weight!r})") from e
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"{self.path}: weight must be > 0 (got {self.weight})")

    @classmethod
    def parse(cls, spec: DataSource | Mapping[str, Any] | str) -> DataSource:
        """Accept a ``DataSource``, a dict with its fields (YAML), or a string ``"path[:weight[:task]]"``."""
        if isinstance(spec, DataSource):
            return spec
        if isinstance(spec, Mapping):
            allowed = [f.name for f in fields(cls)]
            unknown = sorted(set(spec) - set(allowed))
            if unknown:
                raise ValueError(f"unknown data source keys {unknown} (allowed: {', '.join(allowed)})")
            if "path" not in spec:
                raise ValueError(f"data source {dict(spec)!r} has no 'path'")
            return cls(**spec)
        if isinstance(spec, str):
            parts = spec.split(":")
            if len(parts) >= 3 and _is_number(parts[-2]):
                return cls(":".join(parts[:-2]), float(parts[-2]), parts[-1] or None)
            if len(parts) >= 2 and _is_number(parts[-1]):
                return cls(":".join(parts[:-1]), float(parts[-1]))
            return cls(spec)
        raise TypeError(f"cannot make a data source from {type(spec).__name__}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _units(ds: datasets.Dataset) -> list[list[int]]:
    """Row indices grouped so that all pairs of one ranking (one ``group_id``) are sampled/split together."""
    if "group_id" not in ds.column_names:
        return [[i] for i in range(len(ds))]
    groups: dict[Any, list[int]] = {}
    for i, g in enumerate(ds["group_id"]):
        groups.setdefault(g, []).append(i)
    return list(groups.values())


def _weighted(ds: datasets.Dataset, weight: float, rng: random.Random, source: str) -> datasets.Dataset:
    if weight == 1.0:
        return ds
    units = _units(ds)
    whole = math.floor(weight)
    extra = round((weight - whole) * len(units))
    chosen = list(range(len(units))) * whole + sorted(rng.sample(range(len(units)), extra))
    if not chosen:
        raise DataError(source, f"weight {weight} selects nothing of {len(units)} rows")
    return ds.select([i for u in chosen for i in units[u]])


def load_mixture(
    sources: Sequence[DataSource | Mapping[str, Any] | str],
    kind: Kind,
    *,
    seed: int = 0,
    skip_invalid: bool = False,
) -> tuple[datasets.Dataset, list[LoadReport]]:
    """Load every source, take ``weight`` of each (< 1 subsamples, > 1 repeats), concatenate and shuffle.

    Preference ``group_id`` values are renumbered to stay unique across sources. Columns are those every
    source has with the same type (extra columns only some sources have are dropped).
    """
    if not sources:
        raise ValueError("no data sources given")
    parts: list[datasets.Dataset] = []
    reports: list[LoadReport] = []
    offset = 0
    for index, spec in enumerate(sources):
        src = DataSource.parse(spec)
        ds, report = load_source(
            src.path,
            kind,
            split=src.split,
            name=src.name,
            revision=src.revision,
            skip_invalid=skip_invalid,
            task=src.task,
        )
        if "group_id" in ds.column_names:
            # group ids are source row numbers; shift them past the previous sources' rows.
            ids = [g + offset for g in ds["group_id"]]
            ds = ds.remove_columns("group_id").add_column("group_id", ids)
            offset += report.rows_in
        # One generator per source, so adding a source does not change the others' samples.
        parts.append(_weighted(ds, src.weight, random.Random(seed * 1_000_003 + index), report.source))
        reports.append(report)
    columns = [
        c for c in parts[0].column_names if all(p.features.get(c) == parts[0].features[c] for p in parts[1:])
    ]
    dropped = sorted({c for p in parts for c in p.column_names} - set(columns))
    if dropped:
        logger.info(
            "mixture: dropping columns not shared by all sources with one type: %s", ", ".join(dropped)
        )
    mixed = datasets.concatenate_datasets([p.select_columns(columns) for p in parts])
    return mixed.shuffle(seed=seed), reports


def split_train_eval(
    ds: datasets.Dataset, eval_fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split off ``eval_fraction`` of the rows (of the prompts, for preference data) as an eval set.

    Pairs sharing a ``group_id`` stay on one side, so no prompt is in both. Raises ``ValueError`` if either
    side would be empty.
    """
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be between 0 and 1 (got {eval_fraction})")
    units = _units(ds)
    n_eval = round(len(units) * eval_fraction)
    what = "prompts" if "group_id" in ds.column_names else "rows"
    if n_eval == 0 or n_eval == len(units):
        empty = "eval" if n_eval == 0 else "train"
        raise ValueError(
            f"eval_fraction={eval_fraction} of {len(units)} {what} leaves the {empty} split empty"
        )
    order = list(range(len(units)))
    random.Random(seed).shuffle(order)
    eval_units = set(order[:n_eval])
    eval_idx = sorted(i for u in eval_units for i in units[u])
    train_idx = sorted(i for u in range(len(units)) if u not in eval_units for i in units[u])
    return ds.select(train_idx), ds.select(eval_idx)
