"""Online RL alternatives to PPO on TRL's trainers: GRPO (`trl.GRPOTrainer`) and RLOO (`trl.RLOOTrainer`).

Both start from the SFT run folder (full model or LoRA over it, loaded by our loader) and sample
`num_generations` completions of each prompt (chats: TRL applies the policy's chat template); one reward
function scores them (`instruct_tune.models.reward_function`): the reward model in PPO's units
(`reward: reward_model`), or the tiny task's gold judge as a verifiable reward (`reward: tiny_gold`). They differ
only in trainer and config: GRPO's advantage is relative to the group's mean (and std), RLOO's to the mean of
the other completions; GRPO puts the KL to the SFT policy in the loss, RLOO in the reward.

The reference is the SFT policy: with LoRA, the policy's base with the (freshly initialised) adapter off; with
full fine-tuning TRL loads it from the path the policy was loaded from, which is the SFT folder itself.
"""

from __future__ import annotations

import functools
import inspect
import logging
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl import GRPOTrainer, RLOOTrainer

from instruct_tune.config.arguments import DataArguments, ModelArguments
from instruct_tune.config.errors import ConfigError
from instruct_tune.config.online_rl import REWARD_MODEL, TINY_GOLD, GRPOStageConfig, RLOOStageConfig
from instruct_tune.models import adapter_chain, load_model, load_tokenizer
from instruct_tune.models.forward import mask_positions
from instruct_tune.models.reward_function import GoldJudgeFunction, RewardModelFunction
from instruct_tune.models.sampling import context_length, encode_prompts
from instruct_tune.stages.data_sources import data_sources, eval_set_description, train_eval_sets
from instruct_tune.stages.guards import NonFiniteGuard, check_loaded_weights, check_metrics, check_weights
from instruct_tune.stages.ppo import check_same_tokenizer
from instruct_tune.stages.run_folder import RunFolderArguments, open_run_folder
from instruct_tune.stages.runner import end_run, finish_run, run_training, start_trl_stage

logger = logging.getLogger(__name__)

OnlineRLConfig = GRPOStageConfig | RLOOStageConfig
VERIFIABLE = "tiny gold judge (verifiable reward: RL on the answer key, not RLHF)"


class GuardedGRPOTrainer(NonFiniteGuard, GRPOTrainer):
    """`GRPOTrainer` that stops on a NaN/inf loss or logged figure (see `instruct_tune.stages.guards`)."""

    guard_stage = "grpo"


class GuardedRLOOTrainer(NonFiniteGuard, RLOOTrainer):
    """`RLOOTrainer` that stops on a NaN/inf loss or logged figure (see `instruct_tune.stages.guards`)."""

    guard_stage = "rloo"


def check_reference(args: OnlineRLConfig, model_args: ModelArguments, sft_path: str) -> None:
    """Refuse the one setup whose reference would not be the SFT policy.

    With full fine-tuning and beta > 0 TRL loads its reference from the path the policy was loaded from. For a
    full SFT folder that is the folder itself; for a LoRA SFT folder our loader merges the adapter into its
    root checkpoint, and that root (the model before SFT) is what TRL would load.
    """
    if model_args.use_peft or args.beta == 0:
        return
    if adapter_chain(sft_path)[1]:
        raise ConfigError(
            f"use_peft: false with beta {args.beta:g}: {sft_path} is a LoRA adapter, and TRL would build the "
            "reference from its base model, not from the SFT policy. Merge it first (`instruct-tune merge "
            f"{sft_path}`) and start from the merged folder, or train with use_peft: true, or set beta: 0"
        )


