"""Checkpoints a stage can resume from, files written whole or not at all, and disk-full errors named as such.

A checkpoint is complete when it holds what its stage needs to continue: the Trainer's `trainer_state.json`
(written last of a Trainer checkpoint) and readable model or adapter weights (under FSDP with
SHARDED_STATE_DICT, finished `pytorch_model_fsdp_*` shard folders; under DeepSpeed, each rank's model and
optimizer states in the folder `latest` names); our PPO's `ppo_state.json`,
weights, optimizer and scheduler. PPO writes each checkpoint under a temporary name and renames it when
whole (`save_state_atomically`), so a kill or a full disk leaves no `checkpoint-*` missing a file.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
PARTIAL_PREFIX = ".partial-"
PPO_STATE_FILE = "ppo_state.json"
_WEIGHTS = ("model*.safetensors", "adapter_model*.safetensors", "pytorch_model*.bin", "adapter_model*.bin")
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_DISK_FULL_WORDS = ("no space left on device", "storagefull", "disk quota exceeded")

# The reason a checkpoint folder cannot be resumed from, or None when it can.
CheckpointProblem = Callable[[Path], "str | None"]


class DiskFullError(OSError):
    """A write into a run folder failed because its disk is full (ENOSPC); the message names the folder."""


def write_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file and a rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _json_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"no {path.name}"
    try:
        json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return f"{path.name} is truncated"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """Whether the header of a safetensors file parses and the file is as long as the header says."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if size < 8 or 8 + length > size:
                return f"{path.name} is truncated"
            header = json.loads(handle.read(length))
    except (OSError, ValueError):
        return f"{path.name} is unreadable"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    return f"{path.name} is truncated" if 8 + length + end > size else None


def _weights_problem(folder: Path) -> str | None:
    files = {p for pattern in _WEIGHTS for p in folder.glob(pattern)}
    for index in (folder / name for name in _INDEXES):
        if index.is_file():
            problem = _json_problem(index)
            if problem:
                return problem
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
            missing = sorted(s for s in shards if not (folder / s).is_file())
            if missing:
                return f"shard {missing[0]} of {index.name} is missing"
            files |= {folder / s for s in shards}
    if not files:
        # FSDP's SHARDED_STATE_DICT: each model's shards in a torch.distributed.checkpoint folder, whose
        # `.metadata` is written last, once every rank's shard is.
        sharded = sorted(p for p in folder.glob("pytorch_model_fsdp_*") if p.is_dir())
        unfinished = [p.name for p in sharded if not (p / ".metadata").is_file()]
        if sharded:
            return f"{unfinished[0]} has no .metadata" if unfinished else None
        if (folder / "latest").is_file():
            return _deepspeed_problem(folder)
        return "no model or adapter weights"
    for path in sorted(files):
        problem = _safetensors_problem(path) if path.suffix == ".safetensors" else None
        if problem or path.stat().st_size == 0:
            return problem or f"{path.name} is empty"
    return None


def _deepspeed_problem(folder: Path) -> str | None:
    """Why a DeepSpeed checkpoint (`latest` naming the tag folder that holds each rank's model and optimizer
    states, as accelerate's `save_state` writes it under ZeRO) cannot be resumed from (None: it can)."""
    tag = folder / (folder / "latest").read_text().strip()
    models = sorted(tag.glob("*model_states.pt"))
    if not models:
        return f"DeepSpeed checkpoint {tag.name} has no model states"
    optims = sorted(tag.glob("*optim_states.pt"))
    # ZeRO writes one optimizer partition per rank; stage 3 also one model-states file per rank (1-2: one).
    if not optims or (len(models) > 1 and len(optims) != len(models)):
        return f"DeepSpeed checkpoint {tag.name} has {len(optims)} optimizer partitions for {len(models)} ranks"
    empty = next((p.name for p in [*models, *optims] if p.stat().st_size == 0), None)
    return f"{empty} is empty" if empty else None


def trainer_checkpoint_problem(folder: Path) -> str | None:
    """Why a transformers Trainer checkpoint cannot be resumed from (None: it can)."""
    return _json_problem(folder / "trainer_state.json") or _weights_problem(folder)


