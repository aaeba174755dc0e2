"""Checks of option values when a stage config is built (YAML, flags or Python), before any data is read.

A value from a YAML file reaches the dataclass unconverted (a `32.5` batch size, a `[1, 2]` epoch count), and
torch or the data loader would refuse it only after the data was loaded and tokenised, in their own words.
These checks name the option and what it needs instead. The stage config dataclasses call them from their
`__post_init__`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Whole-number options of every Trainer-based stage that must be >= 1.
TRAINER_COUNTS = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")


def _error(message: str) -> Exception:
    from instruct_tune.config import ConfigError  # config imports this module

    return ConfigError(message)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_count(name: str, value: Any, *, minimum: int = 1, optional: bool = False) -> None:
    """A whole number >= `minimum` (None allowed when `optional`)."""
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        unset = " (null: unset)" if optional else ""
        raise _error(f"{name}: {value!r} is not a whole number >= {minimum}{unset}")


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
        raise _error(f"{name}: {value!r} is not a number {need}{unset}")


def check_output_dir(output_dir: Any) -> None:
    """The run folder may be missing or a folder, never an existing file."""
    if output_dir is not None and Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise _error(f"output_dir: {output_dir} is an existing file, not a folder: choose a folder path")


def check_trainer_options(args: Any) -> None:
    """Types and ranges of the `TrainingArguments` options every training stage reads."""
    for name in TRAINER_COUNTS:
        check_count(name, getattr(args, name))
    check_number("learning_rate", args.learning_rate, above=0)
    if not isinstance(args.max_steps, int) or isinstance(args.max_steps, bool):
        raise _error(f"max_steps: {args.max_steps!r} is not a whole number (-1: use num_train_epochs)")
    if args.max_steps <= 0:
        check_number("num_train_epochs", args.num_train_epochs, above=0)
    else:
        check_number("num_train_epochs", args.num_train_epochs, at_least=0)
    check_number("max_grad_norm", args.max_grad_norm, at_least=0, optional=True)
    check_output_dir(args.output_dir)


def check_max_length(name: str, value: Any) -> None:
    """A token budget: a whole number >= 1, or null for none."""
    check_count(name, value, optional=True)


def check_mixture(entries: list[Any]) -> None:
    """Every `dataset_mixture` entry is a mapping of known keys with a path (typos get "did you mean")."""
    from instruct_tune.data.mixture import DataSource

    allowed = [f for f in DataSource.__dataclass_fields__]
    for index, entry in enumerate(entries):
        where = f"dataset_mixture[{index}]"
        if not isinstance(entry, Mapping):
            raise _error(f"{where}: expected a mapping {{path, weight, task, split}}, got {entry!r}")
        for key in entry:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" (did you mean `{close[0]}`?)" if close else ""
                raise _error(f"{where}: unknown key `{key}`{hint}; allowed: {', '.join(allowed)}")
        if not isinstance(entry.get("path"), str) or not entry["path"]:
            raise _error(f"{where}: needs a `path` (a local file/folder or a Hub dataset id)")
        if "weight" in entry:
            check_number(f"{where}.weight", entry["weight"], above=0)


def refuse_unread_options(
    config: Any, base: type, reads: set[str], stage: str, hints: Mapping[str, str] | None = None
) -> None:
    """Options `config` inherits from `base` that the stage never reads must keep their defaults.

    A stage config built on `transformers.TrainingArguments` for its plumbing would otherwise accept
    `--optim adafactor` or `--gradient_checkpointing true` without a word and train as if they were unset.
    Call before `base.__post_init__`, which rewrites some values.
    """
    import dataclasses

    changed = []
    own = {f.name for f in dataclasses.fields(type(config))} - {f.name for f in dataclasses.fields(base)}
    for f in dataclasses.fields(base):
        if not f.init or f.name in reads or f.name in own or f.name.startswith("_"):
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            continue
        value = getattr(config, f.name)
        plain = getattr(value, "value", value)  # an enum member against its string default
        default = getattr(default, "value", default)
        # The command-line parser spells some unset defaults its own way ("" as None, "no" as False).
        unset = (None, False, "", "no", [], {})
        if plain != default and not (_is_unset(plain, unset) and _is_unset(default, unset)):
            hint = (hints or {}).get(f.name)
            changed.append(f"`{f.name}` ({plain!r}{'; ' + hint if hint else ''})")
    if changed:
        raise _error(
            f"{stage}: {', '.join(changed)} set, but the {stage} stage does not read "
            f"{'this option' if len(changed) == 1 else 'these options'} (its own options and the Trainer "
            "options it uses are listed by `--help`): remove it; nothing was read or trained"
        )


def _is_unset(value: Any, unset: tuple) -> bool:
    """Whether `value` is one of the spellings of "not set" (types compared, so 0 is not False)."""
    return any(type(value) is type(u) and value == u for u in unset)
