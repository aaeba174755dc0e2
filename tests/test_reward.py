"""The reward-model stage on the tiny model: whole-prompt batches, normalisation, run folder, recipes.

Its parts without a training run (grouping, formats, packing, loss, calibration): `test_reward_units.py`.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import pytest
import stage_runs
import torch
import yaml
from helpers import DDP_CPU, REPO, TINY_DATA, accelerate_launch, assert_resolved_as_written, head_of
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from stage_runs import REWARD_TYPES, lora_args
from transformers import AutoTokenizer

from instruct_tune.cli import main as cli_main
from instruct_tune.config import (
    ConfigError,
    DataArguments,
    ModelArguments,
    RewardStageConfig,
    parse_args,
    resolved_config,
)
from instruct_tune.data.preference_groups import group_comparisons, tokenize_groups
from instruct_tune.data.reward_collator import GroupedPreferenceCollator
from instruct_tune.evaluation.comparisons import pair_differences
from instruct_tune.models import adapter_chain, load_model, load_tokenizer
from instruct_tune.models.reward import NORMALIZATION_FILE, load_reward_model
from instruct_tune.stages.data_sources import train_eval_sets
from instruct_tune.stages.reward import normalize, reference_responses, run_reward
from instruct_tune.stages.reward_trainer import GroupedRewardTrainer

TASKS = ("add", "repeat", "reverse", "sort")

# the shared tiny reward config at this module's size: 16 prompts a batch, 64 normalisation samples
reward_args = partial(
    stage_runs.reward_args,
    per_device_train_batch_size=16,
    per_device_eval_batch_size=64,
    lr_scheduler_type="linear",
    warmup_steps=0,
    logging_steps=5,
    gradient_checkpointing=False,
    normalization_samples=64,
    normalization_max_new_tokens=24,
)


@pytest.fixture(scope="module")
def comparisons(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """160 training and 40 eval rankings (K=4) of the tiny task."""
    folder = tmp_path_factory.mktemp("comparisons")
    return (
        head_of(TINY_DATA / "comparisons.jsonl", folder / "train.jsonl", 160),
        head_of(TINY_DATA / "comparisons_eval.jsonl", folder / "eval.jsonl", 40),
    )


# --- the trainer batches whole prompts ------------------------------------------------------------------


def test_every_batch_of_the_trainer_holds_whole_groups(
    tiny_model_dir: Path, comparisons, tmp_path: Path
) -> None:
    model_args = ModelArguments(model_name_or_path=str(tiny_model_dir))
    tokenizer = load_tokenizer(model_args)
    train_pairs, _ = train_eval_sets(
        DataArguments(dataset_name=str(comparisons[0]), eval_fraction=0), "preference", seed=0
    )
    args = reward_args(tmp_path, per_device_train_batch_size=5)
    trainer = GroupedRewardTrainer(
        model=load_model(model_args, tokenizer, head="reward"),
        args=args,
        data_collator=GroupedPreferenceCollator(pad_token_id=tokenizer.pad_token_id),
        train_dataset=group_comparisons(train_pairs),
        processing_class=tokenizer,
    )
    seen_pairs = 0
    for batch in trainer.get_train_dataloader():
        # 5 whole prompts per batch: their 4 responses each, all 6 pairs of each, weights summing to 1 a prompt
        assert len(batch["reward_index"]) == 4 * 5 and len(batch["better"]) == 6 * 5
        assert batch["pair_weight"].sum().item() == pytest.approx(5)
        # every pair compares two responses of one prompt (responses 4g..4g+3 are prompt g's)
        assert torch.equal(batch["better"] // 4, batch["worse"] // 4)
        # and one packed row holds each prompt whole
        length = batch["input_ids"].shape[1]
        rows = batch["reward_index"] // length
        assert torch.equal(rows[batch["better"]], rows[batch["worse"]])
        seen_pairs += len(batch["better"])
    assert seen_pairs == len(train_pairs) == 160 * 6


# --- the stage end to end --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_run(tiny_model_dir: Path, sft_folder: Path, comparisons, tmp_path_factory: pytest.TempPathFactory):
    """LoRA reward model from the SFT run folder on 160 rankings; normalised on the eval chosen responses."""
    out = tmp_path_factory.mktemp("rm") / "reward"
    return stage_runs.train_reward(reward_args(out), lora_args(sft_folder), *comparisons)


def test_run_folder_holds_every_artifact(reward_run: Path, sft_folder: Path, tiny_model_dir: Path) -> None:
    files = {p.name for p in reward_run.iterdir()}
    expected = {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "README.md",
        "config.yaml",
        "metrics.json",
        "trainer_state.json",
        "calibration.json",
        "calibration.md",
        NORMALIZATION_FILE,
    }
    assert expected <= files
    assert not {n for n in files if n.endswith((".bin", ".pt", ".pth", ".pkl"))}
    adapter = json.loads((reward_run / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    # the adapter's base is the SFT run folder it was trained on, so loading merges the SFT adapter first
    assert adapter["base_model_name_or_path"] == str(sft_folder)
    assert adapter_chain(reward_run) == (str(tiny_model_dir), [str(sft_folder), str(reward_run)])
    weights = load_file(reward_run / "adapter_model.safetensors")
    assert any("score" in name for name in weights) and any("lora_A" in name for name in weights)


def test_metrics_calibration_and_card(reward_run: Path, tiny_model_dir: Path) -> None:
    metrics = json.loads((reward_run / "metrics.json").read_text())
    for key in ("eval_accuracy", "eval_margin", "train_loss", "reward_bias", "reward_std"):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert metrics["eval_comparisons"] == 40 * 6
    for task in TASKS:
        assert 0.0 <= metrics[f"eval_{task}_accuracy"] <= 1.0

    table = json.loads((reward_run / "calibration.json").read_text())
    assert sum(row["n"] for row in table) == 40 * 6
    assert all(0.5 <= row["predicted"] <= 1.0 and 0.0 <= row["accuracy"] <= 1.0 for row in table)
    assert [row["min_gap"] for row in table] == sorted(row["min_gap"] for row in table)
    assert "| abs(r_a - r_b) |" in (reward_run / "calibration.md").read_text()

    card = ModelCard.load(reward_run / "README.md")
    assert card.data.library_name == "peft"
    assert "reward" in card.data.tags and card.data.pipeline_tag == "text-classification"
    assert "## Calibration" in card.text and "## Normalisation" in card.text
    # the card states the units every later stage scores in: bias and scale together
    norm = json.loads((reward_run / "reward_normalization.json").read_text())
    assert f"bias {norm['bias']:+.4f} and scale {norm['scale']:.4f}" in card.text
    assert "load_reward_model" in card.text
    assert f"{metrics['eval_accuracy']:.4g}" in card.text


def test_reloaded_model_reproduces_training_time_scores(reward_run: Path, comparisons) -> None:
    rm = load_reward_model(reward_run)
    metrics = json.loads((reward_run / "metrics.json").read_text())
    normalization = json.loads((reward_run / NORMALIZATION_FILE).read_text())
    assert rm.normalization.bias == pytest.approx(normalization["bias"]) and normalization["n"] > 0
    # the keys older run folders have, and the scale the scores are divided by: the reference std
    assert set(normalization) == {"bias", "scale", "mean", "std", "n", "source"}
    assert normalization["scale"] == normalization["std"] > 0
    assert rm.normalization.scale == pytest.approx(normalization["scale"])

    # eval comparisons scored by the reloaded model: same margins as the in-memory model measured
    _, eval_pairs = train_eval_sets(
        DataArguments(dataset_name=str(comparisons[0]), eval_dataset_name=str(comparisons[1])),
        "preference",
        seed=0,
    )
    eval_groups = tokenize_groups(group_comparisons(eval_pairs), rm.tokenizer, max_length=128)
    diffs, _ = pair_differences(rm, eval_groups)
    assert diffs.mean().item() == pytest.approx(metrics["eval_margin"], abs=1e-5)

    # the reference responses (eval chosen responses) score mean 0 after normalisation
    args = reward_args(reward_run.parent / "unused")
    prompts, responses, source = reference_responses(args, eval_groups, rm.device)
    assert source == normalization["source"]
    raw = rm.raw_score(prompts, responses)
    assert raw.mean().item() == pytest.approx(normalization["mean"], abs=1e-5)
    scores = rm.score(prompts, responses)
    assert abs(scores.mean().item()) < 0.05 and scores.std().item() == pytest.approx(1.0, abs=1e-3)
    # scored in the same batch as the raw rewards: batches of another size differ by float noise, which the
    # division by a small std enlarges
    raw = rm.raw_score(prompts[:3], responses[:3])
    want = (raw + rm.normalization.bias) / rm.normalization.scale
    assert rm.score(prompts[:3], responses[:3]) == pytest.approx(want.tolist(), abs=1e-6)


def test_score_command_prints_the_normalised_score(reward_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert (
        cli_main(["score", str(reward_run), "--prompt", "Add 2 and 3.", "--response", "5", "--response", "7"])
        == 0
    )
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.startswith("reward (normalised") and "'Add 2 and 3.'" in header
    assert [row.split("\t")[1] for row in rows] == ["'5'", "'7'"]  # each score beside its response
    printed = [float(row.split("\t")[0]) for row in rows]
    want = load_reward_model(reward_run).score(["Add 2 and 3."] * 2, ["5", "7"])
    assert printed == pytest.approx(want.tolist(), abs=1e-3)


def test_normalisation_on_policy_samples(reward_run: Path, sft_folder: Path, comparisons) -> None:
    rm = load_reward_model(reward_run)
    args = reward_args(
        reward_run.parent / "unused",
        policy_path=str(sft_folder),
        normalization_prompts=str(TINY_DATA / "heldout_prompts.jsonl"),
        normalization_samples=24,
    )
    prompts, responses, source = reference_responses(args, None, rm.device)
    assert len(prompts) == len(responses) == 24 and str(sft_folder) in source
    record = normalize(rm, prompts, responses, source)
    assert record.n == 24 and record.std > 0 and record.scale == record.std
    assert rm.normalization is record
    assert abs(rm.score(prompts, responses).mean().item()) < 0.05
    # the same seed samples the same responses
    assert reference_responses(args, None, rm.device)[1] == responses


def test_chat_template_mismatch_is_refused(sft_folder: Path, comparisons, tmp_path: Path) -> None:
    other = tmp_path / "other-policy"
    tokenizer = AutoTokenizer.from_pretrained(sft_folder)
    tokenizer.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tokenizer.save_pretrained(other)
    with pytest.raises(ConfigError, match="chat templates differ") as err:
        run_reward(
            reward_args(tmp_path / "rm", policy_path=str(other)),
            DataArguments(dataset_name=str(comparisons[0]), eval_dataset_name=str(comparisons[1])),
            ModelArguments(model_name_or_path=str(sft_folder)),
        )
    assert str(sft_folder) in str(err.value) and str(other) in str(err.value)
    assert not (tmp_path / "rm").exists()


# --- recipe configs ----------------------------------------------------------------------------------------

REWARD_CONFIGS = sorted((REPO / "recipes" / "configs").glob("*/reward.yaml"))


def test_there_are_reward_configs() -> None:
    assert REPO / "recipes" / "configs" / "tiny" / "reward.yaml" in REWARD_CONFIGS
    assert REPO / "recipes" / "configs" / "gpt2-alpaca" / "reward.yaml" in REWARD_CONFIGS


@pytest.mark.parametrize("path", REWARD_CONFIGS, ids=lambda p: p.parent.name)
def test_reward_config_parses(path: Path, tmp_path: Path) -> None:
    parsed = parse_args(*REWARD_TYPES, args=["--config", str(path), "--output_dir", str(tmp_path)])
    assert isinstance(parsed[0], RewardStageConfig)
    assert_resolved_as_written(yaml.safe_load(path.read_text()), resolved_config(*parsed))


def test_reward_command_takes_the_stage_options(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["reward", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--policy_path",
        "--normalization_prompts",
        "--use_margin",
        "--share_prompt",
        "--use_peft",
    ):
        assert option in out


def test_accelerate_launch_two_processes(tiny_model_dir: Path, comparisons, tmp_path: Path) -> None:
    """DDP on CPU: ranks share the prompts, evaluation during training works, one run folder is written."""
    prompts, batch = 64, 4
    config = tmp_path / "reward.yaml"
    output_dir = tmp_path / "runs" / "reward"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(tiny_model_dir),
                "dataset_name": str(comparisons[0]),
                "eval_dataset_name": str(comparisons[1]),
                "max_train_samples": prompts,
                "output_dir": str(output_dir),
                "num_train_epochs": 1,
                "per_device_train_batch_size": batch,
                "learning_rate": 1.0e-3,
                "max_length": 128,
                "gradient_checkpointing": False,
                "logging_steps": 2,
                "eval_strategy": "steps",
                "eval_steps": 4,
                "save_strategy": "no",
                "report_to": "none",
                "disable_tqdm": True,
                "seed": 0,
            }
        )
    )
    accelerate_launch(DDP_CPU, "recipes/reward.py", ["--config", str(config), "--use_cpu", "true"])

    assert [p.name for p in output_dir.parent.iterdir()] == ["reward"]
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == prompts // (2 * batch)  # 2 ranks share the 64 prompts
    assert any("eval_loss" in entry for entry in state["log_history"])
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["eval_comparisons"] == 40 * 6
    assert (output_dir / NORMALIZATION_FILE).is_file()
