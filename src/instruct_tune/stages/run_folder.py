"""A training stage's run folder as a unit: what it was made from, who writes it, what a rerun may resume.

- `run_fingerprint.json`, written first when a stage starts: the resolved config less the options that only
  say where output and logs go, and what each local input is (an earlier stage's run folder by its
  fingerprint and run id, any other file or folder by a hash of its content). A rerun resumes only from
  checkpoints of the same fingerprint; a folder made from other inputs stops the stage, naming what differs.
- A lock per output_dir (`.instruct_tune.lock`: flock, holding the pid): a second run is refused, naming the
  folder and the pid; a lock left by a dead process is taken over.
- A non-empty folder that is not a run folder, or is another stage's, is refused; `--overwrite_output_dir
  true` allows all three (old checkpoints and results are deleted, the run starts fresh).
- Only complete checkpoints are resumed from (`instruct_tune.checkpoints`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instruct_tune.checkpoints import (
    PARTIAL_PREFIX,
    CheckpointProblem,
    checkpoint_folders,
    choose_checkpoint,
    trainer_checkpoint_problem,
    write_atomic,
)
from instruct_tune.config import resolved_config
from instruct_tune.stages.run_lock import (
    LOCK_FILE,
    RunFolderError,
    RunFolderLocked,
    acquire_lock,
    release_lock,
)

__all__ = [
    "RunFolder",
    "RunFolderArguments",
    "RunFolderError",
    "RunFolderLocked",
    "is_main_process",
    "open_run_folder",
]

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "run_fingerprint.json"
# What a finished or half-done run leaves that a fresh run would merge into, append to or be mistaken for.
RESULT_FILES = (
    "metrics.json",
    "samples.jsonl",
    "trainer_state.json",
    "reward_normalization.json",
    "calibration.json",
    "results.md",
    FINGERPRINT_FILE,
)
_WEIGHTS = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json")
# Options that change where output and logs go, not what is trained.
_OUTPUT_ONLY = {
    "output_dir", "overwrite_output_dir", "report_to", "run_name", "project", "disable_tqdm", "push_to_hub",
    "resume_from_checkpoint", "skip_memory_metrics", "sample_steps", "num_samples_logged", "dataset_num_proc",
    "dataloader_num_workers", "dataloader_persistent_workers", "dataloader_prefetch_factor",
}  # fmt: skip
_OUTPUT_ONLY_PREFIXES = ("logging_", "log_", "save_", "hub_", "trackio_", "push_to_hub")
# How long to train: recorded, not compared, so a rerun may extend a run (resume, then train on).
_LENGTH = ("max_steps", "num_train_epochs", "total_episodes")
_BIG_FILE = 256 * 2**20


@dataclass
class RunFolderArguments:
    """Options about the run folder itself (not stored in its config)."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Write into output_dir even when it is not empty and no run folder of this stage, or was "
            "made from other inputs: its checkpoints and results are deleted and the run starts fresh."
        },
    )


# --- the fingerprint ------------------------------------------------------------------------------------


def _output_only(key: str) -> bool:
    name = key.split(".")[0].split("[")[0]
    return name in _OUTPUT_ONLY or name.startswith(_OUTPUT_ONLY_PREFIXES)


def _file_hash(path: Path, digest: Any) -> None:
    size = path.stat().st_size
    digest.update(f"{size}:".encode())
    with path.open("rb") as handle:
        if size <= _BIG_FILE:
            for block in iter(lambda: handle.read(2**20), b""):
                digest.update(block)
        else:  # a multi-GB checkpoint: its size, head and tail
            digest.update(handle.read(2**20))
            handle.seek(size - 2**20)
            digest.update(handle.read(2**20))


def describe_input(path: Path) -> dict[str, Any]:
    """What a local input is: a run folder's fingerprint and run id, else a hash of the content."""
    record = read_fingerprint(path) if path.is_dir() else None
    if record is not None:
        return {"run_folder": record.get("stage"), "fingerprint": record.get("id"), "run_id": record.get("run_id")}
    digest = hashlib.sha256()
    if path.is_file():
        _file_hash(path, digest)
    else:
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and not any(part.startswith((".", "checkpoint-")) for part in p.relative_to(path).parts)
        )  # fmt: skip
        for file in files[:5000]:
            digest.update(file.relative_to(path).as_posix().encode())
            _file_hash(file, digest)
    return {"sha256": digest.hexdigest()[:32]}


