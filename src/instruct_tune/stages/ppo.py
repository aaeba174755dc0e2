"""Reinforcement learning against the reward model with PPO (InstructGPT step 3), on our own trainer.

The SFT run folder is the starting policy and the reference; the reward stage's run folder gives the reward
(normalised) and the value model's initialisation. The run folder holds the policy adapter (or full model),
tokenizer, `config.yaml`, `metrics.json`, `trainer_state.json` (the per-step log), `samples.jsonl` and the card.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from instruct_tune.checkpoints import disk_full_named, ppo_checkpoint_problem
from instruct_tune.config import ConfigError, DataArguments, ModelArguments, PPOStageConfig
from instruct_tune.config.checks import check_launch_trains_together
from instruct_tune.config.ppo import check_rollout_models
from instruct_tune.data.text_rows import text_rows, token_rows
from instruct_tune.models import adapter_base, load_tokenizer
from instruct_tune.models.adapter_base import record_adapter_base
from instruct_tune.models.sampling import encode_prompts
from instruct_tune.models.template_compare import chat_template_difference
from instruct_tune.ppo.adapters import POLICY
from instruct_tune.ppo.models import build_ppo_models
from instruct_tune.ppo.sharding import full_state_dict, is_sharded, tie_gathered
from instruct_tune.ppo.trainer import PPOTrainer
from instruct_tune.stages.data_sources import data_sources, eval_set_description, train_eval_sets
from instruct_tune.stages.lengths import check_fits_context, model_context, prompt_budget
from instruct_tune.stages.run_folder import RunFolderArguments, open_run_folder
from instruct_tune.stages.runner import begin_stage, end_run, write_run_folder

logger = logging.getLogger(__name__)


def check_same_tokenizer(
    policy: PreTrainedTokenizerBase, reward: PreTrainedTokenizerBase, reward_path: str
) -> None:
    """The reward model reads the policy's token ids directly: vocabularies, EOS and chat template must agree."""
    problems = []
    if policy.get_vocab() != reward.get_vocab():
        problems.append("vocabularies differ")
    if policy.eos_token != reward.eos_token:
        problems.append(f"EOS differs ({policy.eos_token!r} vs {reward.eos_token!r})")
    if (difference := chat_template_difference(policy, reward)) is not None:
        problems.append(f"chat templates differ: the policy's renders {difference[0]!r}, its {difference[1]!r}")
    if problems:
        raise ConfigError(
            f"reward_model_path {reward_path}: its tokenizer does not match the policy's ({'; '.join(problems)}). "
            "Train the reward model from the SFT run folder so both read the same tokens."
        )


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase, prompts: list, max_length: int, what: str, limit: str | None = None
) -> list[list[int]]:
    """Encoded prompts, skipping (and counting) those longer than `max_length` tokens (`limit` says why)."""
    limit = limit or f"max_prompt_length {max_length}"
    encoded = encode_prompts(tokenizer, prompts)
    kept = [ids for ids in encoded if len(ids) <= max_length]
    if len(kept) < len(encoded):
        logger.warning(
            "%s: skipped %d of %d prompts longer than %s", what, len(encoded) - len(kept), len(encoded), limit
        )
    if not kept:
        raise ConfigError(f"{what}: no prompt fits {limit}")
    return kept


def ptx_ids(
    tokenizer: PreTrainedTokenizerBase, path: str, max_length: int, heldout_rows: int = 0
) -> list[list[int]]:
    """Token ids of the PPO-ptx text (`text` rows), each ending in EOS and cut to `max_length`.

    The last `heldout_rows` rows are left out: the eval measures perplexity on them.
    """
    texts = text_rows(path)
    if heldout_rows >= len(texts):
        raise ConfigError(
            f"ptx_heldout_rows: {heldout_rows} leaves none of the {len(texts)} rows of {path} for PPO-ptx"
        )
    return token_rows(tokenizer, texts[: len(texts) - heldout_rows], max_length)


def save_policy(
    trainer: PPOTrainer,
    output_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    sft_path: str,
    state_dict: dict[str, Any] | None = None,
) -> None:
    """Write the policy adapter (recording the SFT run folder as its base) or the full policy model.

    `state_dict`: the trainable module's whole state dict, gathered from sharded (FSDP2) parameters.
    """
    policy = trainer.unwrapped.policy
    policy_state = None
    if state_dict is not None:
        policy_state = {k.removeprefix("policy."): v for k, v in state_dict.items() if k.startswith("policy.")}
    if isinstance(policy, PeftModel):
        policy.peft_config[POLICY].base_model_name_or_path = sft_path
        policy.save_pretrained(str(output_dir), selected_adapters=[POLICY], state_dict=policy_state)
        record_adapter_base(output_dir, sft_path)
    else:
        policy.save_pretrained(str(output_dir), state_dict=policy_state and tie_gathered(policy, policy_state))
    tokenizer.save_pretrained(str(output_dir))


