"""A lock per run folder (`.instruct_tune.lock`: flock, holding the pid, host and stage of its holder).

A second run on the same output_dir is refused with `RunFolderLocked` naming the folder and the holder's
pid; a lock file left by a dead process is taken over (the kernel drops a dead process's flock). Where the
file system has no flock, the pid in the file decides.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOCK_FILE = ".instruct_tune.lock"


class RunFolderError(RuntimeError):
    """A run folder a stage cannot write into as asked; the message names the folder and the way out."""


class RunFolderLocked(RunFolderError):
    """Another live process is writing the run folder."""


_HELD: dict[Path, int] = {}


def _holder(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


def _locked_error(folder: Path, holder: Mapping[str, Any]) -> RunFolderLocked:
    started = holder.get("started")
    since = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if started else ""
    return RunFolderLocked(
        f"{folder} is in use by another run (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
        f"{holder.get('stage', '?')} stage{since}; lock {folder / LOCK_FILE}): two runs in one output_dir "
        "would resume from each other's checkpoints. Wait for it to end, or use another output_dir"
    )


def acquire_lock(folder: str | Path, stage: str) -> None:
    """Lock `folder` for this process (creating it), or raise `RunFolderLocked` naming the holder's pid."""
    folder = Path(folder)
    release_lock(folder)  # this process ran a stage here before (an in-process rerun after an error)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _locked_error(folder, _holder(path)) from None
        except OSError:  # no flock on this file system: the pid in the file decides
            holder = _holder(path)
            if holder.get("pid") not in (None, os.getpid()) and _alive(holder.get("pid")):
                os.close(fd)
                raise _locked_error(folder, holder) from None
        try:  # the previous holder may have removed the file between our open and our lock
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    previous = _holder(path)
    if previous.get("pid") not in (None, os.getpid()):
        logger.warning(
            "Took over the stale lock %s of pid %s (%s stage): that process no longer holds it",
            path, previous.get("pid"), previous.get("stage", "?"),
        )  # fmt: skip
    record = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage, "started": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    _HELD[folder.resolve()] = fd


def release_lock(folder: str | Path) -> None:
    """Release this process's lock on `folder` (nothing when it holds none)."""
    fd = _HELD.pop(Path(folder).resolve(), None)
    if fd is None:
        return
    (Path(folder) / LOCK_FILE).unlink(missing_ok=True)  # while still holding it: see `acquire_lock`
    os.close(fd)


@atexit.register
def _release_all() -> None:
    for folder in list(_HELD):
        release_lock(folder)
