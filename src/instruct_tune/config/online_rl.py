"""Configs of the online RL alternatives to PPO: TRL's `GRPOConfig` and `RLOOConfig` with our reward options.

Both stages sample completions of the prompts from the policy and score them with one reward function
(`instruct_tune.models.reward_function`): the reward model in PPO's units, or the tiny task's gold judge as a
verifiable reward. TRL's own options (num_generations, beta, max_completion_length, temperature, use_vllm and
vllm_*, ...) pass through unchanged; `per_device_train_batch_size` counts completions, not prompts.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from trl import GRPOConfig, RLOOConfig

from instruct_tune.config.checks import check_number
from instruct_tune.config.errors import ConfigError
from instruct_tune.config.trl_stages import TRLStageDefaults

REWARD_MODEL = "reward_model"
TINY_GOLD = "tiny_gold"
# What the `reward` option may name, with what it means (shown when another value is given).
REWARDS = {
    REWARD_MODEL: "the reward stage's model at `reward_model_path`, normalised as PPO reads it (RLHF)",
    TINY_GOLD: "the tiny task's gold judge as a verifiable reward (RL on the answer key, not RLHF)",
}


@dataclass
class OnlineRLOptions:
    """Our options shared by the GRPO and RLOO stages: which reward, and how its scores are shaped (as PPO's)."""

    reward_model_path: str | None = field(
        default=None,
        metadata={
            "help": "Reward stage run folder (its normalisation is applied), with `reward: reward_model`."
        },
    )
    reward: str = field(
        default=REWARD_MODEL,
        metadata={
            "help": "`reward_model`: the reward model at reward_model_path, in PPO's units (RLHF, InstructGPT "
            "step 3 with TRL's GRPO/RLOO in place of PPO). `tiny_gold`: the tiny task's gold judge scores each "
            "completion directly, a verifiable reward: RL on the answer key, not RLHF (the judge that eval "
            "reports is then also the training signal)."
        },
    )
    missing_eos_penalty: float | None = field(
        default=1.0,
        metadata={
            "help": "Subtracted from the reward model's score of a completion without EOS (null: none), as in "
            "PPO; `tiny_gold` has its own rule (the judge halves the score of a completion without EOS)."
        },
    )
    scale_scores: bool = field(
        default=False,
        metadata={
            "help": "As PPO's: divide the reward model's scores by its std on the reference responses (full "
            "normalisation, (raw + bias) / scale); false: shift only (raw + bias). Not TRL's `scale_rewards`, "
            "which scales advantages by the group's std."
        },
    )

    def __post_init__(self) -> None:
        if self.reward not in REWARDS:
            known = "; ".join(f"{name}: {what}" for name, what in REWARDS.items())
            raise ConfigError(f"reward: {self.reward!r} is not a reward this stage knows ({known})")
        if self.reward == REWARD_MODEL and not self.reward_model_path:
            raise ConfigError(
                "reward_model_path: set it to the reward stage's run folder (or use reward: tiny_gold)"
            )
        check_number("missing_eos_penalty", self.missing_eos_penalty, optional=True)
        if self.use_vllm:  # type: ignore[attr-defined]  # TRL's option, on the config this mixes into
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(
                    "use_vllm: vLLM rollouts need a GPU (CUDA), and this machine has none; set use_vllm: false "
                    "to sample with transformers' generate, or run on a GPU machine after "
                    "`pip install instruct-tune[vllm]`"
                )
            if importlib.util.find_spec("vllm") is None:
                raise ConfigError("use_vllm: vLLM is not installed: `pip install instruct-tune[vllm]`")
        super().__post_init__()


@dataclass
class GRPOStageConfig(TRLStageDefaults, OnlineRLOptions, GRPOConfig):
    """TRL's `GRPOConfig` for the GRPO stage (`instruct_tune.stages.online_rl`): advantages relative to the
    group of `num_generations` completions of each prompt, the KL to the SFT policy (beta) in the loss."""


@dataclass
class RLOOStageConfig(TRLStageDefaults, OnlineRLOptions, RLOOConfig):
    """TRL's `RLOOConfig` for the RLOO stage (`instruct_tune.stages.online_rl`): each completion's baseline is
    the mean reward of the other completions of its prompt, the KL to the SFT policy (beta) in the reward."""
