"""Reward model on comparisons (InstructGPT step 2), on `trl.RewardTrainer`.

    accelerate launch recipes/reward.py --config recipes/configs/tiny/reward.yaml

**Grouping and loss.** Every preference source is regrouped into one row per prompt, its distinct responses
and the (better, worse) pairs among them (`instruct_tune.data.preference_groups`); a batch holds whole
prompts (`instruct_tune.data.reward_collator`), and the loss weighs each prompt once, averaging its C(K,2)
pairs, as InstructGPT's does (`instruct_tune.stages.reward_trainer`).

**Reward at EOS.** Prompt and response are rendered with the chat template the SFT stage used (the
assistant turn ends with EOS) and the scalar head is read at that last token. With `policy_path` (the SFT run
folder) the two tokenizers' chat templates must be equal, or the stage stops naming both.

**Normalisation.** After training, the reward model scores reference responses, samples of the SFT policy on
`normalization_prompts` at temperature 1 (or, without a policy, the chosen responses of the eval set), and
stores bias = -mean and scale = std in `reward_normalization.json` (`RewardNormalization`) so they score mean
0, as InstructGPT did, and std 1. `instruct_tune.models.reward.load_reward_model` applies it wherever the
reward model is used.

**Evaluation.** Pairwise accuracy and mean margin (r_better - r_worse) on the held-out comparisons
(`eval_accuracy`, `eval_margin`, `eval_<task>_accuracy`), and a calibration table (accuracy by bucket of
|r_a - r_b| beside the predicted sigmoid(|r_a - r_b|)) in `calibration.json`, `calibration.md` and the card
(`instruct_tune.evaluation.comparisons`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoConfig, PreTrainedTokenizerBase

from instruct_tune.artifacts import append_to_card
from instruct_tune.config import ConfigError, DataArguments, ModelArguments, RewardStageConfig
from instruct_tune.data import load_source
from instruct_tune.data.preference_groups import group_comparisons
from instruct_tune.data.reward_collator import GroupedPreferenceCollator
from instruct_tune.evaluation.comparisons import (
    calibration_markdown,
    calibration_table,
    comparison_metrics,
    pair_differences,
)
from instruct_tune.models import adapter_chain, load_model, load_tokenizer
from instruct_tune.models.reward import NORMALIZATION_FILE, RewardModel, init_reward_head
from instruct_tune.models.reward_forward import attention_implementation, can_share_prompt
from instruct_tune.models.reward_normalization import RewardNormalization
from instruct_tune.models.sampling import context_length, prompts_that_fit, sample_texts
from instruct_tune.models.template_compare import chat_template_difference, render_probe
from instruct_tune.stages.data_sources import data_sources, eval_set_description, task_tags, train_eval_sets
from instruct_tune.stages.guards import check_loaded_weights, check_metrics, check_weights
from instruct_tune.stages.reward_trainer import GroupedRewardTrainer
from instruct_tune.stages.run_folder import RunFolderArguments, open_run_folder
from instruct_tune.stages.runner import end_run, finish_run, run_training, start_trl_stage

logger = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
CALIBRATION_MD = "calibration.md"


# --- the policy, and normalisation on its samples ----------------------------------------------------


def check_chat_template(tokenizer: PreTrainedTokenizerBase, source: str, policy_path: str) -> None:
    """Refuse a reward model whose chat template (or EOS) differs from the policy's it will score."""
    policy_tokenizer = load_tokenizer(ModelArguments(model_name_or_path=policy_path))
    # Compared by rendering: templates that differ only by a Jinja comment are the same template.
    difference = chat_template_difference(tokenizer, policy_tokenizer)
    if difference is None and policy_tokenizer.eos_token != tokenizer.eos_token:
        difference = render_probe(tokenizer, 0), render_probe(policy_tokenizer, 0)
    if difference is not None:
        raise ConfigError(
            f"chat templates differ: the reward model's tokenizer ({source}) renders a chat as "
            f"{difference[0]!r}, the policy's ({policy_path}) as {difference[1]!r}. The reward model must read "
            "responses as the policy writes them: initialise it from the SFT run folder or pass its "
            "tokenizer with `tokenizer_name_or_path`."
        )


