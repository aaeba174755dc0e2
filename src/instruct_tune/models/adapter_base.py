"""Where a LoRA adapter folder's base model is, recorded so the folder loads from any directory and after a move.

PEFT keeps one string, `adapter_config.json`'s `base_model_name_or_path`. A relative local path there works
only from the directory the run was made in. Run folders record their base three ways instead:
`base_model_name_or_path` as an absolute path (what PEFT's own loaders read), and in `base_model.json` the
base's path relative to the adapter folder (a tree of run folders moved together) and its Hub id where it
has one (a Hub id, or a run folder that was pushed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from instruct_tune.artifacts import HUB_FILE, is_hub_id

ADAPTER_CONFIG = "adapter_config.json"
BASE_FILE = "base_model.json"


def absolute_source(source: str) -> str:
    """`source` as an absolute path when it names a local folder or file; a Hub id as it is."""
    return str(Path(source).resolve()) if Path(source).exists() else source


def base_hub_id(base: str) -> str | None:
    """The Hub id that holds exactly `base`: the id itself, or the repo a local run folder was pushed to."""
    if is_hub_id(base):
        return base
    record = Path(base) / HUB_FILE
    return json.loads(record.read_text()).get("repo_id") if record.is_file() else None


def record_adapter_base(folder: str | Path, base: str) -> None:
    """Point the adapter in `folder` at `base` (absolute when local) and write `base_model.json` beside it."""
    folder = Path(folder)
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        return
    base = absolute_source(base)
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = base
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    record = {
        "path": base if not is_hub_id(base) else None,
        "relative_path": os.path.relpath(base, folder.resolve()) if Path(base).exists() else None,
        "hub_id": base_hub_id(base),
    }
    (folder / BASE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def adapter_base(path: str | Path) -> str | None:
    """The base model of a LoRA adapter folder, or None when `path` is not one.

    Tried in turn: the recorded path relative to the folder (the folder moved with its base), the path in
    `adapter_config.json` (absolute, or relative to the working directory for folders written before
    `base_model.json`), the recorded Hub id. A local base found nowhere is an error naming every place tried.
    An `adapter_config.json` whose base was changed after the run (it no longer says what `base_model.json`
    recorded) is taken at its word.
    """
    folder = Path(path)
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        return None
    recorded = json.loads(config_file.read_text())["base_model_name_or_path"]
    record_file = folder / BASE_FILE
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    relative = record.get("relative_path")
    if record and recorded != record.get("path") and not (recorded == record.get("hub_id") and recorded):
        return recorded  # adapter_config.json was pointed elsewhere after the run: that is the base now
    if relative and (folder / relative).exists():
        return str((folder / relative).resolve())
    if recorded and Path(recorded).exists():
        return recorded
    if record.get("hub_id"):
        return record["hub_id"]
    if is_hub_id(recorded) and not record.get("path"):
        return recorded
    tried = [f"`{recorded}`"] + ([f"`{folder / relative}`"] if relative else [])
    raise FileNotFoundError(
        f"{folder}: the base model of this adapter is not found (looked for {' and '.join(tried)}) and has no "
        "Hub id: move the base back, or point `base_model_name_or_path` in "
        f"{config_file} at it"
    )


def adapter_chain(path: str | Path) -> tuple[str, list[str]]:
    """The root checkpoint under `path` and the adapter folders to merge into it, oldest first.

    A plain checkpoint gives `(path, [])`; an SFT run folder `(base, [sft])`; a reward model trained from
    that SFT run folder `(base, [sft, reward])`.
    """
    adapters: list[str] = []
    current = str(path)
    while (base := adapter_base(current)) is not None:
        adapters.append(current)
        if base in adapters or len(adapters) > 16:
            raise ValueError(f"{path}: adapter folders name each other as base ({' -> '.join(adapters)})")
        current = base
    return current, adapters[::-1]


def local_base_warning(folder: str | Path) -> str | None:
    """A warning for a push of `folder` when its adapter's base is a local folder nobody else has."""
    try:
        base = adapter_base(folder)
    except FileNotFoundError as error:
        return str(error)
    if base is None or base_hub_id(base):
        return None
    return (
        f"{folder} is a LoRA adapter whose base is the local folder {base}, which is not on the Hub: others "
        f"cannot load it. Push the base first (`instruct-tune push {base} --repo-id ...`, then push this folder "
        f"again) or push a merged model (`instruct-tune merge {folder}`)"
    )
