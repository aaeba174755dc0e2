"""Small, fast CPU configurations of the stages over the session's tiny model, and the reward runs built on them.

Each builder holds the values the test modules share; `overrides` replace any of them or add others. A module
that runs many stages of one size names its own values once, e.g. `partial(stage_runs.ppo_args, ppo_epochs=2)`.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from helpers import TINY_DATA, head_of

from instruct_tune.config import (
    DataArguments,
    ModelArguments,
    PPOStageConfig,
    RewardStageConfig,
    SFTStageConfig,
)
from instruct_tune.stages.reward import run_reward

SFT_TYPES = (SFTStageConfig, DataArguments, ModelArguments)
REWARD_TYPES = (RewardStageConfig, DataArguments, ModelArguments)
PPO_TYPES = (PPOStageConfig, DataArguments, ModelArguments)


def _trainer(output_dir: Path) -> dict:
    """What every tiny TRL-stage run here shares: 8 rows a batch, no eval or saving, one seeded CPU process."""
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        max_length=128,
        use_cpu=True,
        seed=0,
    )


def sft_args(output_dir: Path, **overrides) -> SFTStageConfig:
    """How long it trains is the caller's (`max_steps`)."""
    return SFTStageConfig(**{**_trainer(output_dir), **overrides})


def reward_args(output_dir: Path, **overrides) -> RewardStageConfig:
    """One epoch over the rankings given."""
    return RewardStageConfig(**{**_trainer(output_dir), "num_train_epochs": 1, **overrides})


def normalised_by(policy: Path, prompts: Path, *, samples: int, max_new_tokens: int) -> dict:
    """The reward options that normalise its scores on `samples` responses of `policy` to `prompts`."""
    return dict(
        policy_path=str(policy),
        normalization_prompts=str(prompts),
        normalization_samples=samples,
        normalization_max_new_tokens=max_new_tokens,
    )


def ppo_args(output_dir: Path, reward: Path, **overrides) -> PPOStageConfig:
    """Rollouts of 8 prompts, one PPO epoch each, logged every step, no checkpoint."""
    values = dict(
        output_dir=str(output_dir),
        reward_model_path=str(reward),
        rollout_batch_size=8,
        ppo_epochs=1,
        learning_rate=1e-3,
        logging_steps=1,
        save_steps=0,
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    return PPOStageConfig(**{**values, **overrides})


def lora_args(model_dir: Path, **overrides) -> ModelArguments:
    """LoRA (r 8, alpha 16) over the model or run folder `model_dir`."""
    values = dict(model_name_or_path=str(model_dir), use_peft=True, lora_r=8, lora_alpha=16)
    return ModelArguments(**{**values, **overrides})


def train_reward(
    args: RewardStageConfig, model: ModelArguments, rankings: Path, eval_rankings: Path | None = None
) -> Path:
    """The reward stage trained on `rankings`, evaluated on `eval_rankings` (None: no eval set held out)."""
    if eval_rankings is None:
        data = DataArguments(dataset_name=str(rankings), eval_fraction=0.0)
    else:
        data = DataArguments(dataset_name=str(rankings), eval_dataset_name=str(eval_rankings))
    return run_reward(args, data, model)


# --- the PPO test modules' data, reward run and config file ------------------------------------------------


def ppo_data(folder: Path) -> dict[str, Path]:
    """Cut-down copies of the tiny task's prompts, held-out prompts, pretraining text and rankings."""
    return {
        "prompts": head_of(TINY_DATA / "prompts.jsonl", folder / "prompts.jsonl", 64),
        "eval": head_of(TINY_DATA / "heldout_prompts.jsonl", folder / "heldout.jsonl", 16),
        "pretrain": head_of(TINY_DATA / "pretrain.jsonl", folder / "pretrain.jsonl", 64),
        "comparisons": head_of(TINY_DATA / "comparisons.jsonl", folder / "comparisons.jsonl", 48),
        "comparisons_eval": head_of(TINY_DATA / "comparisons_eval.jsonl", folder / "comparisons_eval.jsonl", 16),
    }


def ppo_reward_run(out: Path, sft_folder: Path, data: dict[str, Path], use_peft: bool) -> Path:
    """A reward model trained from the SFT run folder on `data`'s rankings (LoRA: it can share the policy's base)."""
    args = reward_args(
        out,
        gradient_checkpointing=False,
        **normalised_by(sft_folder, data["prompts"], samples=32, max_new_tokens=12),
    )
    return train_reward(args, lora_args(sft_folder, use_peft=use_peft), data["comparisons"], data["comparisons_eval"])


def write_ppo_config(path: Path, sft_folder: Path, reward: Path, data, output_dir: Path, **extra) -> Path:
    """A PPO config file of the LoRA policy on `sft_folder` against `reward`; `extra` overrides or adds."""
    values = {
        "model_name_or_path": str(sft_folder),
        "use_peft": True,
        "lora_r": 8,
        "lora_alpha": 16,
        "reward_model_path": str(reward),
        "dataset_name": str(data["prompts"]),
        "eval_fraction": 0.0,
        "eval_samples": 0,
        "output_dir": str(output_dir),
        "total_episodes": 48,
        "rollout_batch_size": 4,
        "num_mini_batches": 2,
        "ppo_epochs": 2,
        "max_new_tokens": 10,
        "learning_rate": 1.0e-3,
        "logging_steps": 1,
        "sample_steps": 0,
        "report_to": "none",
        "seed": 0,
    }
    values.update(extra)
    path.write_text(yaml.safe_dump(values))
    return path


