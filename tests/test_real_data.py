"""Real data through the stages, as a new user brings it: files in the shapes of public data sets (long
multi-turn ShareGPT chats, OpenAssistant-style K-way rankings with long responses, Anthropic HH strings, real
prompts longer than the model's context) given on the command line over the tiny configs.

One LoRA chain (SFT -> reward -> PPO -> eval, then `generate`) runs from a working directory that is not the
repository, with the base model named by a relative path. Its run folders are then loaded from other
directories, one folder moved alone and the whole tree moved, and each card's usage code is executed.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from instruct_tune.cli import main as cli_main
from instruct_tune.config import (
    ConfigError,
    DataArguments,
    EvalStageConfig,
    ModelArguments,
    PPOStageConfig,
    RewardStageConfig,
    SFTStageConfig,
    parse_args,
)
from instruct_tune.data import DataError, load_source
from instruct_tune.generate import generate_file, load_policy
from instruct_tune.models.reward import load_reward_model

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "configs" / "tiny"
TINY_DATA = REPO / "data" / "tiny"
WORDS = ["the", "list", "of", "numbers", "words", "please", "answer", "short", "sort", "reverse", "add", "repeat", "small", "model", "data", "write", "about", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "river", "mountain", "city", "light"]

pytestmark = pytest.mark.slow


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def write_public_files(folder: Path) -> dict[str, Path]:
    """Small files in the shapes of ShareGPT, OpenAssistant rankings, Anthropic HH and a prompt list."""
    rng = random.Random(0)
    files = {name: folder / f"{name}.jsonl" for name in ("sharegpt", "oasst", "hh", "prompts")}
    chats = []
    for i in range(60):
        long = i % 6 == 0  # every sixth chat is far longer than the tiny model's 128 positions
        turns = [{"from": "system", "value": "You are a helpful assistant."}] if i % 3 == 0 else []
        for turn in range(2):
            turns.append({"from": "human", "value": _text(rng, 120 if long and turn == 0 else 5)})
            turns.append({"from": "gpt", "value": _text(rng, 6)})
        chats.append({"id": f"chat{i}", "conversations": turns})
    rankings = []
    for i in range(40):
        responses = [_text(rng, 90 if (i % 5 == 0 and k == 3) else rng.randint(2, 8)) for k in range(4)]
        rankings.append({"prompt": _text(rng, 6), "responses": responses, "ranking": [2, 0, 3, 1]})
    hh = []
    for i in range(30):
        question = _text(rng, 100 if i % 7 == 0 else 6)
        hh.append(
            {
                "chosen": f"\n\nHuman: {question}\n\nAssistant: {_text(rng, 5)}",
                "rejected": f"\n\nHuman: {question}\n\nAssistant: {_text(rng, 7)}",
            }
        )
    prompts = [{"prompt": _text(rng, 150 if i % 4 == 0 else 6)} for i in range(16)]
    for name, rows in (("sharegpt", chats), ("oasst", rankings), ("hh", hh), ("prompts", prompts)):
        files[name].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return files


COMMON = ["--report_to", "none", "--use_cpu", "true", "--seed", "0", "--logging_steps", "1"]
LORA = ["--use_peft", "true", "--lora_r", "8", "--lora_alpha", "16"]


def stage_args(config: str, *flags: str) -> list[str]:
    return ["--config", str(CONFIGS / config), *flags]


@pytest.fixture(scope="module")
def walk(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The LoRA chain run from a work folder (not the repository) with relative paths throughout."""
    from instruct_tune.stages.ppo import run_ppo
    from instruct_tune.stages.reward import run_reward
    from instruct_tune.stages.sft import run_sft

    work = tmp_path_factory.mktemp("walk") / "work"
    (work / "models").mkdir(parents=True)
    shutil.copytree(tiny_model_dir, work / "models" / "tiny")
    files = write_public_files(work)
    pretrain = work / "pretrain.jsonl"
    pretrain.write_text("".join((TINY_DATA / "pretrain.jsonl").read_text().splitlines(keepends=True)[:40]))
    cwd = Path.cwd()
    os.chdir(work)
    try:
        sft = run_sft(
            *parse_args(
                SFTStageConfig,
                DataArguments,
                ModelArguments,
                args=stage_args(
                    "sft.yaml",
                    "--model_name_or_path", "models/tiny",  # two parts: reads like a Hub id from elsewhere
                    "--dataset_name", "sharegpt.jsonl",
                    "--eval_fraction", "0.1",
                    "--output_dir", "outputs/lora/sft",
                    "--max_steps", "4",
                    "--per_device_train_batch_size", "8",
                    "--per_device_eval_batch_size", "8",
                    "--learning_rate", "1e-2",
                    "--save_strategy", "no",
                    "--dataset_num_proc", "1",
                    *LORA,
                    *COMMON,
                ),
            )
        )
        reward = run_reward(
            *parse_args(
                RewardStageConfig,
                DataArguments,
                ModelArguments,
                args=stage_args(
                    "reward.yaml",  # sets dataset_mixture and its own eval set: the flag replaces both
                    "--model_name_or_path", "outputs/lora/sft",
                    "--policy_path", "outputs/lora/sft",
                    "--dataset_name", "oasst.jsonl",
                    "--eval_fraction", "0.2",
                    "--normalization_prompts", "prompts.jsonl",  # a quarter longer than the context
                    "--normalization_samples", "16",
                    "--normalization_max_new_tokens", "8",
                    "--output_dir", "outputs/lora/reward",
                    "--max_steps", "3",
                    "--per_device_train_batch_size", "4",
                    "--per_device_eval_batch_size", "8",
                    "--learning_rate", "1e-2",
                    "--save_strategy", "no",
                    *LORA,
                    *COMMON,
                ),
            )
        )
        ppo_args = parse_args(
            PPOStageConfig,
            DataArguments,
            ModelArguments,
            args=stage_args(
                "ppo.yaml",
                "--model_name_or_path", "outputs/lora/sft",
                "--reward_model_path", "outputs/lora/reward",
                "--dataset_name", "hh.jsonl",
                "--eval_fraction", "0.1",
                "--output_dir", "outputs/lora/ppo",
                "--lora_dropout", "0.05",
                "--total_episodes", "8",
                "--rollout_batch_size", "4",
                "--num_mini_batches", "1",
                "--max_new_tokens", "8",
                "--max_prompt_length", "96",
                "--eval_samples", "0",
                "--ptx_dataset", str(pretrain),
                "--ptx_heldout_rows", "0",
                "--sample_steps", "100",
                "--save_steps", "0",
                *LORA,
                *COMMON,
            ),
        )
        ppo = run_ppo(*ppo_args)
    finally:
        os.chdir(cwd)
    yield {
        "work": work,
        "files": files,
        "sft": work / sft,
        "reward": work / reward,
        "ppo": work / ppo,
        "ppo_model_args": ppo_args[2],
    }