def sample_policy(
    policy_path: str,
    prompts: Sequence[Sequence[Mapping[str, str]]],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    max_length: int | None = None,
) -> tuple[list[int], list[str]]:
    """One sampled response per prompt from the policy run folder (the sampler of every stage, seeded).

    Prompts with no room for `max_new_tokens` within `max_length` and the policy's context are skipped;
    returns the indices of the prompts answered and their responses.
    """
    model_args = ModelArguments(model_name_or_path=policy_path)
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, tokenizer, head="causal").to(device).eval()
    limits = [n for n in (context_length(model), max_length) if n is not None]
    kept = prompts_that_fit(tokenizer, prompts, min(limits) - max_new_tokens if limits else None)
    texts, _ = sample_texts(
        model,
        tokenizer,
        [prompts[i] for i in kept],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
    )
    return kept, texts


def reference_responses(
    args: RewardStageConfig, eval_groups: Dataset | None, device: torch.device
) -> tuple[list[Any], list[str], str]:
    """The responses whose mean reward is set to 0: policy samples, or the eval set's chosen responses."""
    if args.policy_path:
        if args.normalization_prompts:
            prompt_set, _ = load_source(args.normalization_prompts, "prompts")
            prompts, where = prompt_set["prompt"], args.normalization_prompts
        elif eval_groups is not None:
            prompts, where = eval_groups["prompt"], "the eval comparisons' prompts"
        else:
            raise ConfigError("normalisation: set `normalization_prompts` (no eval set to take prompts from)")
        if len(prompts) > args.normalization_samples:
            chosen = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed))
            prompts = [prompts[i] for i in sorted(chosen[: args.normalization_samples].tolist())]
        kept, responses = sample_policy(
            args.policy_path,
            prompts,
            max_new_tokens=args.normalization_max_new_tokens,
            temperature=args.normalization_temperature,
            seed=args.seed,
            device=device,
            max_length=args.max_length,
        )
        skipped = len(prompts) - len(kept)
        limit = (
            f"max_length {args.max_length} and the policy's context, with normalization_max_new_tokens room"
        )
        if not kept:
            raise ConfigError(f"normalisation: none of the {len(prompts)} prompts of {where} fits {limit}")
        if skipped:
            logger.warning(
                "Normalisation: skipped %d of %d prompts of %s longer than %s",
                skipped,
                len(prompts),
                where,
                limit,
            )
        temperature = args.normalization_temperature
        source = f"samples of {args.policy_path} (T={temperature:g}) on {len(kept)} of {where}" + (
            f" ({skipped} longer prompts skipped)" if skipped else ""
        )
        return [prompts[i] for i in kept], responses, source
    if eval_groups is None:
        raise ConfigError(
            "normalisation needs `policy_path` or an eval set (its chosen responses are the reference)"
        )
    prompts, responses = [], []
    for row in eval_groups.select(range(min(len(eval_groups), args.normalization_samples))):
        for i in sorted(set(row["better"])):  # every response chosen in some comparison of the prompt
            prompts.append(row["prompt"])
            responses.append(row["responses"][i])
    return prompts, responses, f"chosen responses of {len(set(map(str, prompts)))} eval prompts"


def normalize(
    rm: RewardModel, prompts: Sequence[Any], responses: Sequence[str], source: str
) -> RewardNormalization:
    """Fit `rm.normalization` so the reference responses score mean 0, std 1; returns it."""
    rm.normalization = RewardNormalization.fit(rm.raw_score(prompts, responses), source)
    return rm.normalization


# --- the stage ------------------------------------------------------------------------------------------


def _head_is_new(model_name_or_path: str) -> bool:
    """Whether the checkpoint brings no trained reward head (a causal LM or an SFT run folder)."""
    root, adapters = adapter_chain(model_name_or_path)
    for adapter in adapters:
        if json.loads((Path(adapter) / "adapter_config.json").read_text()).get("task_type") == "SEQ_CLS":
            return False
    architectures = AutoConfig.from_pretrained(root).architectures or []
    return not any(name.endswith("ForSequenceClassification") for name in architectures)