def ppo_checkpoint_problem(folder: Path) -> str | None:
    """Why a PPO checkpoint (accelerate state + `ppo_state.json`) cannot be resumed from (None: it can)."""
    problem = _json_problem(folder / PPO_STATE_FILE)
    if problem:
        return f"not a complete PPO checkpoint ({problem})"
    if not (folder / "scheduler.bin").is_file():
        return "no scheduler.bin"
    # The optimizer state: `optimizer.bin`; FSDP's SHARDED_STATE_DICT: `optimizer_*/`, complete with its
    # `.metadata`; DeepSpeed: in the tag folder `latest` names (checked with the weights).
    sharded = sorted(p for p in folder.glob("optimizer_*") if p.is_dir())
    if sharded:
        unfinished = [p.name for p in sharded if not (p / ".metadata").is_file()]
        if unfinished:
            return f"{unfinished[0]} has no .metadata"
    elif not (folder / "optimizer.bin").is_file() and not (folder / "latest").is_file():
        return "no optimizer.bin"
    return _weights_problem(folder)


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-<step>` folders of `output_dir`, newest (highest step) first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT.match(p.name).group(1)), reverse=True)


def newest_complete_checkpoint(output_dir: str | Path, problem: CheckpointProblem) -> Path | None:
    """The newest complete checkpoint of `output_dir`; incomplete ones newer than it are logged and removed
    (a rerun writes them again at the same step) so that nothing resumes from them later."""
    for folder in checkpoint_folders(output_dir):
        reason = problem(folder)
        if reason is None:
            return folder
        logger.warning("Skipping the incomplete checkpoint %s (%s): removed it", folder, reason)
        shutil.rmtree(folder, ignore_errors=True)
    return None


def choose_checkpoint(
    output_dir: str, resume_from_checkpoint: str | None, problem: CheckpointProblem | None = None
) -> str | None:
    """The checkpoint a stage continues from: the one asked for, else the newest (complete, when `problem`
    is given) in `output_dir`, else None. `resume_from_checkpoint` may be a path, or "true"/"last" for the
    newest checkpoint of `output_dir`."""
    if resume_from_checkpoint and resume_from_checkpoint.lower() not in ("true", "last"):
        if not Path(resume_from_checkpoint).is_dir():
            raise FileNotFoundError(f"resume_from_checkpoint: {resume_from_checkpoint} is not a checkpoint folder")
        reason = problem(Path(resume_from_checkpoint)) if problem else None
        if reason:
            raise FileNotFoundError(f"resume_from_checkpoint: {resume_from_checkpoint} is incomplete ({reason})")
        logger.info("Resuming from %s", resume_from_checkpoint)
        return resume_from_checkpoint
    if problem is None:
        folders = checkpoint_folders(output_dir)
        last = folders[0] if folders else None
    else:
        last = newest_complete_checkpoint(output_dir, problem)
    if resume_from_checkpoint and last is None:
        which = "complete checkpoint" if problem else "checkpoint"
        raise FileNotFoundError(f"resume_from_checkpoint: no {which}-* folder in {output_dir}")
    if last is not None:
        logger.info("Resuming from %s", last)
    return str(last) if last is not None else None


def _step_of(line: str) -> float:
    """The `step` of a JSONL row; a row cut short by a kill counts as after every step (it is dropped)."""
    try:
        return json.loads(line).get("step", 0) if line.endswith("\n") else math.inf
    except ValueError:
        return math.inf


def trim_jsonl(path: str | Path, last_step: int) -> None:
    """Drop the rows of a per-step JSONL log (`step` field) written after `last_step`: those steps are
    trained again by a resumed run, which logs them anew."""
    path = Path(path)
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _step_of(line) <= last_step]
    if len(kept) < len(lines):
        write_atomic(path, "".join(kept))
        logger.info("%s: dropped %d rows of steps after %d", path, len(lines) - len(kept), last_step)


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or an error it was raised from) is a full disk: ENOSPC/EDQUOT, or a library's words
    for it (safetensors' `StorageFull`, torch's `file write failed`)."""
    seen: BaseException | None = error
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(seen).lower()
        if any(word in text for word in _DISK_FULL_WORDS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _write_failed_on_a_full_disk(error: BaseException, folder: Path) -> bool:
    """torch's writer reports ENOSPC as `file write failed` (no errno): check the disk itself."""
    if "file write failed" not in str(error) and "unexpected pos" not in str(error):
        return False
    try:
        return shutil.disk_usage(folder if folder.exists() else folder.parent).free < 64 * 2**20
    except OSError:
        return False


@contextmanager
def disk_full_named(folder: str | Path) -> Iterator[None]:
    """Turn a disk-full error raised inside the block into `DiskFullError` naming `folder` and the file."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        if not (is_disk_full(error) or _write_failed_on_a_full_disk(error, Path(folder))):
            raise
        where = getattr(error, "filename", None)
        raise DiskFullError(
            errno.ENOSPC,
            f"{folder}: the disk is full (ENOSPC, no space left on device) while writing "
            f"{where or 'the run folder'}. Free space on that disk (or lower save_total_limit) and re-run: "
            "an incomplete checkpoint is skipped and training continues from the last complete one",
        ) from error


def save_state_atomically(accelerator: Any, folder: Path, files: Mapping[str, str]) -> Path:
    """`accelerator.save_state` into `.partial-<name>`, plus `files` (name -> text, main process), then one
    rename to `folder`: a checkpoint folder exists only once it is whole."""
    partial = folder.with_name(PARTIAL_PREFIX + folder.name)
    main = accelerator.is_main_process
    with disk_full_named(folder.parent):
        if main:
            shutil.rmtree(partial, ignore_errors=True)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(partial), safe_serialization=True)
            accelerator.wait_for_everyone()
            if main:
                for name, text in files.items():
                    write_atomic(partial / name, text)
                if folder.exists():
                    shutil.rmtree(folder)
                os.replace(partial, folder)
        except BaseException:
            if main:  # a half-written state is of no use, and on a full disk it holds the space
                shutil.rmtree(partial, ignore_errors=True)
            raise
        accelerator.wait_for_everyone()
    return folder
