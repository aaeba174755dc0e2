"""Options of our PPO stage (InstructGPT step 3) on top of its training options (`config.ppo_base`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from instruct_tune.config.checks import check_count, check_number
from instruct_tune.config.errors import ConfigError
from instruct_tune.config.ppo_base import PPO_INSTEAD, PPOTrainingOptions

__all__ = [
    "PPO_INSTEAD",
    "ROLLOUT_BACKENDS",
    "VLLM_WEIGHT_SYNCS",
    "PPOStageConfig",
    "check_rollout_models",
    "vllm_rollout_problems",
]

ROLLOUT_BACKENDS = ("hf", "vllm")
VLLM_WEIGHT_SYNCS = ("merged", "lora")


def vllm_rollout_problems(use_cpu: bool = False) -> list[str]:
    """Why `rollout_backend: vllm` cannot run in this process (empty: it can), checked without loading vLLM."""
    import importlib.util

    import torch

    problems = []
    if importlib.util.find_spec("vllm") is None:
        problems.append("the `vllm` package, not installed here: pip install 'instruct-tune[vllm]'")
    if use_cpu:
        problems.append("a CUDA GPU, and use_cpu is true")
    elif not torch.cuda.is_available():
        problems.append("a CUDA GPU, and torch.cuda.is_available() is false on this machine")
    return problems


def check_rollout_models(args: Any, model_args: Any) -> None:
    """The rollout options against the model options, before any model loads: vLLM samples no 4/8-bit base, and
    `vllm_weight_sync: lora` needs a LoRA policy."""
    if getattr(args, "rollout_backend", "hf") != "vllm":
        return
    if getattr(model_args, "load_in_4bit", False) or getattr(model_args, "load_in_8bit", False):
        raise ConfigError(
            "rollout_backend: vllm samples from the 16-bit weights; it cannot with load_in_4bit/load_in_8bit "
            "(use rollout_backend: hf for QLoRA)"
        )
    if args.vllm_weight_sync == "lora" and not getattr(model_args, "use_peft", False):
        raise ConfigError("vllm_weight_sync: lora needs a LoRA policy (use_peft: true); use merged for a full one")


@dataclass
class PPOStageConfig(PPOTrainingOptions):
    """Options of our PPO stage (InstructGPT step 3) on top of `PPOTrainingOptions`.

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
    rollout_backend: str = field(
        default="hf",
        metadata={
            "help": "What samples the rollouts: hf (`generate` on the training policy) or vllm (a vLLM engine "
            "colocated with each training process, weights pushed after every update; a CUDA GPU and "
            "`pip install instruct-tune[vllm]`).",
            "choices": ROLLOUT_BACKENDS,
        },
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3,
        metadata={"help": "rollout_backend vllm: share of the GPU's memory the engine takes (weights + KV cache)."},
    )
    vllm_enable_sleep_mode: bool = field(
        default=False,
        metadata={
            "help": "rollout_backend vllm: free the engine's GPU memory between rollouts (its KV cache, and its "
            "weights under vllm_weight_sync merged), for the training step."
        },
    )
    vllm_weight_sync: str = field(
        default="merged",
        metadata={
            "help": "rollout_backend vllm: after each update push the policy's weights with its LoRA merged in "
            "(merged), or only the LoRA adapter, served by vLLM's LoRA support (lora; a LoRA policy only).",
            "choices": VLLM_WEIGHT_SYNCS,
        },
    )
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
        self._check_rollout_backend()
        if self.ptx_coef < 0:
            raise ConfigError(f"ptx_coef: {self.ptx_coef} must be >= 0")
        if self.ptx_coef > 0 and not self.ptx_dataset:
            raise ConfigError("ptx_coef > 0 needs `ptx_dataset` (pretraining or SFT text)")
        if self.ptx_heldout_rows < 0:
            raise ConfigError(f"ptx_heldout_rows: {self.ptx_heldout_rows} must be >= 0")
        if self.target_kl is not None and self.target_kl <= 0:
            raise ConfigError(f"target_kl: {self.target_kl} must be > 0 (null for a fixed beta)")

    def _check_rollout_backend(self) -> None:
        """The rollout options; `rollout_backend: vllm` refused here, before any model loads, where it cannot run."""
        if self.rollout_backend not in ROLLOUT_BACKENDS:
            raise ConfigError(f"rollout_backend: {self.rollout_backend!r} is not one of {', '.join(ROLLOUT_BACKENDS)}")
        if self.vllm_weight_sync not in VLLM_WEIGHT_SYNCS:
            raise ConfigError(
                f"vllm_weight_sync: {self.vllm_weight_sync!r} is not one of {', '.join(VLLM_WEIGHT_SYNCS)}"
            )
        check_number("vllm_gpu_memory_utilization", self.vllm_gpu_memory_utilization, above=0, at_most=1)
        if self.rollout_backend == "vllm":
            problems = vllm_rollout_problems(self.use_cpu)
            if problems:
                raise ConfigError("rollout_backend: vllm needs " + "; and ".join(problems))
