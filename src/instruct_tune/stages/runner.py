"""What every training stage does around its trainer: begin (logging, push request, seed, tokenizer), resume
from a checkpoint, train, write the run folder."""

from __future__ import annotations

import logging
import resource
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from datasets import Dataset
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments, set_seed

from instruct_tune.artifacts import remove_pickled_files, write_metrics, write_model_card
from instruct_tune.checkpoints import (
    CheckpointProblem,
    choose_checkpoint,
    disk_full_named,
    trainer_checkpoint_problem,
)
from instruct_tune.compat import deepspeed_on_cpu, fsdp_on_cpu
from instruct_tune.config import (
    ConfigError,
    ModelArguments,
    PPOTrainingOptions,
    RewardStageConfig,
    SFTStageConfig,
    follow_model_dropout,
    resolved_config,
    save_config,
)
from instruct_tune.config.checks import check_launch_trains_together
from instruct_tune.hub import PushError, check_repo_id, push_folder
from instruct_tune.models import load_tokenizer
from instruct_tune.models.adapter_base import local_base_warning, record_adapter_base
from instruct_tune.models.loading import adapter_chain
from instruct_tune.ppo.sharding import tie_gathered
from instruct_tune.stages.data_sources import task_tags
from instruct_tune.stages.lengths import fit_max_length, model_context
from instruct_tune.stages.run_folder import RunFolder
from instruct_tune.stages.run_lock import release_lock
from instruct_tune.stages.train_metrics import NothingLeftToTrain, StopAtTheEnd, whole_run_metrics

logger = logging.getLogger(__name__)

# The training options of a stage: a Trainer's (SFT, reward) or the PPO stage's own, which declare the same names.
StageArguments = TrainingArguments | PPOTrainingOptions


def configure_logging(args: StageArguments | int) -> None:
    """Show instruct_tune's own messages (detected formats, skipped rows, resumes) on the main process.

    `args`: a stage's training options (their process log level; the passive WARNING becomes INFO where the
    process logs), or a `logging` level itself (eval, one process: `logging.INFO`).
    """
    package_logger = logging.getLogger("instruct_tune")
    if not package_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[instruct_tune] %(message)s"))
        package_logger.addHandler(handler)
    if isinstance(args, int):
        package_logger.setLevel(args)
        return
    level = args.get_process_log_level()
    package_logger.setLevel(logging.INFO if level == logging.WARNING and args.should_log else level)


def begin_stage(args: StageArguments) -> str | None:
    """How every training stage begins: its logging, its push request (`take_push_request`, checked now) and
    its seed; returns the repo to push to."""
    configure_logging(args)
    push_to = take_push_request(args)
    set_seed(args.seed)
    return push_to


def check_process_group(args: TrainingArguments) -> None:
    """Refuse a multi-process launch in which each process would train alone (`check_launch_trains_together`)."""
    check_launch_trains_together(args.world_size)


@dataclass(frozen=True)
class StageStart:
    """What `start_trl_stage` gives a TRL stage: the push request, the tokenizer and the model it starts from
    (`model_name_or_path` read after the loader: a GGUF source is then its converted folder)."""

    push_to: str | None
    tokenizer: PreTrainedTokenizerBase
    source: str


def start_trl_stage(
    stage: str, training_args: SFTStageConfig | RewardStageConfig, model_args: ModelArguments
) -> StageStart:
    """Begin a TRL stage (SFT, reward): `begin_stage`, the model's dropout for TRL's (`follow_model_dropout`),
    the tokenizer, and `max_length` checked against the model's context."""
    push_to = begin_stage(training_args)
    if deepspeed_on_cpu(training_args):  # `recipes/accelerate/zero3_cpu.yaml`: DeepSpeed's CPU processes
        logger.info("DeepSpeed over CPU processes (gloo)")
    if fsdp_on_cpu(training_args):  # `accelerate launch --config_file recipes/accelerate/fsdp_cpu.yaml`
        logger.info("FSDP over CPU processes (gloo)")
    check_process_group(training_args)
    follow_model_dropout(training_args, model_args)  # every TRL stage: the loader's and TRL's dropout agree
    tokenizer = load_tokenizer(model_args, trust_remote_code=training_args.trust_remote_code)
    source = model_args.model_name_or_path
    # GRPO/RLOO configs have no `max_length` (their budget is max_completion_length, checked by the stage).
    if getattr(training_args, "max_length", None) is not None:
        context = model_context(source, trust_remote_code=training_args.trust_remote_code)
        fit_max_length(stage, training_args, context, source)
    return StageStart(push_to, tokenizer, source)


