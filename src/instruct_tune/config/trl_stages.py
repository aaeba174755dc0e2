"""Configs of the stages built on TRL trainers: SFT (`SFTConfig`) and the reward model (`RewardConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trl import RewardConfig, SFTConfig

from instruct_tune.config.arguments import ModelArguments
from instruct_tune.config.checks import bf16_supported, check_max_length, check_number, check_trainer_options
from instruct_tune.config.errors import ConfigError


@dataclass
class TRLStageDefaults:
    """Mixin for TRL configs: the bf16 default chosen per device, and dropout left to `ModelArguments`.

    TRL turns bf16 on whenever fp16 is off, which fails on a CPU-only machine; here an unset `bf16` means "bf16
    where the device supports it", so the same config trains on CPU and in bf16 on a GPU. An explicit
    `bf16: true/false` is kept as given.
    """

    # TRL configs that declare `disable_dropout` (RewardConfig) would clash with `ModelArguments.disable_dropout`
    # in the parser: here it is no option (init=False), only the copy their trainer reads (`follow_model_dropout`).
    disable_dropout: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        check_trainer_options(self)  # types and ranges, before TRL or torch read them (config.checks)
        if self.bf16 is None and not self.fp16:
            self.bf16 = bf16_supported()
        super().__post_init__()


def follow_model_dropout(training_args: Any, model_args: ModelArguments) -> None:
    """Give a TRL stage config the stage's one `disable_dropout` option, `ModelArguments.disable_dropout`.

    The model loader zeroes the base model's dropout before LoRA wraps it; a TRL trainer that reads its own
    `args.disable_dropout` (RewardTrainer: every `nn.Dropout` of the model it trains, LoRA's included) then
    follows the same choice. Call before the trainer is built.
    """
    if hasattr(training_args, "disable_dropout"):
        training_args.disable_dropout = model_args.disable_dropout


@dataclass
class SFTStageConfig(TRLStageDefaults, SFTConfig):
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
class RewardStageConfig(TRLStageDefaults, RewardConfig):
    """TRL's `RewardConfig` with the options of our reward-model stage.

    `per_device_train_batch_size` counts prompts (groups of ranked responses), not pairs: every batch holds
    all responses of its prompts and the loss weights each prompt once (see `instruct_tune.stages.reward`).
    """

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
