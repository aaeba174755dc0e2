"""Adversarial inputs of issue 19 (items 2, 8, 10, 11, 12): each stops with an error naming the option, stage,
step or quantity, before anything is marked finished (no metrics.json / reward_normalization.json), or is
skipped and counted where that is the documented behaviour.

Real trainers on the tiny model, a few steps each.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from functools import partial
from pathlib import Path

import pytest
import stage_runs
import yaml
from helpers import TINY_DATA, head_of
from stage_runs import PPO_TYPES, REWARD_TYPES, SFT_TYPES, lora_args, train_reward

from instruct_tune.config import ConfigError, DataArguments, EvalStageConfig, ModelArguments, parse_args
from instruct_tune.stages.eval import run_eval
from instruct_tune.stages.ppo import run_ppo
from instruct_tune.stages.reward import run_reward
from instruct_tune.stages.sft import run_sft

FINISHED = ("metrics.json", "reward_normalization.json")
WORDS = [
    "apple",
    "bus",
    "cat",
    "dog",
    "egg",
    "fish",
    "goat",
    "hat",
    "ice",
    "jam",
    "kite",
    "lamp",
    "moon",
    "nest",
    "owl",
    "pig",
]


def not_finished(folder: Path) -> bool:
    return not any((folder / name).exists() for name in FINISHED)


def long_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return ", ".join(rng.choice(WORDS) for _ in range(n_words))


def chat(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def sft_rows() -> list[dict]:
    with (TINY_DATA / "sft.jsonl").open() as src:
        return [json.loads(line) for _, line in zip(range(64), src, strict=False)]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, sft_rows: list[dict]) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("adv-data")
    long_prompt = chat(f"Write this list in reverse order: {long_text(120)}", "done")
    long_answer = chat("Say the word cat 3 times.", long_text(120, seed=1))
    return {
        "sft": write_rows(folder / "sft.jsonl", sft_rows),
        # 2 prompts that fill max_length 64 alone (dropped) and 2 answers it cuts, among 40 chats: 10%
        "sft_some_long": write_rows(
            folder / "some_long.jsonl", sft_rows[:36] + [long_prompt, long_answer] * 2
        ),
        # half the chats have a prompt longer than max_length 64
        "sft_half_long": write_rows(folder / "half_long.jsonl", sft_rows[:20] + [long_prompt] * 20),
        # chats longer than the tiny model's 128 positions
        "sft_longer_than_model": write_rows(folder / "longer.jsonl", sft_rows[:8] + [long_answer] * 8),
        "comparisons": head_of(TINY_DATA / "comparisons.jsonl", folder / "comparisons.jsonl", 48),
        "comparisons_eval": head_of(
            TINY_DATA / "comparisons_eval.jsonl", folder / "comparisons_eval.jsonl", 16
        ),
        "prompts": head_of(TINY_DATA / "prompts.jsonl", folder / "prompts.jsonl", 32),
        "heldout": head_of(TINY_DATA / "heldout_prompts.jsonl", folder / "heldout.jsonl", 8),
        "heldout64": head_of(TINY_DATA / "heldout_prompts.jsonl", folder / "heldout64.jsonl", 64),
    }


# the shared tiny stage configs, logged every step: 3 SFT steps, one reward epoch
sft_args = partial(stage_runs.sft_args, max_steps=3, per_device_eval_batch_size=32, logging_steps=1)
reward_args = partial(stage_runs.reward_args, logging_steps=1)


def garbage_copy(model_dir: Path, dst: Path) -> Path:
    """A copy of the model whose weight file holds random bytes after its (intact) header."""
    shutil.copytree(model_dir, dst)
    weights = dst / "model.safetensors"
    data = bytearray(weights.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]
    data[start:] = random.Random(0).randbytes(len(data) - start)
    weights.write_bytes(bytes(data))
    return dst


# --- config values, refused when parsed (before any data is read) ----------------------------------------


@pytest.mark.parametrize(
    ("types", "values", "match"),
    [
        (
            SFT_TYPES,
            {"per_device_train_batch_size": 32.5},
            r"per_device_train_batch_size: 32\.5 is not a whole",
        ),
        (
            SFT_TYPES,
            {"per_device_train_batch_size": 0},
            r"per_device_train_batch_size: 0 is not a whole number >= 1",
        ),
        (REWARD_TYPES, {"per_device_train_batch_size": -4}, r"per_device_train_batch_size: -4 is not"),
        (SFT_TYPES, {"learning_rate": -1}, r"learning_rate: -1 is not a number > 0"),
        (SFT_TYPES, {"num_train_epochs": [1, 2]}, r"num_train_epochs: \[1, 2\] is not a number > 0"),
        (SFT_TYPES, {"max_length": -5}, r"max_length: -5 is not a whole number >= 1"),
        (REWARD_TYPES, {"max_length": 0}, r"max_length: 0 is not a whole number >= 1"),
        (
            SFT_TYPES,
            {"dataset_name": None, "dataset_mixture": [{"path": "data/tiny/sft.jsonl", "wieght": 0.5}]},
            r"dataset_mixture\[0\]: unknown key `wieght` \(did you mean `weight`\?\)",
        ),
        (PPO_TYPES, {"max_kl": -1}, r"max_kl: -1 is not a number > 0"),
        (PPO_TYPES, {"min_eos_share": 2}, r"min_eos_share: 2 is not a number >= 0 and <= 1"),
    ],
    ids=[
        "batch-32.5",
        "batch-0",
        "reward-batch-neg",
        "lr-neg",
        "epochs-list",
        "max_length-neg",
        "reward-max_length-0",
        "mixture-typo",
        "max_kl-neg",
        "min_eos_share-2",
    ],
)
def test_bad_config_values_are_named_when_parsed(types, values, match: str, tmp_path: Path) -> None:
    config = {
        "model_name_or_path": "models/tiny-gpt2",
        "dataset_name": "data/tiny/sft.jsonl",
        "output_dir": str(tmp_path / "run"),
        "report_to": "none",
        **values,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=match):
        parse_args(*types, args=["--config", str(path)])
    assert not (tmp_path / "run").exists()


def test_output_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    existing = tmp_path / "notes.txt"
    existing.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"output_dir: .*notes\.txt is an existing file, not a folder"):
        parse_args(*SFT_TYPES, args=["--model_name_or_path", "x", "--output_dir", str(existing)])
    assert existing.read_text() == "not a folder"


def test_mistyped_local_model_path_is_named_not_sent_to_the_hub(
    files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sft"
    data = DataArguments(dataset_name=str(files["sft"]), eval_fraction=0)
    with pytest.raises(
        FileNotFoundError, match=r"models/tiny-typo: no such folder \(models/ is a local folder"
    ):
        run_sft(sft_args(out), data, ModelArguments(model_name_or_path="models/tiny-typo"))
    assert not_finished(out)


# --- lengths: max_length against the model's context, dropped and cut SFT rows -----------------------


def test_sft_max_length_above_the_model_context(tiny_model_dir: Path, files, tmp_path: Path) -> None:
    out = tmp_path / "sft"
    data = DataArguments(dataset_name=str(files["sft_longer_than_model"]), eval_fraction=0)
    with pytest.raises(
        ConfigError, match=r"sft: max_length 256 exceeds the model's context \(.*n_positions 128\)"
    ):
        run_sft(sft_args(out, max_length=256), data, ModelArguments(model_name_or_path=str(tiny_model_dir)))
    assert not_finished(out)


def test_reward_max_length_above_the_model_context(tiny_model_dir: Path, files, tmp_path: Path) -> None:
    out = tmp_path / "reward"
    data = DataArguments(
        dataset_name=str(files["comparisons"]), eval_dataset_name=str(files["comparisons_eval"])
    )
    with pytest.raises(
        ConfigError, match=r"reward: max_length 512 exceeds the model's context .*n_positions 128"
    ):
        run_reward(
            reward_args(out, max_length=512), data, ModelArguments(model_name_or_path=str(tiny_model_dir))
        )
    assert not_finished(out)


@pytest.mark.parametrize(
    ("data_key", "max_length", "match"),
    [
        ("sft", 4, r"max_length 4 drops 64 of 64 train rows .*: no row is left"),
        ("sft_half_long", 64, r"max_length 64 drops 20 of 40 train rows .*50% > max_dropped_share 0\.25"),
    ],
    ids=["all-rows-too-long", "half-the-rows-too-long"],
)
def test_sft_refuses_dropping_too_many_rows(
    tiny_model_dir: Path, files, tmp_path: Path, data_key: str, max_length: int, match: str
) -> None:
    out = tmp_path / "sft"
    data = DataArguments(dataset_name=str(files[data_key]), eval_fraction=0)
    with pytest.raises(ConfigError, match=match):
        run_sft(
            sft_args(out, max_length=max_length), data, ModelArguments(model_name_or_path=str(tiny_model_dir))
        )
    assert not_finished(out)


def test_sft_counts_dropped_and_cut_rows(tiny_model_dir: Path, files, tmp_path: Path) -> None:
    out = tmp_path / "sft"
    data = DataArguments(dataset_name=str(files["sft_some_long"]), eval_fraction=0)
    run_sft(
        sft_args(out, max_length=64, max_steps=2),
        data,
        ModelArguments(model_name_or_path=str(tiny_model_dir)),
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["train_rows"], metrics["train_rows_dropped"], metrics["train_rows_truncated"]) == (
        40,
        2,
        2,
    )


# --- non-finite guards ---------------------------------------------------------------------------------


def test_sft_huge_learning_rate_stops_naming_step_and_quantity(
    tiny_model_dir: Path, files, tmp_path: Path
) -> None:
    out = tmp_path / "sft"
    data = DataArguments(dataset_name=str(files["sft"]), eval_fraction=0.1)
    with pytest.raises(RuntimeError, match=r"sft step \d+: (loss|grad_norm) is not finite"):
        run_sft(
            sft_args(out, learning_rate=1e3), data, ModelArguments(model_name_or_path=str(tiny_model_dir))
        )
    assert not_finished(out)


def test_sft_garbage_weights_are_refused(tiny_model_dir: Path, files, tmp_path: Path) -> None:
    broken = garbage_copy(tiny_model_dir, tmp_path / "broken")
    out = tmp_path / "sft"
    data = DataArguments(dataset_name=str(files["sft"]), eval_fraction=0)
    with pytest.raises(RuntimeError, match=r"sft model loaded from .*broken: weight \S+ holds NaN/inf"):
        run_sft(sft_args(out), data, ModelArguments(model_name_or_path=str(broken)))
    assert not_finished(out)


def test_reward_huge_learning_rate_stops_before_normalising(
    tiny_model_dir: Path, files, tmp_path: Path
) -> None:
    out = tmp_path / "reward"
    data = DataArguments(
        dataset_name=str(files["comparisons"]), eval_dataset_name=str(files["comparisons_eval"])
    )
    model = ModelArguments(model_name_or_path=str(tiny_model_dir))
    with pytest.raises(RuntimeError, match=r"reward (step|after step) \d+: \S+ is not finite"):
        run_reward(reward_args(out, learning_rate=1e3), data, model)
    assert not_finished(out)


def test_reward_garbage_weights_are_refused(tiny_model_dir: Path, files, tmp_path: Path) -> None:
    broken = garbage_copy(tiny_model_dir, tmp_path / "broken")
    out = tmp_path / "reward"
    data = DataArguments(
        dataset_name=str(files["comparisons"]), eval_dataset_name=str(files["comparisons_eval"])
    )
    with pytest.raises(RuntimeError, match=r"reward model loaded from .*broken: weight \S+ holds NaN/inf"):
        run_reward(reward_args(out), data, ModelArguments(model_name_or_path=str(broken)))
    assert not_finished(out)


# --- PPO: sanity stops and the context -----------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_folder(sft_folder: Path, files, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA reward model over the SFT run folder, normalised on its eval comparisons."""
    out = tmp_path_factory.mktemp("adv-rm") / "reward"
    return train_reward(
        reward_args(out), lora_args(sft_folder), files["comparisons"], files["comparisons_eval"]
    )