def prompts_that_fit(
    tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel,
    prompts: list,
    max_completion_length: int,
    what: str,
) -> list[int]:
    """Indices of the prompts that fit the model's context with `max_completion_length` after them (longer ones
    are skipped and counted, as PPO skips prompts over its budget)."""
    limit = context_length(model)
    if limit is None:
        return list(range(len(prompts)))
    if max_completion_length >= limit:
        raise ConfigError(
            f"max_completion_length: {max_completion_length} leaves no room for a prompt in the model's context "
            f"of {limit} positions; set it below {limit}"
        )
    room = limit - max_completion_length
    keep = [i for i, ids in enumerate(encode_prompts(tokenizer, prompts)) if len(ids) <= room]
    if not keep:
        raise ConfigError(
            f"{what}: none of the {len(prompts)} prompts fits {room} tokens (context less completion)"
        )
    if len(keep) < len(prompts):
        skipped = len(prompts) - len(keep)
        logger.warning(
            "%s: skipped %d of %d prompts longer than %d tokens", what, skipped, len(prompts), room
        )
    return keep


def reward_function(
    args: OnlineRLConfig, model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase
) -> RewardModelFunction | GoldJudgeFunction:
    """The stage's one reward function (`reward`): the reward model on the training device, in the policy's
    dtype, or the gold judge."""
    if args.reward == TINY_GOLD:
        if args.reward_model_path:
            logger.info("reward: tiny_gold: reward_model_path %s is not read", args.reward_model_path)
        return GoldJudgeFunction(tokenizer)
    reward_tokenizer = load_tokenizer(ModelArguments(model_name_or_path=args.reward_model_path))
    check_same_tokenizer(tokenizer, reward_tokenizer, args.reward_model_path)
    return RewardModelFunction.from_run_folder(
        args.reward_model_path,
        tokenizer,
        device=args.device,
        dtype=model_args.dtype,
        trust_remote_code=args.trust_remote_code,
        scale_scores=args.scale_scores,
        missing_eos_penalty=args.missing_eos_penalty,
        batch_size=args.per_device_train_batch_size,
    )


def reference_is_the_base(model: Any) -> None:
    """Drop the copy of the adapter TRL keeps as the reference of a PEFT policy ("ref").

    Our loader wraps a freshly initialised adapter (an identity), so the base with adapters off is the same
    reference without a second adapter in memory, and the run folder gets no `ref/` adapter beside the policy's.
    """
    if isinstance(model, PeftModel) and "ref" in model.peft_config:
        model.delete_adapter("ref")


def positions_from_mask(model: Any) -> None:
    """Number a causal LM's positions over its attention mask, as `generate` does, when no position ids are given.

    TRL's GRPO/RLOO compute the log-probabilities of left-padded prompt + completion rows without position ids:
    the model then counts positions from the row's first column, padding included, while `generate` sampled
    each completion counting from its prompt's first real token. With absolute position embeddings (GPT-2, the
    tiny default) the trained log-probabilities would be of other positions than the sampled ones (RoPE models
    are unaffected: a shift of every position changes nothing). PPO passes these position ids too
    (`instruct_tune.models.forward`).
    """
    target = model.get_base_model() if isinstance(model, PeftModel) else model
    if "position_ids" not in inspect.signature(type(target).forward).parameters:
        return
    inner = target.forward

    @functools.wraps(inner)  # `generate` validates its model kwargs against this signature
    def forward(*args: Any, **kwargs: Any) -> Any:
        mask = kwargs.get("attention_mask")
        fresh = kwargs.get("position_ids") is None and kwargs.get("past_key_values") is None
        if fresh and not args and isinstance(mask, torch.Tensor) and mask.dim() == 2:
            kwargs["position_ids"] = mask_positions(mask)
        return inner(*args, **kwargs)

    target.forward = forward


# Figures of the last logged step kept in metrics.json (TRL logs them per step; the run's end is what counts).
LAST_LOGGED = (
    "reward",
    "reward_std",
    "kl",
    "entropy",
    "completions/mean_length",
    "completions/clipped_ratio",
)


