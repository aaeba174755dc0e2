"""The data of a training stage from its `DataArguments`: sources, train set and eval set (all stages)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from datasets import Dataset

from instruct_tune.config import DataArguments
from instruct_tune.data import DataError, DataSource, Kind, load_mixture, load_source, split_train_eval

logger = logging.getLogger(__name__)


def data_sources(data_args: DataArguments) -> list[DataSource]:
    """The sources of `data_args`: its mixture, or its single dataset."""
    if data_args.dataset_mixture:
        return [DataSource(**entry) for entry in data_args.dataset_mixture]
    if not data_args.dataset_name:
        raise ValueError("No training data: set `dataset_name` or `dataset_mixture`")
    return [
        DataSource(
            path=data_args.dataset_name,
            split=data_args.dataset_split,
            name=data_args.dataset_config,
            revision=data_args.dataset_revision,
        )
    ]


def _first(ds: Dataset, n: int | None) -> Dataset:
    """The first `n` rows (all when `n` is None); for preference data the first `n` prompts, whole."""
    if n is None:
        return ds
    if "group_id" not in ds.column_names:
        return ds.select(range(min(n, len(ds))))
    kept: set[int] = set()
    rows = []
    for i, group in enumerate(ds["group_id"]):
        if group not in kept:
            if len(kept) == n:
                continue
            kept.add(group)
        rows.append(i)
    return ds.select(rows)


@contextmanager
def _pointing_to_check(kind: Kind) -> Iterator[None]:
    """A stage stopped by a bad row says how rows are numbered and how to see or skip every bad one."""
    try:
        yield
    except DataError as error:
        if error.row is None:
            raise
        raise DataError(
            error.source,
            f"{error.problem} (rows count from 1, a JSON lines row is its line number; `instruct-tune data "
            f"check {error.source} --kind {kind}` lists every bad row, `skip_invalid: true` drops and counts them)",
            row=error.row,
        ) from None


def train_eval_sets(data_args: DataArguments, kind: Kind, *, seed: int) -> tuple[Dataset, Dataset | None]:
    """Load and check the training sources and the eval set (a separate source or a held-out share).

    `max_train_samples` / `max_eval_samples` count rows, or prompts for preference data (all pairs of a
    ranking stay together).
    """
    with _pointing_to_check(kind):
        train, _ = load_mixture(data_sources(data_args), kind, seed=seed, skip_invalid=data_args.skip_invalid)
        eval_set = None
        if data_args.eval_dataset_name:
            eval_set, _ = load_source(
                data_args.eval_dataset_name,
                kind,
                split=data_args.eval_dataset_split,
                skip_invalid=data_args.skip_invalid,
            )
    if not data_args.eval_dataset_name and data_args.eval_fraction > 0:
        train, eval_set = split_train_eval(train, data_args.eval_fraction, seed)
    train = _first(train, data_args.max_train_samples)
    eval_set = _first(eval_set, data_args.max_eval_samples) if eval_set is not None else None
    size = f"{len(eval_set)} rows" if eval_set is not None else "none"
    logger.info("Eval set: %s (%s)", eval_set_description(data_args), size)
    return train, eval_set


def eval_set_description(data_args: DataArguments) -> str:
    """Where the eval set of `data_args` comes from, in words (for the log and the model card)."""
    if data_args.eval_dataset_name:
        return f"{data_args.eval_dataset_name} (split {data_args.eval_dataset_split})"
    if data_args.eval_fraction > 0:
        return f"{data_args.eval_fraction:g} of the training data, held out"
    return "none (eval_fraction 0 and no eval_dataset_name)"


def task_tags(tasks: Iterable[Any]) -> list[str]:
    """The distinct task tags of an eval set (its `task` column), sorted; none unless there are several.

    Stages report per-task metrics (`eval_<task>_...`) for these, so that a regression in one task is not
    averaged away.
    """
    names = sorted({task for task in tasks if task is not None})
    return names if len(names) > 1 else []
