"""Reading a stage's options: `--config file.yaml` plus flag overrides in; the resolved `config.yaml` out.

`parse_args(SFTStageConfig, DataArguments, ModelArguments)` reads `--config file.yaml` for defaults and lets
command-line flags override them, as TRL's `TrlParser` does, but refuses YAML keys and flags that no dataclass
declares (naming the file or flag and the closest known key) instead of letting a typo pass silently.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from trl import TrlParser

from instruct_tune.config.errors import ConfigError
from instruct_tune.config.keys import check_config_keys, check_flags_left, flag_names

logger = logging.getLogger(__name__)

# Fields never written to a saved config: secrets, and per-process values that must come from the launcher.
_UNSAVED_FIELDS = {"hub_token", "push_to_hub_token", "local_rank", "_n_gpu", "deepspeed_plugin"}
# Options that choose a stage's training data, and those that describe the eval set that goes with it.
_TRAIN_DATA_KEYS = ("dataset_name", "dataset_config", "dataset_split", "dataset_revision", "dataset_mixture")
_EVAL_DATA_KEYS = ("eval_dataset_name", "eval_dataset_split")


def read_yaml_config(path: str | Path) -> dict[str, Any]:
    """Read a stage config file into a mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a YAML mapping of option: value")
    return data


def _data_overrides(config: dict[str, Any], flags: set[str], config_path: str) -> dict[str, Any]:
    """The config file's values less those replaced by the command line's choice of training data.

    `--dataset_name` on the command line replaces the file's `dataset_mixture` as a whole (and vice versa),
    and the file's eval set with it unless `--eval_dataset_name` is given too: another data set's eval rows
    would be reported as this run's. The run then holds out `eval_fraction` of the new training data.
    """
    if not flags & {"dataset_name", "dataset_mixture"}:
        return config
    dropped = [k for k in _TRAIN_DATA_KEYS if k in config and k not in flags]
    if "eval_dataset_name" not in flags:
        dropped += [k for k in _EVAL_DATA_KEYS if k in config and k not in flags]
    if dropped:
        logger.warning(
            "Training data given on the command line: %s's %s no longer apply%s",
            config_path,
            ", ".join(f"`{k}`" for k in dropped),
            "" if "eval_dataset_name" in flags or "eval_dataset_name" not in config
            else "; the eval set is held out of the new training data (eval_fraction), or pass --eval_dataset_name",
        )
    return {k: v for k, v in config.items() if k not in dropped}


def parse_args(*dataclass_types: type, args: Sequence[str] | None = None) -> tuple[Any, ...]:
    """Parse `--config file.yaml` plus flag overrides into one instance of each dataclass.

    The YAML file gives defaults, flags override them; an unknown key in the file or an unknown flag is an
    error naming it. Training data chosen by a flag replaces the file's training data and eval set (see
    `_data_overrides`).
    """
    args = list(sys.argv[1:] if args is None else args)
    parser = TrlParser(dataclass_types=list(dataclass_types))
    flag_args = args
    if "--config" in args:
        index = args.index("--config")
        if index + 1 >= len(args):
            raise ConfigError("--config needs a file path")
        config_path = args[index + 1]
        flag_args = args[:index] + args[index + 2 :]
        config = read_yaml_config(config_path)
        check_config_keys(config, dataclass_types, config_path)
        config = _data_overrides(config, flag_names(flag_args), config_path)
        for key, value in (config.pop("env", None) or {}).items():  # as TrlParser does
            os.environ[key] = str(value)
        unused = parser.set_defaults_with_config(**config)
        if unused:
            raise ConfigError(f"{config_path}: options no stage dataclass reads: {unused[::2]}")
    *parsed, remaining = parser.parse_args_into_dataclasses(args=flag_args, return_remaining_strings=True)
    check_flags_left(remaining, dataclass_types)
    return tuple(parsed)


def _plain(value: Any) -> Any:
    """Turn config values into YAML-safe plain data."""
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def resolved_config(*configs: Any) -> dict[str, Any]:
    """All fields of the given config instances as one flat mapping, loadable again with `--config`."""
    merged: dict[str, Any] = {}
    for config in configs:
        for f in dataclasses.fields(config):
            if f.init and f.name not in _UNSAVED_FIELDS and not f.name.startswith("_"):
                merged[f.name] = _plain(getattr(config, f.name))
    return merged


def save_config(output_dir: str | Path, *configs: Any) -> Path:
    """Write the resolved config of a stage as `config.yaml` in its run folder."""
    path = Path(output_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(resolved_config(*configs), sort_keys=False))
    return path