@pytest.fixture(scope="module")
def evaluated(walk: dict) -> Path:
    """The eval stage over the walk's policies, on real prompts, a quarter of them longer than the context."""
    from instruct_tune.stages.eval import run_eval

    cwd = Path.cwd()
    os.chdir(walk["work"])
    pretrain = walk["work"] / "pretrain.jsonl"
    try:
        eval_folder = run_eval(
            *parse_args(
                EvalStageConfig,
                args=stage_args(
                    "eval.yaml",
                    "--sft_path", "outputs/lora/sft",
                    "--policy_paths", "outputs/lora/ppo",
                    "--reward_model_path", "outputs/lora/reward",
                    "--dataset_name", "prompts.jsonl",
                    "--gold_judge", "none",  # real prompts: the tiny task's gold judge cannot read them
                    "--output_dir", "outputs/lora/eval",
                    "--ptx_eval_dataset", str(pretrain),
                    "--ptx_eval_rows", "8",
                    "--max_new_tokens", "8",
                    "--samples_per_prompt", "1",
                    "--batch_size", "8",
                    "--seed", "0",
                ),
            )
        )
    finally:
        os.chdir(cwd)
    return walk["work"] / eval_folder


def config_of(folder: Path) -> dict:
    return yaml.safe_load((folder / "config.yaml").read_text())


INPUT = "Sort 3 1 2. The quick brown fox"


