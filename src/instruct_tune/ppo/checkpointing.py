"""PPO checkpoints: accelerate's state (model, optimizer, scheduler, RNG) plus the loop's own state, atomically.

A checkpoint is written under a temporary name and renamed when whole, so a kill or a full disk leaves no
partial `checkpoint-*`; `save_total_limit` keeps the newest ones. It holds only the weights that train: a frozen
base under LoRA adapters (597 MB for SmolLM2-135M) never changes during a run and is rebuilt from the run's
inputs on resume.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors import safe_open

from instruct_tune.checkpoints import PPO_STATE_FILE, checkpoint_folders, save_state_atomically

STATE_FILE = PPO_STATE_FILE

__all__ = [
    "STATE_FILE",
    "keep_trainable_weights_only",
    "load_checkpoint",
    "rotate_checkpoints",
    "save_checkpoint",
]

# Engines that write the model's state themselves; under the others accelerate writes `model.safetensors`.
_SELF_SAVING_ENGINES = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)


def _frozen_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def _is_frozen(key: str, frozen: set[str]) -> bool:
    # The key or one of its dotted prefixes: a 4-bit base weight also saves its quantisation state under
    # `<name>.absmax`, `<name>.quant_map`, ...
    parts = key.split(".")
    return any(".".join(parts[:end]) in frozen for end in range(len(parts), 0, -1))


def keep_trainable_weights_only(accelerator: Accelerator) -> None:
    """Make `accelerator.save_state` write only the parameters that train (and buffers), not the frozen ones."""

    def drop_frozen(models: list[torch.nn.Module], weights: list[dict[str, Any]], _output_dir: str) -> None:
        # `weights` is empty where FSDP or DeepSpeed wrote the models themselves.
        for model, state in zip(models, weights, strict=False):
            frozen = _frozen_names(model)
            for key in [key for key in state if _is_frozen(key, frozen)]:
                del state[key]

    accelerator.register_save_state_pre_hook(drop_frozen)


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


def load_checkpoint(accelerator: Accelerator, folder: str | Path, model: torch.nn.Module) -> dict[str, Any]:
    """Restore accelerate's state from `folder` into `model` (the prepared trainable module) and the optimizer,
    scheduler and RNGs; returns the loop's state saved with it."""
    folder = Path(folder)
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{folder} is not a PPO checkpoint (no {STATE_FILE})")
    if accelerator.distributed_type in _SELF_SAVING_ENGINES:
        accelerator.load_state(str(folder))
        return json.loads(state_file.read_text())
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"{folder} holds no model.safetensors: not a checkpoint of one process or DDP"
        )
    with safe_open(str(weights), framework="pt") as saved:
        keys = set(saved.keys())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable - keys)
    if missing:
        raise ValueError(
            f"{weights} lacks {len(missing)} of the {len(trainable)} trainable weights of this run (e.g. "
            f"{missing[:3]}): it was saved by a run with other adapters or another model"
        )
    accelerator.load_state(str(folder), strict=False)  # the frozen weights are left out of it on purpose
    return json.loads(state_file.read_text())
