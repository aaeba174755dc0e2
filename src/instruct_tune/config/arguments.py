"""The arguments every training stage shares: where its data comes from and which model it starts from."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from trl import ModelConfig

from instruct_tune.config.checks import check_mixture
from instruct_tune.config.errors import ConfigError


@dataclass
class DataArguments:
    """Where a stage's data comes from and how it is checked and split."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Local file/folder or Hub dataset id (a single source)."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to read from `dataset_name`."})
    dataset_revision: str | None = field(default=None, metadata={"help": "Hub dataset revision."})
    dataset_mixture: list[dict[str, Any]] | str | None = field(
        default=None,
        metadata={
            "help": "Several sources with weights and task tags: a YAML list of {path, weight, task, split} "
            "(or the same list as a JSON string on the command line). Replaces `dataset_name`."
        },
    )
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Separate eval source; without it a share of the training data is held out."}
    )
    eval_dataset_split: str = field(default="train", metadata={"help": "Split to read from `eval_dataset_name`."})
    eval_fraction: float = field(
        default=0.02, metadata={"help": "Share of the training data held out for eval when no eval set is given."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep at most this many training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep at most this many eval rows."})
    skip_invalid: bool = field(
        default=False, metadata={"help": "Drop and count invalid rows instead of stopping on the first one."}
    )
    per_task_metrics: bool = field(
        default=True, metadata={"help": "Report eval loss per task tag (eval_<task>_loss) beside the overall one."}
    )

    def __post_init__(self) -> None:
        if self.dataset_name and self.dataset_mixture:
            raise ConfigError(
                f"dataset_name ({self.dataset_name}) and dataset_mixture are both set: a stage trains on one of "
                "them; drop the other (a command-line flag replaces the config file's choice of training data)"
            )
        if isinstance(self.dataset_mixture, str):
            try:
                self.dataset_mixture = json.loads(self.dataset_mixture)
            except json.JSONDecodeError as err:
                raise ConfigError(f"dataset_mixture: not a JSON list of sources ({err})") from err
        if self.dataset_mixture is not None and not isinstance(self.dataset_mixture, list):
            raise ConfigError("dataset_mixture: expected a list of {path, weight, task, split} entries")
        if self.dataset_mixture is not None:
            check_mixture(self.dataset_mixture)
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction: {self.eval_fraction} is not in [0, 1)")


@dataclass
class ModelArguments(ModelConfig):
    """TRL's `ModelConfig` plus what the loader needs to fix up checkpoints."""

    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to load when it is not stored with the model."}
    )
    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "A GGUF file inside the `model_name_or_path` folder (a `.gguf` path works alone too): "
            "converted once to a cached fp32 checkpoint folder (instruct_tune.models.gguf_convert)."
        },
    )
    # The one `disable_dropout` option of every stage: TRL configs that declare their own (RewardConfig) get
    # this value through `follow_model_dropout` (instruct_tune.config.trl_stages).
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "Set every dropout probability of the base model to 0 (InstructGPT); LoRA's is `lora_dropout` "
            "(TRL's reward trainer zeroes it too)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.load_in_4bit or self.load_in_8bit) and not self.use_peft:
            raise ConfigError(
                "load_in_4bit/load_in_8bit train only adapters: add `use_peft: true` (QLoRA) or drop quantisation"
            )
