"""Non-finite guards of the Trainer-based stages (SFT, reward model): stop before anything is marked finished.

The Trainer hides a NaN loss (`logging_nan_inf_filter` logs the running average instead) and writes the run
folder of a model whose every weight is NaN. Here, in the style of the PPO stage's guard:

- `NonFiniteGuard` (a Trainer mixin): the raw loss of every training step, and the logged `grad_norm`
  (except under fp16, whose loss scaler skips overflowing steps by design) and losses (eval included);
- `check_weights`: every floating weight, on loading (a damaged checkpoint) and after training; under FSDP each
  process checks the shard it holds (a failing rank ends the launch: torchrun stops the others);
- `check_metrics`: every figure about to go into metrics.json (eval losses, normalisation bias and std).

Each raises `NonFiniteError` naming the stage, the step and the quantity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from instruct_tune.ppo.trainer import NonFiniteError

__all__ = ["NonFiniteError", "NonFiniteGuard", "check_loaded_weights", "check_metrics", "check_weights"]

_HINT = "Lower learning_rate, check the model's weights and the data; nothing was marked finished."


def _is_bad(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return not bool(torch.isfinite(value.detach().float()).all())
    return isinstance(value, float) and not math.isfinite(value)


def _logged_losses(logs: Mapping[str, Any], check_grad_norm: bool) -> list[str]:
    keys = [k for k in logs if k == "loss" or k.endswith("_loss")]
    return keys + (["grad_norm"] if check_grad_norm and "grad_norm" in logs else [])


class NonFiniteGuard:
    """Mixin for a `transformers.Trainer` subclass: a NaN/inf step loss or logged figure stops training.

    Set `guard_stage` to the stage's name (used in the message).
    """

    guard_stage = "training"

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if _is_bad(loss):
            step = self.state.global_step + 1
            raise NonFiniteError(
                f"{self.guard_stage} step {step}: loss is not finite ({loss.item()}). {_HINT}"
            )
        return loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        for key in _logged_losses(logs, check_grad_norm=scaler is None):
            if _is_bad(logs[key]):
                raise NonFiniteError(
                    f"{self.guard_stage} step {self.state.global_step}: {key} is not finite ({logs[key]}). {_HINT}"
                )
        super().log(logs, *args, **kwargs)


def check_weights(model: nn.Module, stage: str, when: str, hint: str = _HINT) -> None:
    """Refuse a model with a NaN/inf floating weight, naming the first such tensor.

    A weight sharded by FSDP (a `DTensor`) is checked in the shard this process holds, without a collective;
    weights on the meta device (FSDP's `cpu_ram_efficient_loading` loads them on rank 0 only) are rank 0's to check.
    """
    for name, param in model.named_parameters():
        values = param.to_local() if isinstance(param, DTensor) else param
        if values.is_meta or not values.is_floating_point() or not values.numel():
            continue
        if not bool(torch.isfinite(values.detach()).all()):
            raise NonFiniteError(f"{stage} {when}: weight {name} holds NaN/inf. {hint}")


def check_loaded_weights(model: nn.Module, stage: str, source: str) -> None:
    """`check_weights` on a freshly loaded model: NaN/inf there means a damaged checkpoint."""
    hint = "The checkpoint is damaged: download, rebuild or retrain it; nothing was trained."
    check_weights(model, stage, f"model loaded from {source}", hint)


def check_metrics(metrics: Mapping[str, Any], stage: str, step: int) -> None:
    """Refuse metrics (about to be written as metrics.json) with a NaN/inf figure, naming it."""
    for key, value in metrics.items():
        if _is_bad(value):
            raise NonFiniteError(f"{stage} after step {step}: {key} is not finite ({value}). {_HINT}")
