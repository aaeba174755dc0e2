"""Checks of option values when a stage config is built (YAML, flags or Python), before any data is read.

A value from a YAML file reaches the dataclass unconverted (a `32.5` batch size, a `[1, 2]` epoch count), and
torch or the data loader would refuse it only after the data was loaded and tokenised, in their own words.
These checks name the option and what it needs instead. The stage config dataclasses call them from their
`__post_init__`.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from instruct_tune.config.errors import ConfigError

# Whole-number options of every Trainer-based stage that must be >= 1 (PPO has no per-device batch sizes).
TRAINER_COUNTS = ("per_device_train_batch_size", "per_device_eval_batch_size")


def bf16_supported() -> bool:
    """Whether this machine trains in bf16 mixed precision: a CUDA device that supports it."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_count(name: str, value: Any, *, minimum: int = 1, optional: bool = False) -> None:
    """A whole number >= `minimum` (None allowed when `optional`)."""
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        unset = " (null: unset)" if optional else ""
        raise ConfigError(f"{name}: {value!r} is not a whole number >= {minimum}{unset}")


def check_number(
    name: str,
    value: Any,
    *,
    above: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
    optional: bool = False,
) -> None:
    """A finite number, > `above` / >= `at_least` / <= `at_most` where given (None allowed when `optional`)."""
    if value is None and optional:
        return
    bounds = []
    if above is not None:
        bounds.append(f"> {above:g}")
    if at_least is not None:
        bounds.append(f">= {at_least:g}")
    if at_most is not None:
        bounds.append(f"<= {at_most:g}")
    ok = _is_number(value) and math.isfinite(value)
    ok = ok and (above is None or value > above) and (at_least is None or value >= at_least)
    ok = ok and (at_most is None or value <= at_most)
    if not ok:
        need = " and ".join(bounds) or "finite"
        unset = " (null: off)" if optional else ""
        raise ConfigError(f"{name}: {value!r} is not a number {need}{unset}")


def check_output_dir(output_dir: Any) -> None:
    """The run folder may be missing or a folder, never an existing file."""
    if output_dir is not None and Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise ConfigError(f"output_dir: {output_dir} is an existing file, not a folder: choose a folder path")


def check_launch_trains_together(seen: int) -> None:
    """Refuse a launch of several processes (`WORLD_SIZE`) in which this one would train alone, seeing `seen`:
    without a GPU, `accelerate launch --multi_gpu` or an FSDP config starts them, but each trains the whole model
    unless the stage is told to use the CPU (`--use_cpu true`), and all of them write the same run folder."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > seen:
        raise ConfigError(
            f"{launched} processes were launched but each would train alone (this one sees {seen}): "
            "on CPU, add `--use_cpu true` to the stage's flags"
        )


def check_optimizer_options(args: Any) -> None:
    """Types and ranges of the optimisation and length options every training stage reads, PPO's included."""
    check_count("gradient_accumulation_steps", args.gradient_accumulation_steps)
    check_number("learning_rate", args.learning_rate, above=0)
    if not isinstance(args.max_steps, int) or isinstance(args.max_steps, bool):
        raise ConfigError(f"max_steps: {args.max_steps!r} is not a whole number (-1: use num_train_epochs)")
    if args.max_steps <= 0:
        check_number("num_train_epochs", args.num_train_epochs, above=0)
    else:
        check_number("num_train_epochs", args.num_train_epochs, at_least=0)
    check_number("max_grad_norm", args.max_grad_norm, at_least=0, optional=True)
    check_output_dir(args.output_dir)


def check_trainer_options(args: Any) -> None:
    """Types and ranges of the `TrainingArguments` options every Trainer-based stage reads."""
    for name in TRAINER_COUNTS:
        check_count(name, getattr(args, name))
    check_optimizer_options(args)


def check_max_length(name: str, value: Any) -> None:
    """A token budget: a whole number >= 1, or null for none."""
    check_count(name, value, optional=True)


def check_mixture(entries: list[Any]) -> None:
    """Every `dataset_mixture` entry is a mapping of known keys with a path (typos get "did you mean")."""
    from instruct_tune.data.mixture import DataSource  # imported here: the data package imports config

    allowed = [f for f in DataSource.__dataclass_fields__]
    for index, entry in enumerate(entries):
        where = f"dataset_mixture[{index}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: expected a mapping {{path, weight, task, split}}, got {entry!r}")
        for key in entry:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" (did you mean `{close[0]}`?)" if close else ""
                raise ConfigError(f"{where}: unknown key `{key}`{hint}; allowed: {', '.join(allowed)}")
        if not isinstance(entry.get("path"), str) or not entry["path"]:
            raise ConfigError(f"{where}: needs a `path` (a local file/folder or a Hub dataset id)")
        if "weight" in entry:
            check_number(f"{where}.weight", entry["weight"], above=0)