# the shared tiny PPO config at one step: 8 prompts, one mini-batch
ppo_args = partial(
    stage_runs.ppo_args,
    total_episodes=8,
    num_mini_batches=1,
    max_new_tokens=10,
    eval_samples=8,
    sample_steps=0,
)


@pytest.mark.parametrize(
    ("bounds", "match"),
    [
        ({}, r"PPO step 1: end eval KL to the SFT policy is \S+ nats per response, above max_kl 50"),
        ({"max_kl": None}, r"PPO step 1: end eval EOS share is 0\.000 .*below min_eos_share 0\.05"),
    ],
    ids=["max_kl", "min_eos_share"],
)
def test_ppo_one_update_at_a_huge_learning_rate_is_not_marked_finished(
    sft_folder: Path, reward_folder: Path, files, tmp_path: Path, bounds: dict, match: str
) -> None:
    out = tmp_path / "ppo"
    # 64 held-out prompts: enough responses for the EOS share to be judged (ppo.sanity.EOS_MIN_RESPONSES)
    data = DataArguments(dataset_name=str(files["prompts"]), eval_dataset_name=str(files["heldout64"]))
    args = ppo_args(out, reward_folder, learning_rate=1e3, max_new_tokens=24, eval_samples=64, **bounds)
    with pytest.raises(RuntimeError, match=match):
        run_ppo(args, data, ModelArguments(model_name_or_path=str(sft_folder)))
    assert not_finished(out)
    assert not (out / "model.safetensors").exists() and not (out / "adapter_model.safetensors").exists()


