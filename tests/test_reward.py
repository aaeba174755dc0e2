"""The reward-model stage on the tiny model: grouped K-way data, loss, packing, normalisation, run folder."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file
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
from instruct_tune.data import DataError
from instruct_tune.models import adapter_chain, load_model, load_tokenizer
from instruct_tune.models.reward import (
    NORMALIZATION_FILE,
    RewardModel,
    load_reward_model,
    reward_input_ids,
)
from instruct_tune.stages.data_sources import train_eval_sets
from instruct_tune.stages.reward import (
    GroupedPreferenceCollator,
    GroupedRewardTrainer,
    calibration_table,
    group_comparisons,
    group_ranking_loss,
    normalize,
    packed_rewards,
    pair_differences,
    reference_responses,
    run_reward,
    tokenize_groups,
)

REPO = Path(__file__).resolve().parents[1]
TINY_DATA = REPO / "data" / "tiny"
REWARD_TYPES = (RewardStageConfig, DataArguments, ModelArguments)
TASKS = ("add", "repeat", "reverse", "sort")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def head_of(src: Path, dst: Path, n: int) -> Path:
    with src.open() as lines:
        dst.write_text("".join(line for _, line in zip(range(n), lines, strict=False)))
    return dst


def reward_args(output_dir: Path, **overrides) -> RewardStageConfig:
    """A small, fast CPU configuration; `overrides` replace any of its values."""
    values = dict(
        output_dir=str(output_dir),
        num_train_epochs=1,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        learning_rate=3e-3,
        lr_scheduler_type="linear",
        warmup_steps=0,
        logging_steps=5,
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        max_length=128,
        gradient_checkpointing=False,
        use_cpu=True,
        seed=0,
        normalization_samples=64,
        normalization_max_new_tokens=24,
    )
    values.update(overrides)
    return RewardStageConfig(**values)


@pytest.fixture(scope="module")
def comparisons(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """160 training and 40 eval rankings (K=4) of the tiny task."""
    folder = tmp_path_factory.mktemp("comparisons")
    return (
        head_of(TINY_DATA / "comparisons.jsonl", folder / "train.jsonl", 160),
        head_of(TINY_DATA / "comparisons_eval.jsonl", folder / "eval.jsonl", 40),
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model_dir)))


# --- data: grouping K-way rankings ----------------------------------------------------------------------


def test_k4_ranking_is_one_group_of_six_pairs(tmp_path: Path, tokenizer) -> None:
    rows = [
        {"prompt": "q", "responses": ["r0", "r1", "r2", "r3"], "ranking": [2, 0, 3, 1], "task": "sort"},
        {"prompt": "p", "chosen": "good", "rejected": "bad", "task": "pair"},
    ]
    path = write_jsonl(tmp_path / "rank.jsonl", rows[:1])
    pairs_path = write_jsonl(tmp_path / "pairs.jsonl", rows[1:])
    data_args = DataArguments(
        dataset_mixture=[{"path": str(path)}, {"path": str(pairs_path)}], eval_fraction=0
    )
    pairs, _ = train_eval_sets(data_args, "preference", seed=0)
    assert len(pairs) == 7  # K(K-1)/2 = 6 pairs of the ranking + 1 plain pair
    groups = group_comparisons(pairs)
    assert len(groups) == 2
    ranking = next(g for g in groups if g["task"] == "sort")
    assert sorted(ranking["responses"]) == ["r0", "r1", "r2", "r3"]
    order = ["r2", "r0", "r3", "r1"]  # best first
    got = {
        (ranking["responses"][w], ranking["responses"][v])
        for w, v in zip(ranking["better"], ranking["worse"], strict=True)
    }
    assert got == {(order[i], order[j]) for i in range(4) for j in range(i + 1, 4)}

    batch = GroupedPreferenceCollator(pad_token_id=tokenizer.pad_token_id)(
        list(tokenize_groups(groups, tokenizer, max_length=128))
    )
    assert len(batch["better"]) == 7 and len(batch["reward_index"]) == 4 + 2
    # each prompt weighs once: its pairs share 1/P_g
    weights = sorted(batch["pair_weight"].tolist())
    assert weights == pytest.approx([1 / 6] * 6 + [1.0])
    assert batch["pair_weight"].sum().item() == pytest.approx(2.0)


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


def test_group_loss_weights_each_prompt_once() -> None:
    rewards = torch.tensor([0.3, -0.2, 1.0, 0.1, 2.0, -1.0])  # prompt A: rows 0-3 (K=4), prompt B: rows 4-5
    a_pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    better = torch.tensor([p[0] for p in a_pairs] + [5])
    worse = torch.tensor([p[1] for p in a_pairs] + [4])
    weight = torch.tensor([1 / 6] * 6 + [1.0])
    loss_a = -sum(F.logsigmoid(rewards[i] - rewards[j]) for i, j in a_pairs) / 6
    loss_b = -F.logsigmoid(rewards[5] - rewards[4])
    expected = (loss_a + loss_b) / 2  # InstructGPT: -1/C(K,2) E[log sigmoid(r_w - r_l)], each prompt once
    assert group_ranking_loss(rewards, better, worse, weight).item() == pytest.approx(
        expected.item(), abs=1e-6
    )
    margin = torch.full((7,), 0.5)
    shifted = (
        -sum(F.logsigmoid(rewards[i] - rewards[j] - 0.5) for i, j in a_pairs) / 6
        - F.logsigmoid(rewards[5] - rewards[4] - 0.5)
    ) / 2
    assert group_ranking_loss(rewards, better, worse, weight, margin).item() == pytest.approx(
        shifted.item(), abs=1e-6
    )


@pytest.mark.parametrize(("attention", "row_length"), [("sdpa", 256), ("eager", 256), ("sdpa", 1)])
def test_packed_rows_give_the_per_response_rewards(
    tiny_model_dir: Path, tokenizer, attention: str, row_length: int
) -> None:
    model_args = ModelArguments(model_name_or_path=str(tiny_model_dir), attn_implementation=attention)
    model = load_model(model_args, tokenizer, head="reward").eval()
    groups = [
        {"prompt": "Add 2 and 3.", "responses": ["5", "6 Easy!", "55"]},
        {"prompt": "Reverse this list: ant, bee, cow", "responses": ["cow, bee, ant", "ant", "x y z w"]},
        {"prompt": "Add 12 and 30.", "responses": ["42", "24"]},
    ]
    rows = [
        {
            "input_ids": reward_input_ids(tokenizer, [g["prompt"]] * len(g["responses"]), g["responses"]),
            "better": [0],
            "worse": [1],
            "margin": [0.0],
        }
        for g in groups
    ]
    packed = GroupedPreferenceCollator(pad_token_id=tokenizer.pad_token_id, row_length=row_length)(rows)
    assert packed["input_ids"].shape[0] == (1 if row_length == 256 else 3)  # prompts share rows up to 256
    plain = GroupedPreferenceCollator(pad_token_id=tokenizer.pad_token_id, share_prompt=False)(rows)
    assert packed["input_ids"].numel() < plain["input_ids"].numel()  # the prompt is computed once
    with torch.no_grad():
        got = packed_rewards(model, packed)
        want = model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits[:, 0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # and equal to what the reward model's scoring function reads at the EOS token
    scored = RewardModel(model, tokenizer).raw_score(
        [g["prompt"] for g in groups for _ in g["responses"]], [r for g in groups for r in g["responses"]]
    )
    torch.testing.assert_close(got, scored, atol=1e-5, rtol=0)


# --- data: every preference format, and the errors ------------------------------------------------------


def _formats(tmp_path: Path) -> dict[str, Path]:
    user = {"role": "user", "content": "Add 1 and 2."}
    return {
        "preference": write_jsonl(
            tmp_path / "pref.jsonl", [{"prompt": "Add 1 and 2.", "chosen": "3", "rejected": "4"}]
        ),
        "preference_implicit": write_jsonl(
            tmp_path / "implicit.jsonl",
            [
                {
                    "chosen": [user, {"role": "assistant", "content": "3"}],
                    "rejected": [user, {"role": "assistant", "content": "4"}],
                }
            ],
        ),
        "hh_rlhf": write_jsonl(
            tmp_path / "hh.jsonl",
            [
                {
                    "chosen": "\n\nHuman: Add 1 and 2.\n\nAssistant: 3",
                    "rejected": "\n\nHuman: Add 1 and 2.\n\nAssistant: 4",
                }
            ],
        ),
        "sharegpt_preference": write_jsonl(
            tmp_path / "sgp.jsonl",
            [
                {
                    "conversations": [{"from": "human", "value": "Add 1 and 2."}],
                    "chosen": {"from": "gpt", "value": "3"},
                    "rejected": {"from": "gpt", "value": "4"},
                }
            ],
        ),
        "ranking": write_jsonl(
            tmp_path / "rank.jsonl",
            [{"prompt": "Add 1 and 2.", "responses": ["4", "3", "5"], "ranking": [1, 0, 2]}],
        ),
        "ranking_scores": write_jsonl(
            tmp_path / "scores.jsonl",
            [{"prompt": "Add 1 and 2.", "responses": ["4", "3", "5"], "scores": [0.5, 1, 0]}],
        ),
    }


def test_every_preference_format_goes_through_the_stage_data_prep(tmp_path: Path, tokenizer) -> None:
    for name, path in _formats(tmp_path).items():
        pairs, _ = train_eval_sets(
            DataArguments(dataset_name=str(path), eval_fraction=0), "preference", seed=0
        )
        groups = tokenize_groups(group_comparisons(pairs), tokenizer, max_length=128)
        assert len(groups) == 1, name
        group = groups[0]
        assert group["prompt"] == [{"role": "user", "content": "Add 1 and 2."}], name
        never_worse = set(range(len(group["responses"]))) - set(group["worse"])
        assert [group["responses"][i] for i in never_worse] == ["3"], name
        k = len(group["responses"])
        assert len(group["better"]) == k * (k - 1) // 2, name
        batch = GroupedPreferenceCollator(pad_token_id=tokenizer.pad_token_id, use_margin=True)(list(groups))
        assert batch["margin"].shape == batch["better"].shape, name
        if name == "ranking_scores":  # margins from score differences: 3 (1) > 4 (0.5) > 5 (0)
            assert sorted(batch["margin"].tolist()) == pytest.approx([0.5, 0.5, 1.0])
        else:
            assert batch["margin"].abs().sum().item() == 0.0, name


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"prompt": "q", "responses": ["a", "b", "c"], "scores": [1, 0.5, 1]}, r"row 2: tied scores"),
        (
            {"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 1, 1]},
            r"row 2: ranking \[0, 1, 1\] is not a permutation",
        ),
        (
            {"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 1, 3]},
            r"row 2: ranking .* not a permutation",
        ),
    ],
)
def test_bad_rankings_stop_the_stage_naming_the_row(tmp_path: Path, row: dict, match: str) -> None:
    good = {"prompt": "p", "responses": ["x", "y"], "ranking": [1, 0]}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError, match=match) as err:
        train_eval_sets(DataArguments(dataset_name=str(path), eval_fraction=0), "preference", seed=0)
    assert "bad.jsonl" in str(err.value)
    # with skip_invalid the bad row is dropped and counted, the good one trains
    pairs, _ = train_eval_sets(
        DataArguments(dataset_name=str(path), eval_fraction=0, skip_invalid=True), "preference", seed=0
    )
    assert len(group_comparisons(pairs)) == 1


# --- the stage end to end --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_run(tiny_model_dir: Path, sft_folder: Path, comparisons, tmp_path_factory: pytest.TempPathFactory):
    """LoRA reward model from the SFT run folder on 160 rankings; normalised on the eval chosen responses."""
    out = tmp_path_factory.mktemp("rm") / "reward"
    args = reward_args(out)
    data_args = DataArguments(dataset_name=str(comparisons[0]), eval_dataset_name=str(comparisons[1]))
    model_args = ModelArguments(model_name_or_path=str(sft_folder), use_peft=True, lora_r=8, lora_alpha=16)
    return run_reward(args, data_args, model_args)


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
    assert "load_reward_model" in card.text
    assert f"{metrics['eval_accuracy']:.4g}" in card.text


def test_reloaded_model_reproduces_training_time_scores(reward_run: Path, comparisons) -> None:
    rm = load_reward_model(reward_run)
    metrics = json.loads((reward_run / "metrics.json").read_text())
    normalization = json.loads((reward_run / NORMALIZATION_FILE).read_text())
    assert rm.bias == pytest.approx(normalization["bias"]) and normalization["n"] > 0

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
    assert abs(rm.score(prompts, responses).mean().item()) < 0.05
    assert rm.score(prompts[:3], responses[:3]) == pytest.approx((raw[:3] + rm.bias).tolist(), abs=1e-6)


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
    assert record["n"] == 24 and record["std"] > 0
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


def test_calibration_table_buckets_by_gap() -> None:
    diffs = torch.tensor([0.1, -0.2, 0.3, 2.0, -3.0, 4.0, 5.0, 6.0])
    table = calibration_table(diffs, buckets=2)
    assert [row["n"] for row in table] == [4, 4]
    assert table[0]["accuracy"] == pytest.approx(0.75) and table[1]["accuracy"] == pytest.approx(0.75)
    assert table[0]["predicted"] < table[1]["predicted"]


# --- recipe configs ----------------------------------------------------------------------------------------

REWARD_CONFIGS = sorted((REPO / "recipes" / "configs").glob("*/reward.yaml"))


def test_there_are_reward_configs() -> None:
    assert REPO / "recipes" / "configs" / "tiny" / "reward.yaml" in REWARD_CONFIGS
    assert REPO / "recipes" / "configs" / "gpt2-alpaca" / "reward.yaml" in REWARD_CONFIGS


@pytest.mark.parametrize("path", REWARD_CONFIGS, ids=lambda p: p.parent.name)
def test_reward_config_parses(path: Path, tmp_path: Path) -> None:
    parsed = parse_args(*REWARD_TYPES, args=["--config", str(path), "--output_dir", str(tmp_path)])
    assert isinstance(parsed[0], RewardStageConfig)
    raw = yaml.safe_load(path.read_text())
    resolved = resolved_config(*parsed)
    for key, value in raw.items():
        if key in ("env", "output_dir"):
            continue
        got = resolved[key]
        if isinstance(value, str) and isinstance(got, list):
            assert got == [value], key
        elif isinstance(value, float) or isinstance(got, float):
            assert got == pytest.approx(value), key
        else:
            assert got == value, key


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
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "recipes/reward.py"]
    command += ["--config", str(config), "--use_cpu", "true"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    assert [p.name for p in output_dir.parent.iterdir()] == ["reward"]
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == prompts // (2 * batch)  # 2 ranks share the 64 prompts
    assert any("eval_loss" in entry for entry in state["log_history"])
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["eval_comparisons"] == 40 * 6
    assert (output_dir / NORMALIZATION_FILE).is_file()