def checkpoint_to_resume(
    output_dir: str, resume_from_checkpoint: str | None, problem: CheckpointProblem | None = None
) -> str | None:
    """The checkpoint a stage continues from: the one asked for, else the newest in `output_dir`, else None.

    `resume_from_checkpoint` may be a path, or "true"/"last" for the newest checkpoint of `output_dir`. With
    `problem` (e.g. `trainer_checkpoint_problem`) only complete checkpoints count: incomplete newer ones are
    skipped, logged and removed.
    """
    return choose_checkpoint(output_dir, resume_from_checkpoint, problem)


class DropPickledArgs(TrainerCallback):
    """Remove the Trainer's pickled `training_args.bin` from each checkpoint it saves: it holds every option
    in plain text, `hub_token` included (the run folder keeps `config.yaml`, without secrets, instead)."""

    def on_save(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            for path in Path(args.output_dir).glob("checkpoint-*/training_args.bin"):
                path.unlink(missing_ok=True)


def run_training(trainer: Trainer, run_folder: RunFolder | None = None) -> dict[str, Any]:
    """Train, continuing from the checkpoint `run_folder` chose (else the newest complete one of the output
    folder); returns the training metrics. A full disk is named as such (`DiskFullError`)."""
    args = trainer.args
    trainer.add_callback(DropPickledArgs())
    if run_folder is not None:
        resume = run_folder.resume_checkpoint(trainer.accelerator)
    else:
        resume = checkpoint_to_resume(args.output_dir, args.resume_from_checkpoint, trainer_checkpoint_problem)
    trainer.add_callback(StopAtTheEnd())
    with disk_full_named(args.output_dir):
        try:
            metrics = trainer.train(resume_from_checkpoint=resume).metrics
        except NothingLeftToTrain:
            logger.info("%s is at the run's last step (%d): nothing left to train", resume, trainer.state.global_step)
            metrics = {}
    return whole_run_metrics(metrics, trainer.state.log_history, resumed=resume is not None)


def peak_rss_mib() -> float:
    """The peak resident memory of this process so far, in MiB (Linux reports `ru_maxrss` in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def per_task_eval(trainer: Trainer, eval_set: Dataset) -> dict[str, float]:
    """Eval figures of each task tag of the eval set (`eval_<task>_loss`, DPO's `eval_<task>_rewards/...`), so
    that a regression in one task is not averaged away.

    TRL's DPO adds its own figures (`rewards/*`, `logps/*`) under a fixed `eval_` prefix whatever the
    evaluation's prefix; they are renamed here so that they do not overwrite the whole eval set's.
    """
    tasks = task_tags(eval_set["task"]) if "task" in eval_set.column_names else []
    metrics: dict[str, float] = {}
    for task in tasks:
        prefix = f"eval_{task}"
        subset = eval_set.filter(lambda row, t=task: row["task"] == t)
        found = trainer.evaluate(eval_dataset=subset, metric_key_prefix=prefix)
        for key, value in found.items():
            if key.startswith(f"{prefix}_"):
                metrics[key] = value
            elif key.startswith("eval_"):
                metrics[f"{prefix}_{key.removeprefix('eval_')}"] = value
    return metrics


def write_run_folder(
    output_dir: str | Path,
    *,
    stage: str,
    configs: Sequence[Any],
    base_model: str,
    datasets: Sequence[str],
    metrics: Mapping[str, Any],
    lineage: Mapping[str, str] | None = None,
    eval_data: str | None = None,
) -> Path:
    """Write `config.yaml`, the model card and `metrics.json` beside a saved model; drop pickled files.

    `metrics.json` comes last (atomically): make reads it as the sign of a finished SFT or PPO folder. It
    records the process's peak resident memory (`peak_rss_mib`), so methods compare at what memory cost.
    """
    output_dir = Path(output_dir)
    metrics = dict(metrics) | {"peak_rss_mib": peak_rss_mib()}
    remove_pickled_files(output_dir)
    save_config(output_dir, *configs)
    write_model_card(
        output_dir,
        stage=stage,
        base_model=base_model,
        is_adapter=(output_dir / "adapter_config.json").is_file(),
        datasets=datasets,
        config=resolved_config(*configs),
        metrics=metrics,
        lineage=lineage,
        eval_data=eval_data,
    )
    write_metrics(output_dir, metrics)
    logger.info("Wrote %s run folder %s", stage, output_dir)
    return output_dir


def save_trained_model(trainer: Trainer, output_dir: Path) -> None:
    """Save the model or adapter and the tokenizer as one process does, however many processes trained it.

    Under FSDP each rank holds a shard: every rank takes part in gathering the full state dict
    (`accelerator.get_state_dict`, collective) and the main process writes it with `save_pretrained`, so the run
    folder holds `model.safetensors` (or the adapter) whatever the FSDP `state_dict_type`: with
    SHARDED_STATE_DICT (the type for large models' checkpoints) `Trainer.save_model` writes no weights at all.
    """
    if not trainer.is_fsdp_enabled:
        trainer.save_model(str(output_dir))
        return
    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.save_pretrained(output_dir, state_dict=tie_gathered(model, state_dict))
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(output_dir)


def finish_run(
    trainer: Trainer,
    *,
    stage: str,
    configs: Sequence[Any],
    source: str,
    datasets: Sequence[str],
    metrics: Mapping[str, Any],
    eval_data: str | None = None,
    lineage: Mapping[str, str] | None = None,
) -> Path:
    """Save model/adapter, tokenizer, `config.yaml`, `metrics.json`, `trainer_state.json` and the model card.

    `source` is the model the stage started from: the card names its root checkpoint as `base_model` and,
    when it is an earlier stage's adapter folder, records it as the lineage. `lineage`: the other run folders
    the stage read (e.g. {"SFT policy": ..., "reward model": ...}), recorded on the card after it.
    """
    output_dir = Path(trainer.args.output_dir)
    with disk_full_named(output_dir):
        save_trained_model(trainer, output_dir)
        if not trainer.is_world_process_zero():
            return output_dir
        record_adapter_base(output_dir, source)  # the adapter was trained on `source` (merged), not on its root
        trainer.state.save_to_json(str(output_dir / "trainer_state.json"))
        root, adapters = adapter_chain(source)
        named = dict(lineage or {})
        started = {"initialised from": source} if adapters and source not in named.values() else {}
        return write_run_folder(
            output_dir,
            stage=stage,
            configs=configs,
            base_model=root,
            datasets=datasets,
            metrics=metrics,
            lineage=started | named,  # the start once: DPO's source is also its "SFT policy"
            eval_data=eval_data,
        )


def take_push_request(args: StageArguments) -> str | None:
    """The repo a stage pushes its finished run folder to (`push_to_hub` + `hub_model_id`), checked now.

    The Trainer's own push is switched off: it would push checkpoints and its own card on every save. The
    stage pushes once at the end with `push_run_folder` (one commit: model or adapter, tokenizer, card).
    """
    if not args.push_to_hub:
        return None
    if not args.hub_model_id:
        raise ConfigError("push_to_hub: true needs hub_model_id: the repo to push to, as owner/name")
    try:
        check_repo_id(args.hub_model_id)
    except PushError:
        raise ConfigError(
            f"hub_model_id: {args.hub_model_id!r} is not a Hub repo id: use owner/name, e.g. my-user/tiny-ppo"
        ) from None
    args.push_to_hub = False
    return args.hub_model_id


def push_run_folder(output_dir: str | Path, repo_id: str | None, args: StageArguments) -> None:
    """Push the finished run folder when the config asked for it (see `take_push_request`)."""
    if repo_id is None:
        return
    if warning := local_base_warning(output_dir):
        logger.warning(warning)
    try:
        _, url = push_folder(output_dir, repo_id, private=bool(args.hub_private_repo), revision=args.hub_revision)
    except PushError as error:
        raise PushError(
            f"{error}. The run folder {output_dir} is complete: push it later with "
            f"`instruct-tune push {output_dir} --repo-id {repo_id}`"
        ) from None
    logger.info("Pushed %s to %s", output_dir, url)


def end_run(
    accelerator: Accelerator, output_dir: str | Path, push_to: str | None, args: StageArguments
) -> None:
    """Wait for every process, end the run (trackers closed, the process group of a multi-process run
    destroyed), then push the run folder from the main process: after the last collective, a failed push
    cannot leave other ranks waiting.

    A rank whose interpreter exits while gloo's threads still run aborts ("terminate called without an active
    exception", SIGABRT), which fails the whole launch after the run folder was written.
    """
    main_process = accelerator.is_main_process  # read while the process group still exists
    accelerator.wait_for_everyone()
    accelerator.end_training()
    try:
        if main_process:
            push_run_folder(output_dir, push_to, args)
    finally:
        release_lock(output_dir)  # the run folder's lock (`open_run_folder`), held through the push
