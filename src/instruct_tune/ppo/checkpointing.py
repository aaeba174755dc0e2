"""PPO checkpoints: accelerate's state (model, optimizer, scheduler, RNG) plus the loop's own state, atomically.

A checkpoint is written under a temporary name and renamed when whole, so a kill or a full disk leaves no
partial `checkpoint-*`; `save_total_limit` keeps the newest ones.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from instruct_tune.checkpoints import PPO_STATE_FILE, checkpoint_folders, save_state_atomically

STATE_FILE = PPO_STATE_FILE

__all__ = ["STATE_FILE", "load_checkpoint", "rotate_checkpoints", "save_checkpoint"]


def save_checkpoint(
    accelerator: Accelerator, output_dir: Path, step: int, state: dict[str, Any], save_total_limit: int | None
) -> Path:
    """Write `checkpoint-{step}` (accelerate's state and `state` as `STATE_FILE`) and rotate the old ones."""
    folder = output_dir / f"checkpoint-{step}"
    save_state_atomically(accelerator, folder, {STATE_FILE: json.dumps(state)})
    if accelerator.is_main_process:
        rotate_checkpoints(output_dir, save_total_limit)
    accelerator.wait_for_everyone()
    return folder


def rotate_checkpoints(output_dir: Path, limit: int | None) -> None:
    """Delete all but the newest `limit` checkpoints (None or 0: keep every one)."""
    if not limit:
        return
    for old in checkpoint_folders(output_dir)[limit:]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(accelerator: Accelerator, folder: str | Path) -> dict[str, Any]:
    """Restore accelerate's state from `folder`; returns the loop's state saved with it."""
    folder = Path(folder)
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{folder} is not a PPO checkpoint (no {STATE_FILE})")
    accelerator.load_state(str(folder))
    return json.loads(state_file.read_text())
