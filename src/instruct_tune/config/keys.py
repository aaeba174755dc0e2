"""The one check of option names, for YAML keys, command-line flags and Python keywords alike."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from instruct_tune.config.errors import ConfigError


def known_fields(dataclass_types: Iterable[type]) -> set[str]:
    """The option names the dataclasses declare (their `__init__` fields)."""
    return {f.name for dc in dataclass_types for f in dataclasses.fields(dc) if f.init}


def refused_options(dataclass_types: Iterable[type]) -> dict[str, str]:
    """Options a stage refuses with a word on what it reads instead (a dataclass's `refused_options`)."""
    return {name: hint for dc in dataclass_types for name, hint in getattr(dc, "refused_options", {}).items()}


def check_config_keys(config: Mapping[str, Any], dataclass_types: Sequence[type], source: str) -> None:
    """Refuse keys that no dataclass declares: with the stage's hint where it has one, else the closest key."""
    known = known_fields(dataclass_types) | {"env"}
    unknown = [key for key in config if key not in known]
    if not unknown:
        return
    instead = refused_options(dataclass_types)
    hints = []
    for key in unknown:
        if key in instead:
            hints.append(f"`{key}` ({instead[key]})")
            continue
        close = difflib.get_close_matches(key, known, n=1)
        hints.append(f"`{key}`" + (f" (did you mean `{close[0]}`?)" if close else ""))
    raise ConfigError(f"{source}: unknown option(s) {', '.join(hints)}")


def flag_names(args: Sequence[str]) -> set[str]:
    """The option names set on a command line (`--name value`, `--name=value`, `--some-name`)."""
    return {a[2:].split("=", 1)[0].replace("-", "_") for a in args if a.startswith("--")}


def check_flags_left(remaining: Sequence[str], dataclass_types: Sequence[type]) -> None:
    """Refuse what the flag parser left unread, as `check_config_keys` refuses unknown YAML keys."""
    if not remaining:
        return
    check_config_keys(dict.fromkeys(flag_names(remaining)), dataclass_types, "command line")
    raise ConfigError(f"command line: arguments no stage dataclass reads: {list(remaining)}")