def run_reward(
    training_args: RewardStageConfig,
    data_args: DataArguments,
    model_args: ModelArguments,
    run_options: RunFolderArguments | None = None,
) -> Path:
    """Train the reward model, evaluate and normalise it, and write its run folder; returns the folder."""
    start = start_trl_stage("reward", training_args, model_args)
    tokenizer, source = start.tokenizer, start.source  # source: a GGUF source is now its converted folder
    if training_args.policy_path:
        check_chat_template(tokenizer, model_args.tokenizer_name_or_path or source, training_args.policy_path)
    run_folder = open_run_folder("reward", training_args, (training_args, data_args, model_args), run_options)

    train_pairs, eval_pairs = train_eval_sets(data_args, "preference", seed=training_args.seed)
    if training_args.use_margin and "margin" not in train_pairs.column_names:
        raise ConfigError(
            "use_margin: the training data has no margins (a `margin` column or ranking `scores`)"
        )
    if eval_pairs is None and not training_args.policy_path:
        raise ConfigError(
            "normalisation needs `policy_path` (the SFT run folder) or an eval set (its chosen responses are "
            "the reference): set one of them, or `eval_fraction` > 0"
        )
    train, eval_set = group_comparisons(train_pairs), group_comparisons(eval_pairs) if eval_pairs else None
    logger.info(
        "Reward data: %d comparisons of %d prompts for training, %s for eval",
        len(train_pairs),
        len(train),
        f"{len(eval_pairs)} of {len(eval_set)} prompts" if eval_set else "none",
    )

    model = load_model(
        model_args,
        tokenizer,
        head="reward",
        trust_remote_code=training_args.trust_remote_code,
        gradient_checkpointing=training_args.gradient_checkpointing,
    )
    if _head_is_new(source):
        std = init_reward_head(model, seed=training_args.seed)
        logger.info("Reward head initialised N(0, %.3g)", std)
    check_loaded_weights(model, "reward", source)
    if hasattr(model, "peft_config"):
        # The adapter is trained on `source` (e.g. the SFT run folder, merged): record it as the base, so
        # loading the reward run folder merges the SFT adapter first.
        model.peft_config["default"].base_model_name_or_path = source

    share_prompt = training_args.share_prompt and can_share_prompt(model)
    if training_args.share_prompt and not share_prompt:
        logger.warning(
            "share_prompt: %s attention takes no custom mask; scoring each response in its own row",
            attention_implementation(model),
        )
    trainer = GroupedRewardTrainer(
        model=model,
        args=training_args,
        data_collator=GroupedPreferenceCollator(
            pad_token_id=tokenizer.pad_token_id,
            pad_to_multiple_of=training_args.pad_to_multiple_of,
            use_margin=training_args.use_margin,
            margin_scale=training_args.margin_scale,
            share_prompt=share_prompt,
        ),
        train_dataset=train,
        eval_dataset=eval_set,
        processing_class=tokenizer,
    )
    metrics = run_training(trainer, run_folder)
    check_weights(trainer.model, "reward", f"after step {trainer.state.global_step}")

    rm = RewardModel(trainer.accelerator.unwrap_model(trainer.model), tokenizer)
    calibration: list[dict[str, float]] = []
    normalization: RewardNormalization | None = None
    # Under FSDP each forward gathers the sharded weights from every rank: every rank scores the same responses
    # (the main process's figures are written). Otherwise the main process scores alone.
    if trainer.is_world_process_zero() or trainer.is_fsdp_enabled:
        if trainer.eval_dataset is not None:
            diffs, tasks = pair_differences(
                rm, trainer.eval_dataset, training_args.per_device_eval_batch_size
            )
            tags = task_tags(tasks) if data_args.per_task_metrics else []
            metrics.update(comparison_metrics(diffs, tasks, tags))
            metrics["eval_comparisons"] = len(diffs)
            calibration = calibration_table(diffs, training_args.calibration_buckets)
        prompts, responses, where = reference_responses(training_args, trainer.eval_dataset, rm.device)
        normalization = normalize(rm, prompts, responses, where)
        metrics.update({"reward_bias": normalization.bias, "reward_std": normalization.std})
        trainer.log_metrics("all", metrics)
    check_metrics(metrics, "reward", trainer.state.global_step)  # bias and std included

    output_dir = finish_run(
        trainer,
        stage="reward",
        configs=(training_args, data_args, model_args),
        source=source,
        datasets=[s.path for s in data_sources(data_args)],
        metrics=metrics,
        eval_data=eval_set_description(data_args),
    )
    if trainer.is_world_process_zero():
        assert normalization is not None
        append_to_card(
            output_dir,
            "Normalisation",
            f"Scores are (raw + bias) / scale with bias {normalization.bias:+.4f} and scale "
            f"{normalization.scale:.4f}, so that {normalization.source} score mean 0 and std 1 "
            f"(n={normalization.n}); stored in "
            f"`{NORMALIZATION_FILE}`.",
        )
        if calibration:
            (output_dir / CALIBRATION_FILE).write_text(json.dumps(calibration, indent=2) + "\n")
            table = calibration_markdown(calibration)
            (output_dir / CALIBRATION_MD).write_text(f"# Reward model calibration\n\n{table}\n")
            append_to_card(output_dir, "Calibration (eval comparisons)", table)
        normalization.write(output_dir)  # last: make's sign of a finished reward folder
    end_run(trainer.accelerator, output_dir, start.push_to, training_args)
    return output_dir