def policy_logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(INPUT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits


def our_logits(folder: Path) -> torch.Tensor:
    return policy_logits(*load_policy(str(folder)))


# --- item 1: a flag that replaces the YAML's training data -------------------------------------------------


def test_dataset_name_flag_replaces_the_yaml_mixture() -> None:
    parsed = parse_args(
        RewardStageConfig, DataArguments, ModelArguments,
        args=stage_args("reward.yaml", "--dataset_name", "oasst.jsonl"),
    )[1]
    assert parsed.dataset_name == "oasst.jsonl" and parsed.dataset_mixture is None


def test_reward_run_trains_on_the_flag_data_and_config_records_it(walk: dict) -> None:
    recorded = config_of(walk["reward"])
    assert recorded["dataset_name"] == "oasst.jsonl" and recorded["dataset_mixture"] is None
    metrics = json.loads((walk["reward"] / "metrics.json").read_text())
    # 8 held-out OpenAssistant prompts, at most 6 pairs each (the tiny eval set has 500 prompts, 3000 pairs)
    assert 0 < metrics["eval_comparisons"] <= 48


def test_dataset_name_and_mixture_together_are_refused() -> None:
    with pytest.raises(ConfigError, match="dataset_name .* and dataset_mixture are both set"):
        DataArguments(dataset_name="a.jsonl", dataset_mixture=[{"path": "b.jsonl"}])


# --- item 2: the eval set goes with the training set --------------------------------------------------------


def test_training_set_flag_drops_the_yaml_eval_set_unless_one_is_given() -> None:
    for config in ("sft.yaml", "reward.yaml", "ppo.yaml"):
        stage = {"sft.yaml": SFTStageConfig, "reward.yaml": RewardStageConfig, "ppo.yaml": PPOStageConfig}[config]
        parsed = parse_args(stage, DataArguments, ModelArguments, args=stage_args(config, "--dataset_name", "x.jsonl"))
        assert parsed[1].eval_dataset_name is None, config
    kept = parse_args(
        SFTStageConfig, DataArguments, ModelArguments,
        args=stage_args("sft.yaml", "--dataset_name", "x.jsonl", "--eval_dataset_name", "y.jsonl"),
    )[1]
    assert kept.eval_dataset_name == "y.jsonl"  # an eval set given with it is used


def test_sft_run_on_a_flag_training_set_evaluates_on_a_split_of_it(walk: dict) -> None:
    recorded = config_of(walk["sft"])
    assert recorded["dataset_name"] == "sharegpt.jsonl" and recorded["eval_dataset_name"] is None
    metrics = json.loads((walk["sft"] / "metrics.json").read_text())
    assert "eval_loss" in metrics
    assert not [key for key in metrics if re.match(r"eval_(add|sort|reverse|repeat)_", key)]  # no tiny-task eval
    card = (walk["sft"] / "README.md").read_text()
    assert "eval set: 0.1 of the training data, held out" in card


# --- item 3: run folders load from anywhere, and after a move ---------------------------------------------


def test_adapter_bases_are_recorded_to_load_from_any_directory(walk: dict) -> None:
    sft_config = json.loads((walk["sft"] / "adapter_config.json").read_text())
    assert sft_config["base_model_name_or_path"] == str((walk["work"] / "models" / "tiny").resolve())
    record = json.loads((walk["sft"] / "base_model.json").read_text())
    assert record["relative_path"] == os.path.join("..", "..", "..", "models", "tiny")
    assert record["hub_id"] is None
    ppo_base = json.loads((walk["ppo"] / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert ppo_base == str(walk["sft"].resolve())


def test_run_folders_load_from_another_directory_and_after_moves(
    walk: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = {name: our_logits(walk[name]) for name in ("sft", "ppo")}
    reward_before = load_reward_model(walk["reward"]).score(["Add 2 and 3."], ["5"])
    monkeypatch.chdir(tmp_path)  # not the work folder the runs were made in
    for name in ("sft", "ppo"):
        torch.testing.assert_close(our_logits(walk[name]), before[name])

    alone = tmp_path / "elsewhere" / "ppo"  # one folder moved: its base is found by its absolute path
    alone.parent.mkdir()
    shutil.move(walk["ppo"], alone)
    try:
        torch.testing.assert_close(our_logits(alone), before["ppo"])
    finally:
        shutil.move(alone, walk["ppo"])

    moved = tmp_path / "moved-work"  # the whole tree moved: bases are found relative to each folder
    shutil.move(walk["work"], moved)
    try:
        lora = moved / "outputs" / "lora"
        for name in ("sft", "ppo"):
            torch.testing.assert_close(our_logits(lora / name), before[name])
        torch.testing.assert_close(load_reward_model(lora / "reward").score(["Add 2 and 3."], ["5"]), reward_before)
    finally:
        shutil.move(moved, walk["work"])


def test_push_warns_that_an_adapter_base_is_a_local_folder(walk: dict, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["push", str(walk["sft"]), "--repo-id", "someone/sft", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and str((walk["work"] / "models" / "tiny").resolve()) in err
    assert "not on the Hub" in err


# --- item 4: each card's usage code loads exactly the trained model -----------------------------------------


def card_code(folder: Path) -> str:
    card = (folder / "README.md").read_text()
    return re.search(r"## Usage\n```python\n(.*?)```", card, re.S).group(1)


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_card_usage_code_gives_the_stage_logits(walk: dict, stage: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(card_code(walk[stage]), namespace)
    torch.testing.assert_close(
        policy_logits(namespace["model"].eval(), namespace["tokenizer"]), our_logits(walk[stage])
    )


def test_reward_card_usage_code_scores_as_the_loader_does(walk: dict, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(card_code(walk["reward"]), namespace)
    want = load_reward_model(walk["reward"]).score(["Add 2 and 3."], ["5"])
    torch.testing.assert_close(namespace["rm"].score(["Add 2 and 3."], ["5"]), want)


def test_pushed_card_usage_code_names_repos_not_local_paths(walk: dict) -> None:
    from huggingface_hub import ModelCard

    from instruct_tune.hub import card_for_upload

    record = walk["sft"] / "hub.json"  # as `instruct-tune push` leaves it once the SFT folder is pushed
    record.write_text(json.dumps({"repo_id": "me/tiny-sft"}))
    try:
        code = re.search(r"```python\n(.*?)```", ModelCard(card_for_upload(walk["ppo"], "me/tiny-ppo").decode()).text, re.S)
    finally:
        record.unlink()
    code = code.group(1)
    assert 'PeftModel.from_pretrained(model, "me/tiny-ppo")' in code
    assert '"me/tiny-sft").merge_and_unload()' in code
    assert str(walk["ppo"].resolve()) not in code and str(walk["sft"].resolve()) not in code


# --- item 5: long prompts in the normalisation are skipped and counted ------------------------------------


def test_normalisation_skips_and_counts_prompts_longer_than_the_context(walk: dict) -> None:
    normalization = json.loads((walk["reward"] / "reward_normalization.json").read_text())
    assert normalization["n"] == 12  # 16 prompts, the 4 of 150 words skipped
    assert "(4 longer prompts skipped)" in normalization["source"]


def test_resumed_reward_run_reports_the_whole_run(walk: dict) -> None:
    from instruct_tune.stages.train_metrics import whole_run_metrics

    history = json.loads((walk["sft"] / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    resumed = whole_run_metrics({"train_loss": 0.0, "train_runtime": 0.1}, history, resumed=True)
    assert resumed["train_loss"] == pytest.approx(sum(losses) / len(losses))  # logging_steps 1: one per step
    assert resumed["train_runtime"] == 0.1


def test_reward_rerun_after_a_crash_past_training_reports_the_whole_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Killed after its last checkpoint (here: its finished files removed), a rerun resumes at the end and
    trains no step: its metrics are still those of the whole run, not `train_loss: 0.0` without accuracy."""
    from instruct_tune.stages.reward import run_reward

    rows = (TINY_DATA / "comparisons.jsonl").read_text().splitlines(keepends=True)[:24]
    (tmp_path / "cmp.jsonl").write_text("".join(rows))
    out = tmp_path / "reward"

    def run() -> dict:
        run_reward(
            RewardStageConfig(
                output_dir=str(out), max_steps=3, save_strategy="steps", save_steps=3, logging_steps=1,
                per_device_train_batch_size=4, learning_rate=3e-3, max_length=128, report_to=[], use_cpu=True,
                disable_tqdm=True, seed=0, normalization_samples=8,
            ),
            DataArguments(dataset_name=str(tmp_path / "cmp.jsonl"), eval_fraction=0.25),
            ModelArguments(model_name_or_path=str(tiny_model_dir)),
        )
        return json.loads((out / "metrics.json").read_text())

    first = run()
    (out / "reward_normalization.json").unlink()
    (out / "metrics.json").unlink()
    again = run()
    assert again["train_loss"] == pytest.approx(first["train_loss"], abs=1e-3) and again["train_loss"] > 0
    state = json.loads((out / "trainer_state.json").read_text())  # no step past max_steps (transformers 5
    # trains one more after resuming from the last checkpoint)
    assert state["global_step"] == 3 and [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3]
    for key in ("eval_accuracy", "eval_margin", "reward_bias"):  # the same model: the checkpoint's weights
        assert again[key] == pytest.approx(first[key], abs=1e-5), key


# --- item 6: the smaller ones ------------------------------------------------------------------------------


def test_hh_error_names_the_row_its_numbering_and_the_way_out(tmp_path: Path) -> None:
    path = tmp_path / "hh.jsonl"
    good = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Go"}
    bad = {"chosen": "\n\nHuman: Hi\n\nAssistant:", "rejected": "\n\nHuman: Hi\n\nAssistant: Go"}
    path.write_text("".join(json.dumps(row) + "\n" for row in (good, bad, good)))
    from instruct_tune.stages.data_sources import train_eval_sets

    with pytest.raises(DataError) as caught:  # as a stage reads its data
        train_eval_sets(DataArguments(dataset_name=str(path), eval_fraction=0.0), "preference", seed=0)
    message = str(caught.value)
    assert f"{path}: row 2" in message and "rows count from 1" in message
    assert f"instruct-tune data check {path} --kind preference" in message and "skip_invalid: true" in message


def test_no_comparison_fits_names_the_eval_set(tiny_model_dir: Path) -> None:
    from datasets import Dataset

    from instruct_tune.data.preference_groups import group_comparisons, tokenize_groups
    from instruct_tune.models import load_tokenizer

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model_dir)))
    pairs, _ = load_source(str(TINY_DATA / "comparisons_eval.jsonl"), "preference")
    groups = group_comparisons(Dataset.from_dict(pairs[:12]))
    with pytest.raises(ConfigError, match=r"eval set: no comparison fits in max_length=4 tokens"):
        tokenize_groups(groups, tokenizer, 4, "eval")


def test_lora_reward_model_loads_without_a_missing_head_report(walk: dict, capfd: pytest.CaptureFixture) -> None:
    capfd.readouterr()
    load_reward_model(walk["reward"])
    captured = capfd.readouterr()
    assert "MISSING" not in captured.err + captured.out and "newly initialized" not in captured.err + captured.out


def test_config_yaml_records_the_lora_dropout_ppo_ran_with(walk: dict) -> None:
    assert walk["ppo_model_args"].lora_dropout == 0.0
    assert config_of(walk["ppo"])["lora_dropout"] == 0.0


def test_qlora_card_says_the_base_was_4_bit(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    from instruct_tune.artifacts import write_model_card

    path = write_model_card(
        tmp_path, stage="sft", base_model="gpt2", is_adapter=True,
        config={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "use_peft": True},
    )
    card = ModelCard.load(path)
    assert "4-bit" in card.data.tags and "qlora" in card.data.tags
    assert "trained as QLoRA on the base loaded in 4-bit (nf4" in card.text


def test_readme_says_how_to_build_a_tiny_model_with_a_longer_context() -> None:
    readme = (REPO / "README.md").read_text()
    assert "build-tiny --out models/tiny-1k --n_positions 1024" in readme


# --- the rest of the walk: eval and generate on real prompts ------------------------------------------------


def test_eval_and_generate_on_prompts_longer_than_the_context(
    walk: dict, evaluated: Path, tmp_path: Path, monkeypatch
) -> None:
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert metrics["eval_prompts"] == 12  # 16 prompts, the 4 longer than the context skipped
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "answers.jsonl"
    n = generate_file(str(walk["ppo"]), walk["files"]["prompts"], out, max_new_tokens=8, temperature=0.0)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert n == len(rows) == 16 and all(isinstance(row["response"], str) for row in rows)