def run_ppo(
    args: PPOStageConfig,
    data_args: DataArguments,
    model_args: ModelArguments,
    run_options: RunFolderArguments | None = None,
) -> Path:
    """Train the PPO policy and write its run folder; returns the folder."""
    push_to = begin_stage(args)
    # The processes the PPO trainer's Accelerator will see: all of a launch on CPU only with `use_cpu`, or
    # under DeepSpeed (which sets the process group up itself, on CPU too).
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    check_launch_trains_together(launched if args.use_cpu or deepspeed or torch.cuda.is_available() else 1)
    if not args.reward_model_path:
        raise ConfigError("reward_model_path: set it to the reward stage's run folder")
    run_folder = open_run_folder(
        "ppo", args, (args, data_args, model_args), run_options, checkpoint_problem=ppo_checkpoint_problem
    )
    tokenizer = load_tokenizer(model_args, trust_remote_code=args.trust_remote_code)
    sft_path = model_args.model_name_or_path  # read after the loader: a GGUF source is now its converted folder
    reward_tokenizer = load_tokenizer(ModelArguments(model_name_or_path=args.reward_model_path))
    check_same_tokenizer(tokenizer, reward_tokenizer, args.reward_model_path)
    context = model_context(sft_path, trust_remote_code=args.trust_remote_code)
    max_prompt, limit = prompt_budget("ppo", args.max_prompt_length, args.max_new_tokens, context, sft_path)
    if args.ptx_coef > 0:
        check_fits_context("ppo", "ptx_max_length", args.ptx_max_length, context, sft_path)

    train, eval_set = train_eval_sets(data_args, "prompts", seed=args.seed)
    prompts = prompt_ids(tokenizer, list(train["prompt"]), max_prompt, "prompts", limit)
    eval_prompts = (
        prompt_ids(tokenizer, list(eval_set["prompt"]), max_prompt, "eval prompts", limit)
        if eval_set is not None and args.eval_samples > 0
        else []
    )
    ptx = (
        ptx_ids(tokenizer, args.ptx_dataset, args.ptx_max_length, args.ptx_heldout_rows)
        if args.ptx_coef > 0
        else []
    )

    check_rollout_models(args, model_args)  # vLLM's refusals that depend on the model options, before loading
    models = build_ppo_models(
        model_args,
        tokenizer,
        args.reward_model_path,
        shared_base=args.shared_base,
        packed=args.packed_forward,
        trust_remote_code=args.trust_remote_code,
    )
    logger.info("PPO models: %s", models.layout)
    trainer = PPOTrainer(args, models, tokenizer, prompts, eval_prompts=eval_prompts, ptx_rows=ptx)
    metrics: dict[str, Any] = trainer.train(run_folder.resume_checkpoint(trainer.accelerator))
    metrics["model_layout"] = models.layout

    output_dir = Path(args.output_dir)
    trainer.accelerator.wait_for_everyone()
    # Sharded (FSDP2): every process takes part in gathering the whole weights, the main process writes them.
    gathered = full_state_dict(trainer.accelerator, trainer.model) if is_sharded(trainer.model) else None
    if trainer.accelerator.is_main_process:
        with disk_full_named(output_dir):  # metrics.json last (write_run_folder): make's sign of a finished folder
            save_policy(trainer, output_dir, tokenizer, sft_path, gathered)
            state = {
                "global_step": trainer.step,
                "max_steps": trainer.num_steps,
                "log_history": trainer.log_history,
            }
            (output_dir / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
            write_run_folder(
                output_dir,
                stage="ppo",
                configs=(args, data_args, model_args),
                base_model=adapter_base(sft_path) or sft_path,
                datasets=[source.path for source in data_sources(data_args)],
                metrics=metrics,
                lineage={"SFT policy": sft_path, "reward model": args.reward_model_path},
                eval_data=eval_set_description(data_args),
            )
    end_run(trainer.accelerator, output_dir, push_to, args)
    return output_dir