def _local_inputs(config: Mapping[str, Any], output_dir: Path) -> dict[str, dict[str, Any]]:
    """Every option value that names an existing local file or folder (outside the run folder itself)."""
    out = output_dir.resolve()
    here = Path.cwd().resolve()
    found: dict[str, dict[str, Any]] = {}

    def visit(key: str, value: Any) -> None:
        if isinstance(value, dict):
            for name, item in value.items():
                visit(f"{key}.{name}", item)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                visit(f"{key}[{i}]", item)
        elif isinstance(value, str) and value and not _output_only(key) and Path(value).exists():
            path = Path(value).resolve()
            if path != here and path not in out.parents and out not in (path, *path.parents):
                found[key] = {"path": value, **describe_input(path)}

    for key, value in config.items():
        visit(key, value)
    return found


def fingerprint(stage: str, configs: Sequence[Any], output_dir: str | Path) -> dict[str, Any]:
    """The fingerprint of a stage run: config (less output-only options), length and local inputs, with `id`,
    a hash of all but the length."""
    config = {k: v for k, v in resolved_config(*configs).items() if not _output_only(k)}
    length = {k: config.pop(k) for k in _LENGTH if k in config}
    inputs = _local_inputs(config, Path(output_dir))
    identity = json.dumps({"stage": stage, "config": config, "inputs": inputs}, sort_keys=True, default=str)
    return {
        "stage": stage,
        "id": hashlib.sha256(identity.encode()).hexdigest()[:16],
        "config": config,
        "length": length,
        "inputs": inputs,
    }


def read_fingerprint(folder: str | Path) -> dict[str, Any] | None:
    """The fingerprint a run folder was made from, or None when it has none (not a run folder)."""
    path = Path(folder) / FINGERPRINT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        logger.warning("%s is unreadable: the folder counts as no run folder", path)
        return None
    return record if isinstance(record, dict) and "id" in record else None


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def _input_change(old: dict[str, Any] | None, new: dict[str, Any] | None) -> str:
    if old is None or new is None:
        return "added" if old is None else "no longer given"
    if "run_id" in old and "run_id" in new:
        same_inputs = old.get("fingerprint") == new.get("fingerprint")
        why = "retrained from the same inputs" if same_inputs else "retrained from other inputs"
        return f"another {new.get('run_folder')} run ({why}; run id {old['run_id']} -> {new['run_id']})"
    return "its content changed"


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two fingerprints, one phrase per option or input."""
    found = []
    if old.get("stage") != new.get("stage"):
        found.append(f"stage {old.get('stage')} -> {new.get('stage')}")
    old_config, new_config = old.get("config", {}), new.get("config", {})
    for key in sorted(set(old_config) | set(new_config)):
        if old_config.get(key, "<unset>") != new_config.get(key, "<unset>"):
            found.append(f"{key} {_short(old_config.get(key, '<unset>'))} -> {_short(new_config.get(key, '<unset>'))}")
    old_inputs, new_inputs = old.get("inputs", {}), new.get("inputs", {})
    for key in sorted(set(old_inputs) | set(new_inputs)):
        a, b = old_inputs.get(key), new_inputs.get(key)
        if a != b:
            found.append(f"{key} {(b or a)['path']}: {_input_change(a, b)}")
    return found or ["the fingerprint format"]


# --- opening a run folder ---------------------------------------------------------------------------------


def is_main_process() -> bool:
    """Whether this is the launch's main process (`RANK` 0, or no launcher): the one that writes run folders."""
    return int(os.environ.get("RANK", "0")) == 0


def _contents(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    if not folder.is_dir():
        raise RunFolderError(f"output_dir {folder} is a file, not a folder")
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE)


def _refuse_foreign(folder: Path, stage: str, overwrite: bool) -> None:
    contents = _contents(folder)
    if not contents or overwrite:
        return
    record = read_fingerprint(folder)
    way_out = "Use another output_dir, or pass --overwrite_output_dir true to write into it anyway"
    if record is None:
        listing = ", ".join(contents[:6]) + (", ..." if len(contents) > 6 else "")
        raise RunFolderError(
            f"output_dir {folder} is not empty ({listing}) and is not an instruct-tune run folder (no "
            f"{FINGERPRINT_FILE}): the {stage} stage would overwrite or delete its files. {way_out}"
        )
    if record.get("stage") != stage:
        raise RunFolderError(
            f"output_dir {folder} is the run folder of the {record.get('stage')} stage, not of {stage}: the "
            f"{stage} stage would resume from its checkpoints and overwrite its model. {way_out} "
            "(its checkpoints and results are deleted)"
        )


