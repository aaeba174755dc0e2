"""Read raw rows from local files, ``save_to_disk`` folders and Hugging Face Hub datasets.

Rows come out as ``(row_number, row)`` pairs numbered from 1 (for JSON lines, the line number). A row
that cannot be read (a malformed JSON line) comes out as a :class:`DataError` in its place, so that the
caller decides whether to stop at it, skip it or collect it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from .errors import DataError
from .text_files import parse_csv_text, parse_json_text

__all__ = ["FILE_SUFFIXES", "RawSource", "RowItem", "looks_local", "read_source"]

FILE_SUFFIXES: tuple[str, ...] = (".json", ".jsonl", ".csv", ".parquet")

RowItem = tuple[int, "dict[str, Any] | DataError"]

_BATCH = 1024


@dataclass
class RawSource:
    """Rows of one source before conversion; iterate it (more than once if needed) for ``RowItem`` pairs."""

    source: str
    columns: list[str]
    num_rows: int
    default_task: str
    rows: Callable[[], Iterator[RowItem]] = field(repr=False)
    first_row: dict[str, Any] = field(default_factory=dict, repr=False)

    def __iter__(self) -> Iterator[RowItem]:
        return self.rows()


def looks_local(path: str) -> bool:
    """Whether ``path`` is meant as a local path rather than a Hub id (``owner/name`` or ``name``)."""
    return (
        path.startswith((".", "/", "~"))
        or "\\" in path
        or path.count("/") > 1
        or Path(path).suffix.lower() in FILE_SUFFIXES
    )


def read_source(
    path: str, *, split: str = "train", name: str | None = None, revision: str | None = None
) -> RawSource:
    """Open a local file or folder if ``path`` exists, else load the Hub dataset ``path``.

    ``split`` picks the split of a ``DatasetDict`` folder or Hub dataset; ``name`` and ``revision`` are the
    Hub configuration and git revision. Raises :class:`DataError` when the source cannot be read at all.
    """
    local = Path(path).expanduser()
    if local.is_dir():
        return _read_folder(path, local, split=split, name=name)
    if local.exists():
        return _read_file(path, local)
    if looks_local(path):
        raise DataError(path, "file not found")
    return _read_hub(path, split=split, name=name, revision=revision)


# --- local files -------------------------------------------------------------------------------------


def _read_file(source: str, path: Path) -> RawSource:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(source, path)
    if suffix not in (".json", ".jsonl", ".csv"):
        raise DataError(
            source, f"unsupported file type '{suffix}' (expected .json, .jsonl, .csv, .parquet or a folder)"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(source, f"not UTF-8 text ({e})") from e
    except OSError as e:
        raise DataError(source, f"cannot read file ({e.strerror or e})") from e
    if suffix == ".csv":
        columns, items = parse_csv_text(source, text)
    else:
        items = parse_json_text(source, text, suffix)
        columns = _union_columns(row for _, row in items if isinstance(row, dict))
    return _from_items(source, items, columns, default_task=path.stem)


def _union_columns(rows: Iterator[dict[str, Any]]) -> list[str]:
    # Rows of a JSON file may omit optional keys (e.g. Alpaca "input"), so take every key seen, in order.
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def _from_items(source: str, items: list[RowItem], columns: list[str], default_task: str) -> RawSource:
    first = next((row for _, row in items if isinstance(row, dict)), {})
    return RawSource(source, columns, len(items), default_task, rows=lambda: iter(items), first_row=first)


def _read_parquet(source: str, path: Path) -> RawSource:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for unreadable files
        raise DataError(source, f"cannot read parquet file ({e})") from e

    def rows() -> Iterator[RowItem]:
        n = 0
        for batch in table.to_batches(max_chunksize=_BATCH):
            for row in batch.to_pylist():
                n += 1
                yield n, row

    first = table.slice(0, 1).to_pylist()
    return RawSource(
        source, table.column_names, table.num_rows, path.stem, rows=rows, first_row=first[0] if first else {}
    )


# --- datasets: save_to_disk folders and the Hub --------------------------------------------------------


def _label(path: str, split: str, name: str | None) -> str:
    label = f"{path}:{name}" if name else path
    return label if split == "train" else f"{label}[{split}]"


def _read_folder(source: str, path: Path, *, split: str, name: str | None) -> RawSource:
    label = _label(source, split, name)
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as e:  # corrupt or version-mismatched folders raise assorted types
            raise DataError(source, f"cannot load dataset folder ({e})") from e
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(source, f"split '{split}' not found (available: {', '.join(loaded)})")
            loaded = loaded[split]
            source = label
    else:
        # A folder of data files (e.g. a clone of a Hub dataset repo) is what load_dataset understands.
        try:
            loaded = datasets.load_dataset(str(path), name, split=split)
        except Exception as e:
            raise DataError(
                source, f"cannot load folder: not saved with save_to_disk, and load_dataset failed ({e})"
            ) from e
        source = label
    return _from_dataset(source, loaded, default_task=path.resolve().name)


def _read_hub(path: str, *, split: str, name: str | None, revision: str | None) -> RawSource:
    try:
        loaded = datasets.load_dataset(path, name, split=split, revision=revision)
    except Exception as e:  # network, auth, missing config/split: all mean "cannot read this source"
        raise DataError(path, f"cannot load from the Hugging Face Hub ({type(e).__name__}: {e})") from e
    return _from_dataset(_label(path, split, name), loaded, default_task=path.rstrip("/").split("/")[-1])


def _from_dataset(source: str, ds: Any, default_task: str) -> RawSource:
    if not isinstance(ds, datasets.Dataset):
        raise DataError(source, f"expected a single split, got {type(ds).__name__}")

    def rows() -> Iterator[RowItem]:
        n = 0
        for batch in ds.iter(batch_size=_BATCH):
            columns = list(batch)
            size = len(batch[columns[0]]) if columns else 0
            for i in range(size):
                n += 1
                yield n, {c: batch[c][i] for c in columns}

    return RawSource(
        source, list(ds.column_names), len(ds), default_task, rows=rows, first_row=ds[0] if len(ds) else {}
    )
