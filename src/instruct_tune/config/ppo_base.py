"""The training options of the PPO stage: the few `transformers.TrainingArguments` options our PPO loop reads.

PPO runs its own loop on `accelerate` (`instruct_tune.ppo.trainer`), not on `transformers.Trainer`. Its config
declares only what that loop, the run folder and the Hub push read, under the `TrainingArguments` names and
defaults, so an option PPO would ignore (`--optim adafactor`) is an unknown option like a typo, refused with
what PPO reads instead (`refused_options`) by the same check the YAML and flag parsing use.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from transformers import SchedulerType
from transformers.training_args import trainer_log_levels
from transformers.utils import logging as hf_logging

from instruct_tune.config.checks import bf16_supported, check_count, check_number, check_optimizer_options
from instruct_tune.config.errors import ConfigError
from instruct_tune.config.keys import check_config_keys

# What PPO reads in place of Trainer options a user may reach for (shown when one of them is set).
PPO_INSTEAD = {
    "optim": "PPO always trains with AdamW: learning_rate, weight_decay, adam_beta1/2, adam_epsilon",
    "per_device_train_batch_size": "PPO's batch is rollout_batch_size, split by num_mini_batches and "
    "gradient_accumulation_steps",
    "per_device_eval_batch_size": "PPO evaluates in batches of rollout_batch_size",
    "gradient_checkpointing": "not supported by the PPO stage",
    "eval_strategy": "PPO evaluates eval_samples prompts at the start and the end",
    "save_strategy": "PPO saves a checkpoint every save_steps steps and at the last one (0: none)",
    "lr_scheduler_kwargs": "PPO builds its scheduler from lr_scheduler_type and warmup_steps alone",
    "warmup_ratio": "warmup_steps below 1 is the share of the updates that warm up",
    "run_name": "PPO's trackers log the project `ppo` in output_dir",
    "hub_token": "the push authenticates with HF_TOKEN or `hf auth login`",
}
# Schedulers that step on an eval metric: PPO's updates have none.
_METRIC_SCHEDULERS = (SchedulerType.REDUCE_ON_PLATEAU, SchedulerType.GREEDY)


@dataclass
class PPOTrainingOptions:
    """Optimiser, schedule, precision, logging, checkpoint and Hub options of the PPO stage.

    Names, defaults and meanings are those of `transformers.TrainingArguments`, as are the helpers the stage
    calls (`get_warmup_steps`, `get_process_log_level`, `should_log`).
    """

    refused_options: ClassVar[Mapping[str, str]] = PPO_INSTEAD

    output_dir: str | None = field(
        default=None, metadata={"help": "The run folder (default: trainer_output)."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of sampling, prompt order and initialisation."})
    learning_rate: float = field(default=5e-5, metadata={"help": "AdamW's initial learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW's weight decay."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW's beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW's beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW's epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: off)."})
    lr_scheduler_type: SchedulerType | str = field(
        default="linear", metadata={"help": "Learning rate schedule over all PPO updates."}
    )
    warmup_steps: float = field(
        default=0, metadata={"help": "Updates of linear warmup (below 1: that share of the updates)."}
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches each minibatch is split into (one optimiser step)."}
    )
    num_train_epochs: float = field(
        default=3.0, metadata={"help": "Passes over the prompts when total_episodes is unset."}
    )
    max_steps: int = field(default=-1, metadata={"help": "At most this many PPO steps (-1: no limit)."})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (accelerate)."})
    fp16: bool = field(default=False, metadata={"help": "fp16 mixed precision (accelerate)."})
    use_cpu: bool = field(default=False, metadata={"help": "Train on CPU even where a GPU is available."})
    logging_steps: int = field(default=500, metadata={"help": "Log the step's statistics every N steps (0: off)."})
    report_to: None | str | list[str] = field(
        default="none", metadata={"help": "Trackers of the step statistics (tensorboard, wandb...; none, all)."}
    )
    log_level: str = field(
        default="passive",
        metadata={"help": "Log level of the main process (passive: unchanged).", "choices": trainer_log_levels.keys()},
    )
    log_level_replica: str = field(
        default="warning",
        metadata={"help": "Log level of the other processes.", "choices": trainer_log_levels.keys()},
    )
    log_on_each_node: bool = field(
        default=True, metadata={"help": "Log from the main process of every node, not only of the first."}
    )
    disable_tqdm: bool | None = field(
        default=None, metadata={"help": "No progress bar (default: when logging is quieter than warnings)."}
    )
    save_steps: int = field(
        default=500, metadata={"help": "Checkpoint every N steps and at the last one (0: no checkpoints)."}
    )
    save_total_limit: int | None = field(
        default=None, metadata={"help": "Keep only the newest N checkpoints (null: all)."}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "Checkpoint to continue from (\"true\"/\"last\": the newest)."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Push the finished run folder to hub_model_id."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo (owner/name) of the push."})
    hub_revision: str | None = field(default=None, metadata={"help": "Branch the push commits to."})
    hub_private_repo: bool | None = field(default=None, metadata={"help": "Create the Hub repo as private."})
    local_rank: int = field(default=-1, metadata={"help": "Set by torch.distributed.launch; not saved."})

    def __new__(cls, *args: Any, **kwargs: Any) -> PPOTrainingOptions:
        # A Python caller's keyword PPO does not read gets the message of YAML keys and flags, not a TypeError.
        check_config_keys(kwargs, [cls], cls.__name__)
        return super().__new__(cls)

    def __post_init__(self) -> None:
        self.output_dir = os.path.expanduser(self.output_dir or "trainer_output")
        check_optimizer_options(self)
        check_number("warmup_steps", self.warmup_steps, at_least=0)
        for name in ("logging_steps", "save_steps"):
            check_count(name, getattr(self, name), minimum=0)
        check_count("save_total_limit", self.save_total_limit, minimum=0, optional=True)
        try:
            self.lr_scheduler_type = SchedulerType(self.lr_scheduler_type)
        except ValueError as err:
            raise ConfigError(f"lr_scheduler_type: {err}") from None
        if self.lr_scheduler_type in _METRIC_SCHEDULERS:
            raise ConfigError(f"lr_scheduler_type: {self.lr_scheduler_type.value} steps on an eval metric; PPO has none")
        for name in ("log_level", "log_level_replica"):
            if getattr(self, name) not in trainer_log_levels:
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not one of {', '.join(trainer_log_levels)}")
        if self.fp16 and self.bf16:
            raise ConfigError("bf16 and fp16 are both set: choose one mixed precision")
        if self.bf16 and not self.use_cpu and not bf16_supported():
            raise ConfigError("bf16: this machine has no GPU with bf16; set use_cpu: true to train on CPU in bf16")
        if self.disable_tqdm is None:
            self.disable_tqdm = hf_logging.get_verbosity() > logging.WARN
        self.report_to = _trackers(self.report_to)

    def get_warmup_steps(self, num_training_steps: int) -> int:
        """Warmup updates: `warmup_steps` itself, or below 1 that share of `num_training_steps`."""
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        return math.ceil(num_training_steps * self.warmup_steps)

    # Process indices from the launcher's environment (torchrun, accelerate launch), as accelerate reads them.
    @property
    def process_index(self) -> int:
        return int(os.environ.get("RANK", 0))

    @property
    def local_process_index(self) -> int:
        return int(os.environ.get("LOCAL_RANK", max(self.local_rank, 0)))

    @property
    def should_log(self) -> bool:
        """Whether this process logs: the main process of each node (`log_on_each_node`) or of the run."""
        return (self.local_process_index if self.log_on_each_node else self.process_index) == 0

    def get_process_log_level(self) -> int:
        """The log level of this process: `log_level` where `should_log`, else `log_level_replica`."""
        level = trainer_log_levels[self.log_level if self.should_log else self.log_level_replica]
        return hf_logging.get_verbosity() if level == -1 else level


def _trackers(report_to: None | str | list[str]) -> list[str]:
    """`report_to` as a list of trackers, as `TrainingArguments` reads it ("all": every installed one)."""
    if report_to in ("all", ["all"]):
        from transformers.integrations import get_available_reporting_integrations

        return get_available_reporting_integrations()
    if report_to in (None, "none", ["none"]):
        return []
    return list(report_to) if isinstance(report_to, (list, tuple)) else [report_to]