def test_ppo_max_new_tokens_above_the_model_context(
    sft_folder: Path, reward_folder: Path, files, tmp_path: Path
) -> None:
    out = tmp_path / "ppo"
    data = DataArguments(dataset_name=str(files["prompts"]), eval_fraction=0)
    with pytest.raises(ConfigError, match=r"ppo: max_new_tokens 200 leaves no room .*n_positions 128"):
        run_ppo(
            ppo_args(out, reward_folder, max_new_tokens=200),
            data,
            ModelArguments(model_name_or_path=str(sft_folder)),
        )
    assert not_finished(out)


# --- eval: prompts longer than the context are skipped and counted -------------------------------------


def eval_args(out: Path, sft: Path, reward: Path, prompts: Path) -> EvalStageConfig:
    return EvalStageConfig(
        output_dir=str(out),
        sft_path=str(sft),
        policy_paths=[str(sft)],
        policy_names=["copy"],
        reward_model_path=str(reward),
        dataset_name=str(prompts),
        max_new_tokens=8,
        batch_size=8,
        greedy=False,
        seed=0,
    )


def test_eval_skips_and_counts_prompts_longer_than_the_context(
    sft_folder: Path, reward_folder: Path, files, tmp_path: Path
) -> None:
    rows = [json.loads(line) for line in files["heldout"].read_text().splitlines()[:4]]
    rows.append({"prompt": f"Write this list in reverse order: {long_text(150)}", "task": "reverse"})
    prompts = write_rows(tmp_path / "prompts.jsonl", rows)
    out = run_eval(eval_args(tmp_path / "eval", sft_folder, reward_folder, prompts))
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["eval_prompts"], metrics["eval_prompts_skipped"]) == (4, 1)


def test_eval_with_no_prompt_in_the_context_is_refused(
    sft_folder: Path, reward_folder: Path, tmp_path: Path
) -> None:
    rows = [{"prompt": f"Write this list in reverse order: {long_text(150, seed=s)}"} for s in range(2)]
    prompts = write_rows(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "eval"
    with pytest.raises(ConfigError, match=r"prompts\.jsonl: none of the 2 prompts fits 120 tokens"):
        run_eval(eval_args(out, sft_folder, reward_folder, prompts))
    assert not_finished(out)