def last_logged(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The reward, KL, entropy and completion figures TRL logged last, as `last/<name>` (empty before a log)."""
    logged = [entry for entry in log_history if "reward" in entry]
    if not logged:
        return {}
    return {f"last/{key}": logged[-1][key] for key in LAST_LOGGED if key in logged[-1]}


def run_online_rl(
    stage: str,
    trainer_class: type[GuardedGRPOTrainer] | type[GuardedRLOOTrainer],
    args: OnlineRLConfig,
    data_args: DataArguments,
    model_args: ModelArguments,
    run_options: RunFolderArguments | None = None,
) -> Path:
    """Train a policy with `trainer_class` from the SFT run folder and write its run folder; returns it."""
    start = start_trl_stage(stage, args, model_args)
    tokenizer, sft_path = start.tokenizer, start.source
    check_reference(args, model_args, sft_path)
    reward = reward_function(args, model_args, tokenizer)
    run_folder = open_run_folder(stage, args, (args, data_args, model_args), run_options)
    train, eval_set = train_eval_sets(data_args, "prompts", seed=args.seed)
    model = load_model(
        model_args,
        tokenizer,
        head="causal",
        trust_remote_code=args.trust_remote_code,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    check_loaded_weights(model, stage, sft_path)
    fitting = prompts_that_fit(tokenizer, model, list(train["prompt"]), args.max_completion_length, "prompts")
    train = train.select(fitting)
    if isinstance(reward, GoldJudgeFunction):
        reward.check_prompts(list(train["prompt"]))
    evaluating = eval_set is not None and args.eval_strategy != "no"
    trainer = trainer_class(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=train,
        eval_dataset=eval_set if evaluating else None,
        processing_class=tokenizer,
    )
    reference_is_the_base(trainer.model)
    for scored in (trainer.model, trainer.ref_model):
        if scored is not None:
            positions_from_mask(trainer.accelerator.unwrap_model(scored))
    metrics = run_training(trainer, run_folder)
    check_weights(trainer.model, stage, f"after step {trainer.state.global_step}")
    world = trainer.accelerator.num_processes
    episodes = trainer.state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps
    episodes = episodes * world // args.num_iterations  # each completion is trained on num_iterations times
    metrics.update(episodes=episodes, reward_function=args.reward, prompts=len(train))
    metrics.update(last_logged(trainer.state.log_history))
    if metrics.get("train_runtime"):
        metrics["episodes_per_second"] = round(episodes / metrics["train_runtime"], 3)
    if args.reward == TINY_GOLD:
        metrics["reward_kind"] = VERIFIABLE
        lineage = {"SFT policy": sft_path, "reward": VERIFIABLE}
    else:
        metrics["reward_kind"] = "reward model (RLHF), normalised as in PPO"
        lineage = {"SFT policy": sft_path, "reward model": str(args.reward_model_path)}
    trainer.log_metrics("all", metrics)
    check_metrics(metrics, stage, trainer.state.global_step)
    output_dir = finish_run(
        trainer,
        stage=stage,
        configs=(args, data_args, model_args),
        source=sft_path,
        datasets=[source.path for source in data_sources(data_args)],
        metrics=metrics,
        eval_data=eval_set_description(data_args) if evaluating else None,
        lineage=lineage,
    )
    end_run(trainer.accelerator, output_dir, start.push_to, args)
    return output_dir


def run_grpo(
    training_args: GRPOStageConfig,
    data_args: DataArguments,
    model_args: ModelArguments,
    run_options: RunFolderArguments | None = None,
) -> Path:
    """Train the GRPO policy and write its run folder; returns the folder."""
    return run_online_rl("grpo", GuardedGRPOTrainer, training_args, data_args, model_args, run_options)


def run_rloo(
    training_args: RLOOStageConfig,
    data_args: DataArguments,
    model_args: ModelArguments,
    run_options: RunFolderArguments | None = None,
) -> Path:
    """Train the RLOO policy and write its run folder; returns the folder."""
    return run_online_rl("rloo", GuardedRLOOTrainer, training_args, data_args, model_args, run_options)


__all__ = [
    "GuardedGRPOTrainer",
    "GuardedRLOOTrainer",
    "REWARD_MODEL",
    "run_grpo",
    "run_online_rl",
    "run_rloo",
]
