"""Stage configuration: one dataclass declaration per stage serves YAML files, flags and Python callers.

`parse_args(SFTStageConfig, DataArguments, ModelArguments)` reads `--config file.yaml` for defaults and lets
command-line flags override them, as TRL's `TrlParser` does, but refuses YAML keys that no dataclass
declares (naming the file and the closest known key) instead of letting a typo pass silently.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainingArguments
from trl import ModelConfig, RewardConfig, SFTConfig, TrlParser

from instruct_tune.config_checks import (
    check_count,
    check_max_length,
    check_mixture,
    check_number,
    check_trainer_options,
    refuse_unread_options,
)

# Fields never written to a saved config: secrets, and per-process values that must come from the launcher.
logger = logging.getLogger(__name__)

_UNSAVED_FIELDS = {"hub_token", "push_to_hub_token", "local_rank", "_n_gpu", "deepspeed_plugin"}


class ConfigError(ValueError):
    """A configuration file or option that cannot be used; the message names the file and the key."""


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
    disable_dropout: bool = field(
        default=True,
        metadata={"help": "Set every dropout probability of the base model to 0 (InstructGPT); LoRA's is `lora_dropout`."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.load_in_4bit or self.load_in_8bit) and not self.use_peft:
            raise ConfigError(
                "load_in_4bit/load_in_8bit train only adapters: add `use_peft: true` (QLoRA) or drop quantisation"
            )


def bf16_supported() -> bool:
    """Whether this machine trains in bf16 mixed precision: a CUDA device that supports it."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


class DevicePrecisionDefault:
    """Mixin for TRL configs: an unset `bf16` means "bf16 where the device supports it".

    TRL turns bf16 on whenever fp16 is off, which fails on a CPU-only machine; with this the same config
    trains on CPU and in bf16 on a GPU. An explicit `bf16: true/false` is kept as given.
    """

    def __post_init__(self) -> None:
        check_trainer_options(self)  # types and ranges, before TRL or torch read them (config_checks)
        if self.bf16 is None and not self.fp16:
            self.bf16 = bf16_supported()
        super().__post_init__()


