"""Direct preference optimisation from the SFT policy, on `trl.DPOTrainer` (an alternative to reward + PPO).

    accelerate launch recipes/dpo.py --config recipes/configs/tiny/dpo.yaml

**Data.** Every preference format the data layer reads, regrouped per prompt (`group_comparisons`); a K-way
ranking becomes pairs by `dpo_pairs` (`all`: its C(K,2) pairs; `best`: the top-ranked response against each
other one; see `instruct_tune.data.dpo_pairs`). The eval set always holds every pair, so that runs of either
rule compare. Prompts stay conversational: TRL renders them with the policy's chat template, each response an
assistant turn closed by EOS. Pairs that `max_length` drops or cuts are counted (`max_dropped_share`).

**Reference.** The SFT policy the stage starts from (`model_name_or_path`). With LoRA the policy is a new
adapter on it and the reference is the same weights with the adapter disabled (TRL's `ref_model=None`); for
full fine-tuning a frozen copy is loaded by our loader, since a run folder may be a chain of adapters over a
converted base that TRL's own loading would not follow.

**Outputs.** The run folder of section 3 of the design (adapter or model, tokenizer, `config.yaml`,
`metrics.json` with TRL's `rewards/*` and `logps/*` figures, the card naming the SFT policy as lineage).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from datasets import Dataset
from peft import PeftConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl import DPOTrainer

from instruct_tune.config.arguments import DataArguments, ModelArguments
from instruct_tune.config.dpo import DPOStageConfig
from instruct_tune.config.errors import ConfigError
from instruct_tune.data.dpo_pairs import dpo_rows
from instruct_tune.data.preference_groups import group_comparisons
from instruct_tune.models import load_model, lora_config
from instruct_tune.stages.data_sources import data_sources, eval_set_description, train_eval_sets
from instruct_tune.stages.guards import NonFiniteGuard, check_loaded_weights, check_metrics, check_weights
from instruct_tune.stages.lengths import length_losses
from instruct_tune.stages.run_folder import RunFolderArguments, open_run_folder
from instruct_tune.stages.runner import end_run, finish_run, per_task_eval, run_training, start_trl_stage

logger = logging.getLogger(__name__)


class GuardedDPOTrainer(NonFiniteGuard, DPOTrainer):
    """`DPOTrainer` that stops on a NaN/inf loss or logged figure (see `instruct_tune.stages.guards`)."""

    guard_stage = "dpo"


def dpo_datasets(data_args: DataArguments, *, seed: int, rule: str) -> tuple[Dataset, Dataset | None]:
    """Load and check the preference data; DPO rows of the training pairs chosen by `rule`, of every eval pair."""
    train_pairs, eval_pairs = train_eval_sets(data_args, "preference", seed=seed)
    train = dpo_rows(group_comparisons(train_pairs), rule)
    eval_set = (
        dpo_rows(group_comparisons(eval_pairs), "all") if eval_pairs is not None and len(eval_pairs) else None
    )
    if len(train) == 0:
        raise ConfigError("dpo: the training data holds no preference pair")
    logger.info(
        "DPO data: %d pairs (dpo_pairs: %s) of %d comparisons for training, %s for eval",
        len(train),
        rule,
        len(train_pairs),
        f"{len(eval_set)} pairs" if eval_set is not None else "none",
    )
    return train, eval_set


def reference_model(
    model_args: ModelArguments, source: str, tokenizer: PreTrainedTokenizerBase, *, trust_remote_code: bool
) -> PreTrainedModel:
    """The frozen SFT policy of full fine-tuning: `source` loaded as the policy is (adapters merged), no LoRA."""
    args = ModelArguments(
        model_name_or_path=source,
        model_revision=model_args.model_revision,
        dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation,
        disable_dropout=model_args.disable_dropout,
    )
    model = load_model(args, tokenizer, head="causal", trust_remote_code=trust_remote_code)
    check_loaded_weights(model, "dpo", f"{source} (reference)")
    return model.requires_grad_(False).eval()


def policy_model(
    training_args: DPOStageConfig, model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase
) -> tuple[PreTrainedModel, PeftConfig | None]:
    """The policy loaded by our loader without LoRA, and the LoRA config TRL applies (`use_peft`), if any.

    TRL wraps the model itself, so the reference is the base with the adapter disabled; an adapter wrapped
    beforehand would make TRL keep a second ("ref") copy of it, saved into the run folder.
    """
    base_args = copy.copy(model_args)  # not `replace`: QLoRA options are refused without use_peft
    base_args.use_peft = False
    model = load_model(
        base_args,
        tokenizer,
        head="causal",
        trust_remote_code=training_args.trust_remote_code,
        gradient_checkpointing=training_args.gradient_checkpointing,
    )
    peft_config = lora_config(model_args, model.config.model_type, "causal") if model_args.use_peft else None
    return model, peft_config


def pair_losses(trainer: DPOTrainer, pairs_in: Mapping[str, int], max_dropped_share: float) -> dict[str, int]:
    """Count the pairs `max_length` dropped (prompt alone too long) or cut (a response truncated, EOS lost) per
    split; refuse a share above `max_dropped_share`. Returns `<split>_pairs`, `_pairs_dropped`, `_pairs_truncated`."""
    max_length = trainer.args.max_length
    prepared = {"train": trainer.train_dataset, "eval": trainer.eval_dataset}
    counts: dict[str, int] = {}
    for split, given in pairs_in.items():
        dataset = prepared.get(split)
        if dataset is None or max_length is None:
            continue
        lengths = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_dict()
        cut = sum(
            len(p) + max(len(c), len(r)) > max_length
            for p, c, r in zip(
                lengths["prompt_ids"], lengths["chosen_ids"], lengths["rejected_ids"], strict=True
            )
        )
        counts |= length_losses(
            "dpo", split, given, given - len(dataset), cut, max_length, max_dropped_share,
            unit="pairs", cut_means="a response truncated",
        )  # fmt: skip
    return counts


def run_dpo(
    training_args: DPOStageConfig,
    data_args: DataArguments,
    model_args: ModelArguments,
    run_options: RunFolderArguments | None = None,
) -> Path:
    """Train the policy with DPO against the SFT policy and write its run folder; returns the folder."""
    start = start_trl_stage("dpo", training_args, model_args)  # typed for SFT/reward: any TRL config works
    tokenizer, source = start.tokenizer, start.source
    run_folder = open_run_folder("dpo", training_args, (training_args, data_args, model_args), run_options)
    train, eval_set = dpo_datasets(data_args, seed=training_args.seed, rule=training_args.dpo_pairs)
    model, peft_config = policy_model(training_args, model_args, tokenizer)
    check_loaded_weights(model, "dpo", source)
    ref_model = None
    if peft_config is None:
        ref_model = reference_model(
            model_args, source, tokenizer, trust_remote_code=training_args.trust_remote_code
        )
    trainer = GuardedDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=training_args,
        train_dataset=train,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    pairs_in = {"train": len(train), **({"eval": len(eval_set)} if eval_set is not None else {})}
    pair_counts = pair_losses(trainer, pairs_in, training_args.max_dropped_share)
    metrics: dict[str, Any] = run_training(trainer, run_folder) | pair_counts
    check_weights(trainer.model, "dpo", f"after step {trainer.state.global_step}")
    if eval_set is not None:
        metrics.update(trainer.evaluate())
        if data_args.per_task_metrics:
            metrics.update(per_task_eval(trainer, eval_set))
    trainer.log_metrics("all", metrics)
    check_metrics(metrics, "dpo", trainer.state.global_step)
    output_dir = finish_run(
        trainer,
        stage="dpo",
        configs=(training_args, data_args, model_args),
        source=source,
        datasets=[s.path for s in data_sources(data_args)],
        metrics=metrics,
        eval_data=eval_set_description(data_args),
        lineage={"SFT policy": source},
    )
    end_run(trainer.accelerator, output_dir, start.push_to, training_args)
    return output_dir