def _results_held(folder: Path) -> list[str]:
    held = [p.name for p in checkpoint_folders(folder)]
    held += [name for name in (*_WEIGHTS, "metrics.json") if (folder / name).exists()]
    return held


def _clear_results(folder: Path, *, checkpoints: bool) -> None:
    for path in folder.glob(PARTIAL_PREFIX + "*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in checkpoint_folders(folder) if checkpoints else []:
        shutil.rmtree(path)
    for name in RESULT_FILES:
        (folder / name).unlink(missing_ok=True)


@dataclass
class RunFolder:
    """An opened run folder: `resume` is the checkpoint to continue from (decided on the main process)."""

    path: Path
    stage: str
    resume: str | None = None
    record: dict[str, Any] = field(default_factory=dict)

    def resume_checkpoint(self, accelerator: Any = None) -> str | None:
        """The checkpoint every process continues from: the main process's choice, broadcast to the others."""
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            box = [self.resume]
            broadcast_object_list(box, from_process=0)
            return box[0]
        return self.resume

    def close(self) -> None:
        """Release the folder's lock."""
        release_lock(self.path)


def open_run_folder(
    stage: str,
    args: Any,
    configs: Sequence[Any],
    options: RunFolderArguments | None = None,
    *,
    checkpoint_problem: CheckpointProblem = trainer_checkpoint_problem,
) -> RunFolder:
    """Check, lock and fingerprint `args.output_dir` for `stage` and choose the checkpoint to resume from.

    On the main process only (others get the choice from `RunFolder.resume_checkpoint`). Raises
    `RunFolderError` for a foreign folder, another stage's, one made from other inputs, or one locked by a
    live process.
    """
    folder = RunFolder(Path(args.output_dir), stage)
    if not is_main_process():
        return folder
    overwrite = bool(options and options.overwrite_output_dir)
    _refuse_foreign(folder.path, stage, overwrite)
    acquire_lock(folder.path, stage)
    try:
        _prepare(folder, args, configs, overwrite, checkpoint_problem)
    except BaseException:
        release_lock(folder.path)
        raise
    return folder


def _prepare(
    folder: RunFolder, args: Any, configs: Sequence[Any], overwrite: bool, problem: CheckpointProblem
) -> None:
    path = folder.path
    new = fingerprint(folder.stage, configs, path)
    old = read_fingerprint(path)
    for stray in path.glob("checkpoint-*/training_args.bin"):  # a pickle holding the hub token
        stray.unlink()
    same = old is not None and old.get("stage") == folder.stage and old.get("id") == new["id"]
    if not same and (old is not None or (overwrite and _contents(path))):
        held = _results_held(path)
        if held and not overwrite:
            raise RunFolderError(
                f"output_dir {path} holds a {folder.stage} run made from other inputs ({', '.join(held[:4])}), "
                f"so it cannot be resumed or continued: {'; '.join(differences(old, new))}. A checkpoint belongs "
                "to one set of inputs: use another output_dir, move the folder away (make keeps it as "
                f"{path.name}.previous when a stage it reads was redone; FORCE=1 always), or pass "
                "--overwrite_output_dir true to start fresh in it (its checkpoints are deleted)"
            )
        logger.warning("%s: starting fresh; deleted what the previous run left (%s)", path, ", ".join(held) or "-")
        _clear_results(path, checkpoints=True)
    resume = choose_checkpoint(str(path), args.resume_from_checkpoint, problem)
    ours = resume is not None and Path(resume).resolve().parent == path.resolve()
    if resume is None:
        _clear_results(path, checkpoints=False)  # a fresh run: no stale metrics, samples or markers
    run_id = old.get("run_id") if same and ours and old.get("run_id") else uuid.uuid4().hex[:12]
    folder.record = {**new, "run_id": run_id, "resumed_from": resume}
    write_atomic(path / FINGERPRINT_FILE, json.dumps(folder.record, indent=2, default=str) + "\n")
    folder.resume = resume
