"""Training figures of a whole run, also when it was resumed from a checkpoint.

The Trainer's `train_loss` averages the steps of the last `train()` call only, and the per-window figures
TRL adds to it (a reward model's `accuracy`, `margin`...) exist only when that call logged a step: a run
resumed from its last checkpoint reported `train_loss: 0.0` with them missing. The run's log history
(carried in every checkpoint's `trainer_state.json`) holds the figures of every step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import TrainerCallback

# Keys of a log entry that describe the logging call, not the training window before it.
_NOT_FIGURES = {"step", "epoch", "learning_rate", "grad_norm", "num_tokens"}


def _training_entries(log_history: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The log entries written during training steps (they carry `loss`; eval and summary entries do not)."""
    return [entry for entry in log_history if "loss" in entry and "step" in entry]


def whole_run_metrics(
    metrics: Mapping[str, Any], log_history: Sequence[Mapping[str, Any]], *, resumed: bool
) -> dict[str, Any]:
    """`metrics` of `trainer.train()`, with the figures of the whole run when it was `resumed`.

    `train_loss` becomes the mean logged loss weighted by the steps each entry covers; figures of the last
    logging window (TRL's `accuracy`, `margin`...) missing from `metrics` come from the last entry logging them.
    """
    out = dict(metrics)
    entries = _training_entries(log_history)
    if not resumed or not entries:
        return out
    previous, weighted, steps = 0, 0.0, 0
    for entry in entries:
        covered = max(int(entry["step"]) - previous, 1)
        weighted += float(entry["loss"]) * covered
        steps += covered
        previous = int(entry["step"])
    out["train_loss"] = weighted / steps
    for entry in entries:
        for key, value in entry.items():
            if key not in _NOT_FIGURES and key != "loss" and key not in metrics:
                out[key] = value
    return out


class NothingLeftToTrain(Exception):
    """Raised by `StopAtTheEnd` when a resumed run's checkpoint already is at its last step."""


class StopAtTheEnd(TrainerCallback):
    """Train no step when resumed from a checkpoint at (or past) the run's last step.

    transformers 5 runs one optimizer step after resuming before it compares the step with `max_steps`, so a
    run resumed from its final checkpoint trained one step past it. At `on_train_begin` the checkpoint's
    weights, optimizer and state are loaded: stopping there leaves the model as the checkpoint holds it.
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise NothingLeftToTrain