@dataclass
class SFTStageConfig(DevicePrecisionDefault, SFTConfig):
    """TRL's `SFTConfig`, with the bf16 default chosen per device and packing in separate rows."""

    repack_batches: bool = field(
        default=False,
        metadata={
            "help": "Without packing: lay the chats of each padded batch side by side in rows as wide as its "
            "longest chat (position ids restarting per chat): the same chats and loss per step on fewer "
            "positions (see instruct_tune.data.row_packing)."
        },
    )
    packing_per_row: bool = field(
        default=False,
        metadata={
            "help": "With `packing: true` (bfd): keep the packed rows as rows, each chat attending only to "
            "itself (block-diagonal mask from restarted position ids), instead of TRL's one flat padding-free "
            "row, whose attention without flash-attn spans the whole batch (see instruct_tune.data.row_packing)."
        },
    )
    max_dropped_share: float = field(
        default=0.25,
        metadata={
            "help": "Largest share of the training (or eval) rows that `max_length` may drop (prompt alone too "
            "long) or cut (completion truncated, EOS lost) before the stage stops; every such row is counted "
            "in the log and in metrics.json either way (1.0: allow any)."
        },
    )
    fused_lm_head: bool | None = field(
        default=None,
        metadata={
            "help": "TRL's fused LM head (per-token log-probs computed in vocabulary tiles). Unset: on CUDA, where "
            "it is a Triton kernel; elsewhere the model's own head and log_softmax, measured 1.6x faster a step "
            "on CPU (see instruct_tune.models.lm_head)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_max_length("max_length", self.max_length)
        check_number("max_dropped_share", self.max_dropped_share, at_least=0, at_most=1)
        if self.repack_batches and (self.packing or self.padding_free):
            raise ConfigError(
                "repack_batches: packs each batch of unpacked chats; it needs packing: false and padding_free: "
                f"false (got packing: {self.packing}, padding_free: {self.padding_free})"
            )
        if self.packing_per_row:
            if not self.packing or self.packing_strategy not in ("bfd", "bfd_split"):
                raise ConfigError(
                    f"packing_per_row: needs packing: true with packing_strategy bfd (got packing: "
                    f"{self.packing}, packing_strategy: {self.packing_strategy})"
                )
            if self.padding_free:
                raise ConfigError("packing_per_row: rows are the alternative to padding_free; set one of them")


@dataclass
class RewardStageConfig(DevicePrecisionDefault, RewardConfig):
    """TRL's `RewardConfig` with the options of our reward-model stage.

    `per_device_train_batch_size` counts prompts (groups of ranked responses), not pairs: every batch holds
    all responses of its prompts and the loss weights each prompt once (see `instruct_tune.stages.reward`).
    """

    # `ModelArguments.disable_dropout` is the one option (two dataclasses declaring it clash in the parser);
    # the stage copies it here for TRL.
    disable_dropout: bool = field(default=True, init=False)
    policy_path: str | None = field(
        default=None,
        metadata={
            "help": "SFT run folder of the policy this reward model will score: its chat template must equal "
            "the reward model's, and its samples are the reference of the reward normalisation."
        },
    )
    normalization_prompts: str | None = field(
        default=None,
        metadata={
            "help": "Prompts (any prompt-bearing format) the policy answers for the normalisation; without "
            "it, the prompts of the eval comparisons."
        },
    )
    normalization_samples: int = field(
        default=256,
        metadata={"help": "Number of prompts (one sampled response each) the normalisation uses."},
    )
    normalization_max_new_tokens: int = field(
        default=64, metadata={"help": "Longest policy response sampled for the normalisation."}
    )
    normalization_temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature of the policy responses of the normalisation."}
    )
    use_margin: bool = field(
        default=False,
        metadata={
            "help": "Subtract the data's `margin` (a `margin` column, or score differences of rankings given "
            "by `scores`) inside the loss: -log sigmoid(r_w - r_l - margin_scale * margin)."
        },
    )
    margin_scale: float = field(default=1.0, metadata={"help": "Factor applied to the data's margins."})
    share_prompt: bool = field(
        default=True,
        metadata={
            "help": "Pack the K responses of a prompt into one row so the prompt tokens are computed once "
            "(sdpa/eager attention; other attention implementations score each response in its own row)."
        },
    )
    calibration_buckets: int = field(
        default=5, metadata={"help": "Equal-count buckets of |r_a - r_b| in the calibration table."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_max_length("max_length", self.max_length)
        if self.normalization_samples < 1:
            raise ConfigError(f"normalization_samples: {self.normalization_samples} must be >= 1")
        if self.normalization_max_new_tokens < 1:
            raise ConfigError(
                f"normalization_max_new_tokens: {self.normalization_max_new_tokens} must be >= 1"
            )
        if self.normalization_temperature <= 0:
            raise ConfigError(f"normalization_temperature: {self.normalization_temperature} must be > 0")
        if self.calibration_buckets < 1:
            raise ConfigError(f"calibration_buckets: {self.calibration_buckets} must be >= 1")
        if self.normalization_prompts and not self.policy_path:
            raise ConfigError(
                "normalization_prompts: set `policy_path` (the SFT run folder) to sample responses from"
            )


# The `TrainingArguments` options the PPO stage reads (AdamW, its scheduler, precision, logging, checkpoints,
# the Hub push and what launchers set).
PPO_TRAINING_OPTIONS = {
    "output_dir", "seed", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
    "max_grad_norm", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio",
    "gradient_accumulation_steps", "num_train_epochs", "max_steps", "bf16", "fp16", "use_cpu",
    "logging_steps", "logging_dir", "report_to", "run_name", "log_level", "log_level_replica",
    "log_on_each_node", "disable_tqdm", "save_steps", "save_total_limit", "resume_from_checkpoint",
    "push_to_hub", "hub_model_id", "hub_revision", "hub_private_repo", "hub_token", "local_rank",
}  # fmt: skip
# What PPO reads in place of some Trainer options a user may reach for.
PPO_INSTEAD = {
    "optim": "PPO always trains with AdamW: learning_rate, weight_decay, adam_beta1/2, adam_epsilon",
    "per_device_train_batch_size": "PPO's batch is rollout_batch_size, split by num_mini_batches and "
    "gradient_accumulation_steps",
    "gradient_checkpointing": "not supported by the PPO stage",
    "eval_strategy": "PPO evaluates eval_samples prompts at the start and the end",
}


@dataclass
class PPOStageConfig(DevicePrecisionDefault, TrainingArguments):
    """Options of our PPO stage (InstructGPT step 3) on top of `transformers.TrainingArguments`.

    One PPO step: every process samples `rollout_batch_size` prompts and answers them, scores the answers,
    then runs `ppo_epochs` passes over them in `num_mini_batches` minibatches (each split into
    `gradient_accumulation_steps` micro-batches). `total_episodes` (default: `num_train_epochs` passes over
    the prompts) fixes the number of steps. `model_name_or_path` is the SFT run folder.
    """

    reward_model_path: str | None = field(
        default=None, metadata={"help": "Reward stage run folder (its normalisation is applied)."}
    )
    shared_base: bool = field(
        default=True,
        metadata={
            "help": "One frozen base for policy and reference (and reward and value when the reward model is "
            "a LoRA adapter over the SFT model); false loads four separate models."
        },
    )
    packed_forward: bool = field(
        default=True,
        metadata={
            "help": "Run every forward over a rollout padding-free: the real tokens of several sequences share a "
            "row, each attending only to itself (about half the positions on short answers); false: padded."
        },
    )
    total_episodes: int | None = field(
        default=None, metadata={"help": "Prompts answered in all (default: num_train_epochs x prompts)."}
    )
    rollout_batch_size: int = field(default=64, metadata={"help": "Prompts per process per PPO step."})
    num_mini_batches: int = field(default=1, metadata={"help": "Minibatches per PPO epoch of a rollout batch."})
    ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    forward_batch_size: int | None = field(
        default=None, metadata={"help": "Rows per no-grad forward when scoring a rollout (default: all)."}
    )
    max_prompt_length: int = field(default=256, metadata={"help": "Longer prompts are skipped (counted)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Longest response sampled."})
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature; training logprobs use the same one."}
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold (1.0: off)."})
    missing_eos_penalty: float | None = field(
        default=1.0, metadata={"help": "Subtracted from the score of a response without EOS (null: none)."}
    )
    kl_coef: float = field(default=0.05, metadata={"help": "beta of the per-token KL penalty (initial value)."})
    target_kl: float | None = field(
        default=None,
        metadata={"help": "Adaptive beta aiming at this KL per response (lm-human-preferences); null: fixed."},
    )
    kl_horizon: float = field(default=10000, metadata={"help": "Horizon (episodes) of the adaptive beta."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip around the rollout's values."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    gamma: float = field(default=1.0, metadata={"help": "Discount of GAE."})
    lam: float = field(default=0.95, metadata={"help": "lambda of GAE."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Scale per-token rewards to unit variance."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Whiten advantages over each batch."})
    reward_clip: float | None = field(default=None, metadata={"help": "Clip scores to [-x, x] (null: off)."})
    scale_scores: bool = field(
        default=False,
        metadata={
            "help": "Divide scores by the reward model's std on its reference responses (lm-human-preferences' "
            "gain), so kl_coef, missing_eos_penalty and cliprange_value act on a unit scale."
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Run model code shipped with checkpoints."})
    ptx_coef: float = field(
        default=0.0, metadata={"help": "PPO-ptx gamma: weight of the LM loss on `ptx_dataset` (0: plain PPO)."}
    )
    ptx_dataset: str | None = field(
        default=None, metadata={"help": "Pretraining/SFT text (`text` rows, or chats) for PPO-ptx."}
    )
    ptx_heldout_rows: int = field(
        default=0,
        metadata={
            "help": "Leave the last N rows of `ptx_dataset` out of PPO-ptx (kept for the eval's perplexity, "
            "its `ptx_eval_rows`)."
        },
    )
    ptx_batch_size: int = field(default=8, metadata={"help": "PPO-ptx rows per minibatch per process."})
    ptx_max_length: int = field(default=128, metadata={"help": "PPO-ptx rows are cut to this many tokens."})
    eval_samples: int = field(
        default=256, metadata={"help": "Held-out prompts answered at the start and end (0: no eval)."}
    )
    max_kl: float | None = field(
        default=50.0,
        metadata={
            "help": "Stop (before anything is marked finished) when the mean KL to the SFT policy of a rollout or "
            "of the end eval exceeds this many nats per response (null: off); the tiny default logs ~0.8."
        },
    )
    min_eos_share: float | None = field(
        default=0.05,
        metadata={
            "help": "Stop when fewer than this share of a rollout's (or the end eval's) responses end in EOS "
            "within max_new_tokens (null or 0: off); a policy that never stops is broken."
        },
    )
    sample_steps: int = field(default=10, metadata={"help": "Log a table of sample generations every N steps."})
    num_samples_logged: int = field(default=6, metadata={"help": "Rows of each sample table."})

    def __post_init__(self) -> None:
        # Every other TrainingArguments option (optim, gradient_checkpointing, per_device_train_batch_size...)
        # is ignored by our PPO loop: setting one is an error naming it.
        refuse_unread_options(self, TrainingArguments, PPO_TRAINING_OPTIONS, "ppo", PPO_INSTEAD)
        super().__post_init__()
        positive = ("rollout_batch_size", "num_mini_batches", "ppo_epochs", "max_new_tokens", "ptx_batch_size")
        for name in (*positive, "max_prompt_length", "ptx_max_length"):
            check_count(name, getattr(self, name))
        check_count("total_episodes", self.total_episodes, optional=True)
        check_number("max_kl", self.max_kl, above=0, optional=True)
        check_number("min_eos_share", self.min_eos_share, at_least=0, at_most=1, optional=True)
        if self.rollout_batch_size % (self.num_mini_batches * self.gradient_accumulation_steps):
            raise ConfigError(
                f"rollout_batch_size {self.rollout_batch_size} must divide into num_mini_batches "
                f"{self.num_mini_batches} x gradient_accumulation_steps {self.gradient_accumulation_steps}"
            )
        if self.temperature <= 0:
            raise ConfigError(f"temperature: {self.temperature} must be > 0 (PPO trains on sampled responses)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: {self.top_p} is not in (0, 1]")
        if self.ptx_coef < 0:
            raise ConfigError(f"ptx_coef: {self.ptx_coef} must be >= 0")
        if self.ptx_coef > 0 and not self.ptx_dataset:
            raise ConfigError("ptx_coef > 0 needs `ptx_dataset` (pretraining or SFT text)")
        if self.ptx_heldout_rows < 0:
            raise ConfigError(f"ptx_heldout_rows: {self.ptx_heldout_rows} must be >= 0")
        if self.target_kl is not None and self.target_kl <= 0:
            raise ConfigError(f"target_kl: {self.target_kl} must be > 0 (null for a fixed beta)")


@dataclass
class EvalStageConfig:
    """Options of the evaluation stage: policies against their SFT start on held-out prompts.

    Every policy answers every prompt once with the same decoding and seeds (sampled at `temperature`, and
    greedy when `greedy`); the reward model and, where the task has one, the gold judge compare each answer
    with the SFT policy's (ties half). See `instruct_tune.stages.eval` for the metrics.
    """

    output_dir: str = field(default="outputs/tiny/eval", metadata={"help": "Where metrics, tables and plots go."})
    sft_path: str | None = field(
        default=None, metadata={"help": "SFT run folder (or checkpoint): the baseline and the KL reference."}
    )
    policy_paths: list[str] = field(
        default_factory=list,
        metadata={"help": "Policy run folders to evaluate (PPO, PPO-ptx...); the first gives the headline keys."},
    )
    policy_names: list[str] | None = field(
        default=None, metadata={"help": "A label per policy (default: each folder's name)."}
    )
    reward_model_path: str | None = field(
        default=None, metadata={"help": "Reward stage run folder (scores are normalised)."}
    )
    dataset_name: str = field(
        default="data/tiny/heldout_prompts.jsonl",
        metadata={"help": "Held-out prompts: any prompt-bearing file, folder or Hub dataset id."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to read from `dataset_name`."})
    max_samples: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    ptx_eval_dataset: str | None = field(
        default=None,
        metadata={"help": "Held-out plain text (`text` rows) for the perplexity of each policy (null: skip)."},
    )
    ptx_eval_rows: int | None = field(
        default=None, metadata={"help": "Use only the last N rows of `ptx_eval_dataset` (null: all)."}
    )
    ptx_eval_max_length: int = field(default=128, metadata={"help": "Perplexity texts are cut to this many tokens."})
    max_new_tokens: int = field(default=64, metadata={"help": "Longest response generated."})
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature (the PPO training one); the KL uses it too."}
    )
    samples_per_prompt: int = field(
        default=1,
        metadata={
            "help": "Sampled answers per prompt and policy (batch seeds differ): every figure averages over all "
            "of them, so a win rate on N prompts carries less sampling noise. Greedy answers once."
        },
    )
    greedy: bool = field(default=True, metadata={"help": "Also answer greedily and report it beside sampling."})
    batch_size: int = field(default=64, metadata={"help": "Prompts (or texts) per forward or generate call."})
    seed: int = field(default=42, metadata={"help": "Sampling seed: batch i is sampled with seed + i x batch_size."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run model code shipped with checkpoints."})

    def __post_init__(self) -> None:
        if isinstance(self.policy_paths, str):
            self.policy_paths = [self.policy_paths]
        if isinstance(self.policy_names, str):
            self.policy_names = [self.policy_names]
        if self.policy_names is not None and len(self.policy_names) != len(self.policy_paths):
            raise ConfigError(
                f"policy_names: {len(self.policy_names)} names for {len(self.policy_paths)} policy_paths"
            )
        for name in ("max_new_tokens", "batch_size", "ptx_eval_max_length", "samples_per_prompt"):
            check_count(name, getattr(self, name))
        for name in ("max_samples", "ptx_eval_rows"):
            check_count(name, getattr(self, name), optional=True)
        if self.temperature <= 0:
            raise ConfigError(f"temperature: {self.temperature} must be > 0 (`greedy` adds greedy decoding)")


def _known_fields(dataclass_types: Iterable[type]) -> set[str]:
    return {f.name for dc in dataclass_types for f in dataclasses.fields(dc) if f.init}


def read_yaml_config(path: str | Path) -> dict[str, Any]:
    """Read a stage config file into a mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a YAML mapping of option: value")
    return data


def check_config_keys(config: dict[str, Any], dataclass_types: Sequence[type], source: str) -> None:
    """Refuse keys that no dataclass declares, suggesting the closest known one."""
    known = _known_fields(dataclass_types) | {"env"}
    unknown = [key for key in config if key not in known]
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        hints.append(f"`{key}`" + (f" (did you mean `{close[0]}`?)" if close else ""))
    raise ConfigError(f"{source}: unknown option(s) {', '.join(hints)}")


# Options that choose a stage's training data, and those that describe the eval set that goes with it.
_TRAIN_DATA_KEYS = ("dataset_name", "dataset_config", "dataset_split", "dataset_revision", "dataset_mixture")
_EVAL_DATA_KEYS = ("eval_dataset_name", "eval_dataset_split")


def _flags_given(args: Sequence[str]) -> set[str]:
    """The option names set on the command line (`--name value` or `--name=value`)."""
    return {a[2:].split("=", 1)[0].replace("-", "_") for a in args if a.startswith("--")}


def _data_overrides(config: dict[str, Any], flags: set[str], config_path: str) -> dict[str, Any]:
    """The config file's values less those replaced by the command line's choice of training data.

    `--dataset_name` on the command line replaces the file's `dataset_mixture` as a whole (and vice versa),
    and the file's eval set with it unless `--eval_dataset_name` is given too: another data set's eval rows
    would be reported as this run's. The run then holds out `eval_fraction` of the new training data.
    """
    if not flags & {"dataset_name", "dataset_mixture"}:
        return config
    dropped = [k for k in _TRAIN_DATA_KEYS if k in config and k not in flags]
    if "eval_dataset_name" not in flags:
        dropped += [k for k in _EVAL_DATA_KEYS if k in config and k not in flags]
    if dropped:
        logger.warning(
            "Training data given on the command line: %s's %s no longer apply%s",
            config_path,
            ", ".join(f"`{k}`" for k in dropped),
            "" if "eval_dataset_name" in flags or "eval_dataset_name" not in config
            else "; the eval set is held out of the new training data (eval_fraction), or pass --eval_dataset_name",
        )
    return {k: v for k, v in config.items() if k not in dropped}


def parse_args(*dataclass_types: type, args: Sequence[str] | None = None) -> tuple[Any, ...]:
    """Parse `--config file.yaml` plus flag overrides into one instance of each dataclass.

    The YAML file gives defaults, flags override them; an unknown key in the file is an error naming it.
    Training data chosen by a flag replaces the file's training data and eval set (see `_data_overrides`).
    """
    args = list(sys.argv[1:] if args is None else args)
    parser = TrlParser(dataclass_types=list(dataclass_types))
    if "--config" not in args:
        return parser.parse_args_and_config(args=args)
    index = args.index("--config")
    if index + 1 >= len(args):
        raise ConfigError("--config needs a file path")
    config_path = args[index + 1]
    flag_args = args[:index] + args[index + 2 :]
    config = read_yaml_config(config_path)
    check_config_keys(config, dataclass_types, config_path)
    config = _data_overrides(config, _flags_given(flag_args), config_path)
    for key, value in (config.pop("env", None) or {}).items():  # as TrlParser does
        os.environ[key] = str(value)
    unused = parser.set_defaults_with_config(**config)
    if unused:
        raise ConfigError(f"{config_path}: options no stage dataclass reads: {unused[::2]}")
    return parser.parse_args_into_dataclasses(args=flag_args)


def _plain(value: Any) -> Any:
    """Turn config values into YAML-safe plain data."""
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def resolved_config(*configs: Any) -> dict[str, Any]:
    """All fields of the given config instances as one flat mapping, loadable again with `--config`."""
    merged: dict[str, Any] = {}
    for config in configs:
        for f in dataclasses.fields(config):
            if f.init and f.name not in _UNSAVED_FIELDS and not f.name.startswith("_"):
                merged[f.name] = _plain(getattr(config, f.name))
    return merged


def save_config(output_dir: str | Path, *configs: Any) -> Path:
    """Write the resolved config of a stage as `config.yaml` in its run folder."""
    path = Path(output_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(resolved_config(*configs), sort_keys=False))
    return path
