"""Supervised fine-tuning on demonstrations (InstructGPT step 1), on `trl.SFTTrainer`.

Chats are trained with completion-only loss by default: the conversation up to the last assistant turn is
the prompt, that turn (ending in EOS through the chat template) is the completion. With
`assistant_only_loss: true` every assistant turn is trained instead (the chat template needs
`{% generation %}` markers, which instruct_tune's default template has).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from trl import SFTTrainer

from instruct_tune.compat import add_trained_tokens, swap_collator, tensor_parallel_size
from instruct_tune.config import DataArguments, ModelArguments, SFTStageConfig
from instruct_tune.data.row_packing import REAL_TOKENS, RowPackedCollator
from instruct_tune.models import load_model
from instruct_tune.models.lm_head import select_lm_head
from instruct_tune.stages.data_sources import data_sources, eval_set_description, train_eval_sets
from instruct_tune.stages.guards import NonFiniteGuard, check_loaded_weights, check_metrics, check_weights
from instruct_tune.stages.lengths import sft_row_losses
from instruct_tune.stages.run_folder import RunFolderArguments, open_run_folder
from instruct_tune.stages.runner import end_run, finish_run, per_task_eval, run_training, start_trl_stage

logger = logging.getLogger(__name__)


def to_prompt_completion(example: Mapping[str, Any]) -> dict[str, Any]:
    """Split a chat at its last assistant turn into conversational prompt and completion."""
    messages = example["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return {"prompt": messages[:last], "completion": [messages[last]]}


class GuardedSFTTrainer(NonFiniteGuard, SFTTrainer):
    """`SFTTrainer` that stops on a NaN/inf loss or logged figure (see `instruct_tune.stages.guards`)."""

    guard_stage = "sft"


class RowPackedSFTTrainer(GuardedSFTTrainer):
    """`SFTTrainer` on rows of several chats collated by `RowPackedCollator`: bfd-packed rows
    (`packing_per_row: true`) or each batch's chats repacked (`repack_batches: true`).

    TRL refuses a custom collator once packing is on, so the collator is swapped in after construction. TRL
    counts a padding-free batch's tokens as the length of its one flat row; here rows are rows, so the count
    (`num_tokens`) is corrected to the real tokens of every row.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        swap_collator(self, RowPackedCollator(self.processing_class.pad_token_id, repack=self.args.repack_batches))

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        # Corrected before TRL adds its count inside the step, so the `num_tokens` it records is exact.
        extra = inputs.pop(REAL_TOKENS) - inputs["position_ids"].size(1)
        gathered = self.accelerator.gather_for_metrics(extra.reshape(1)).sum().item()
        add_trained_tokens(self, gathered // tensor_parallel_size(self))
        return super().training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        inputs.pop(REAL_TOKENS, None)
        return super().prediction_step(model, inputs, *args, **kwargs)


def sft_datasets(
    data_args: DataArguments, *, seed: int, completion_only: bool, num_proc: int | None = None
) -> tuple[Dataset, Dataset | None]:
    """Load, check and split the SFT data; chats become prompt/completion pairs for completion-only loss."""
    train, eval_set = train_eval_sets(data_args, "sft", seed=seed)
    if completion_only:
        split = {"function": to_prompt_completion, "remove_columns": ["messages"]}
        train = train.map(**split, num_proc=num_proc)
        eval_set = eval_set.map(**split) if eval_set is not None else None
    return train, eval_set


def run_sft(
    training_args: SFTStageConfig,
    data_args: DataArguments,
    model_args: ModelArguments,
    run_options: RunFolderArguments | None = None,
) -> Path:
    """Train the SFT policy and write its run folder; returns the folder."""
    start = start_trl_stage("sft", training_args, model_args)
    tokenizer, source = start.tokenizer, start.source
    run_folder = open_run_folder("sft", training_args, (training_args, data_args, model_args), run_options)
    completion_only = training_args.completion_only_loss is not False and not training_args.assistant_only_loss
    train, eval_set = sft_datasets(
        data_args, seed=training_args.seed, completion_only=completion_only, num_proc=training_args.dataset_num_proc
    )
    model = load_model(
        model_args,
        tokenizer,
        head="causal",
        trust_remote_code=training_args.trust_remote_code,
        gradient_checkpointing=training_args.gradient_checkpointing,
    )
    check_loaded_weights(model, "sft", source)
    rows = training_args.packing_per_row or training_args.repack_batches
    trainer_class = RowPackedSFTTrainer if rows else GuardedSFTTrainer
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=eval_set,
        processing_class=tokenizer,
    )
    rows_in = {"train": len(train), **({"eval": len(eval_set)} if eval_set is not None else {})}
    row_counts = sft_row_losses(trainer, rows_in, training_args.max_dropped_share)
    select_lm_head(trainer.model, training_args.device, training_args.fused_lm_head)
    metrics = run_training(trainer, run_folder) | row_counts
    check_weights(trainer.model, "sft", f"after step {trainer.state.global_step}")
    if eval_set is not None:
        metrics.update(trainer.evaluate())
        if data_args.per_task_metrics:
            metrics.update(per_task_eval(trainer, eval_set))
    trainer.log_metrics("all", metrics)
    check_metrics(metrics, "sft", trainer.state.global_step)
    output_dir = finish_run(
        trainer,
        stage="sft",
        configs=(training_args, data_args, model_args),
        source=model_args.model_name_or_path,
        datasets=[source.path for source in data_sources(data_args)],
        metrics=metrics,
        eval_data=eval_set_description(data_args),
    )
    end_run(trainer.accelerator, output_dir, start.push_to, training_args)
    return output_dir
