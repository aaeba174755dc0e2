"""The DPO stage on the tiny model: pairs from rankings, full and LoRA runs and their folders, DDP, bad options."""

from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path

import pytest
import torch
import yaml
from helpers import DDP_CPU, REPO, TINY_DATA, accelerate_launch, assert_resolved_as_written, head_of

from instruct_tune.config.arguments import DataArguments, ModelArguments
from instruct_tune.config.dpo import DPOStageConfig
from instruct_tune.config.errors import ConfigError
from instruct_tune.config.parsing import parse_args, resolved_config
from instruct_tune.data.dpo_pairs import dpo_rows
from instruct_tune.data.preference_groups import group_comparisons
from instruct_tune.models import load_model, load_tokenizer
from instruct_tune.stages import dpo as dpo_stage
from instruct_tune.stages.data_sources import train_eval_sets
from instruct_tune.stages.guards import NonFiniteGuard
from instruct_tune.stages.run_folder import RunFolderArguments

DPO_TYPES = (DPOStageConfig, DataArguments, ModelArguments, RunFolderArguments)
RESPONSES = ["second", "fourth", "first", "third"]
RANKING = [2, 0, 3, 1]  # best first: first > second > third > fourth
PROMPT = "Sort these numbers in ascending order: 3, 1, 2"


def dpo_args(output_dir: Path, **overrides) -> DPOStageConfig:
    """A few CPU steps of 8 pairs, no saving; `overrides` replace any value."""
    values = dict(
        output_dir=str(output_dir),
        max_steps=3,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=32,
        learning_rate=1e-3,
        beta=0.1,
        max_length=128,
        gradient_checkpointing=False,
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    return DPOStageConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def ranking_data(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    """A mixture of one K=4 ranking and one plain chosen/rejected pair (one format a file)."""
    folder = tmp_path_factory.mktemp("dpo-data")
    rows = {
        "ranking": {"prompt": PROMPT, "responses": RESPONSES, "ranking": RANKING},
        "pair": {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"},
    }
    for name, row in rows.items():
        (folder / f"{name}.jsonl").write_text(json.dumps(row) + "\n")
    return [{"path": str(folder / f"{name}.jsonl")} for name in rows]


@pytest.fixture(scope="module")
def comparisons(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """8 training and 4 eval rankings of the tiny task (K=4: 48 and 24 pairs)."""
    folder = tmp_path_factory.mktemp("dpo-comparisons")
    train = head_of(TINY_DATA / "comparisons.jsonl", folder / "train.jsonl", 8)
    return train, head_of(TINY_DATA / "comparisons_eval.jsonl", folder / "eval.jsonl", 4)


# --- pairs from rankings --------------------------------------------------------------------------------


def _pairs(rows) -> list[tuple[str, str, str]]:
    return sorted(
        (row["prompt"][-1]["content"], row["chosen"][0]["content"], row["rejected"][0]["content"])
        for row in rows
    )


@pytest.mark.parametrize("rule", ["all", "best"])
def test_ranking_pairs_follow_the_rule(ranking_data: list[dict[str, str]], rule: str) -> None:
    data = DataArguments(dataset_mixture=ranking_data, eval_fraction=0.0)
    pairs, _ = train_eval_sets(data, "preference", seed=0)
    rows = dpo_rows(group_comparisons(pairs), rule)
    order = [RESPONSES[i] for i in RANKING]  # ["first", "second", "third", "fourth"]
    ranked = combinations(order, 2) if rule == "all" else ((order[0], other) for other in order[1:])
    expected = [(PROMPT, win, lose) for win, lose in ranked] + [("What is 2 + 2?", "4", "5")]
    assert _pairs(rows) == sorted(expected)
    assert len(rows) == (6 if rule == "all" else 3) + 1
    for row in rows:  # conversational, so TRL applies the policy's chat template
        assert row["prompt"] == [{"role": "user", "content": row["prompt"][0]["content"]}]
        assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["assistant"]


def test_eval_set_keeps_every_pair(ranking_data: list[dict[str, str]]) -> None:
    data = DataArguments(dataset_mixture=ranking_data, eval_dataset_name=ranking_data[0]["path"])
    train, eval_set = dpo_stage.dpo_datasets(data, seed=0, rule="best")
    assert (len(train), len(eval_set)) == (3 + 1, 6)


# --- options ----------------------------------------------------------------------------------------------


def test_bad_pair_rule_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dpo_pairs: 'some' is not one of all, best"):
        dpo_args(tmp_path, dpo_pairs="some")
    config = tmp_path / "dpo.yaml"
    config.write_text(
        yaml.safe_dump({"output_dir": str(tmp_path / "out"), "dpo_pairs": "some", "use_cpu": True})
    )
    with pytest.raises(ConfigError, match="dpo_pairs"):
        parse_args(*DPO_TYPES, args=["--config", str(config)])
    with pytest.raises(ConfigError, match="beta"):
        dpo_args(tmp_path, beta=0.0)


@pytest.mark.parametrize("setup", ["tiny", "smollm2"])
def test_dpo_config_parses(setup: str, tmp_path: Path) -> None:
    path = REPO / "recipes" / "configs" / setup / "dpo.yaml"
    parsed = parse_args(*DPO_TYPES, args=["--config", str(path), "--output_dir", str(tmp_path)])
    assert_resolved_as_written(yaml.safe_load(path.read_text()), resolved_config(*parsed))


# --- training runs and their folders ----------------------------------------------------------------------


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def _train(monkeypatch, training: DPOStageConfig, data: DataArguments, model: ModelArguments):
    """Run the stage, keeping its trainer to compare the saved model with the trained one."""
    trainers = []

    class Kept(dpo_stage.GuardedDPOTrainer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            trainers.append(self)

    monkeypatch.setattr(dpo_stage, "GuardedDPOTrainer", Kept)
    return dpo_stage.run_dpo(training, data, model), trainers[0]


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_trains_and_writes_a_run_folder(
    lora: bool, tiny_model_dir: Path, sft_folder: Path, comparisons, tmp_path: Path, monkeypatch
) -> None:
    start = sft_folder if lora else tiny_model_dir  # LoRA: a new adapter on an SFT adapter's chain
    model_args = ModelArguments(model_name_or_path=str(start), use_peft=lora, lora_r=8, lora_alpha=16)
    data = DataArguments(dataset_name=str(comparisons[0]), eval_dataset_name=str(comparisons[1]))
    run_dir, trainer = _train(monkeypatch, dpo_args(tmp_path / "dpo"), data, model_args)

    assert run_dir == tmp_path / "dpo"
    assert isinstance(trainer, NonFiniteGuard) and trainer.guard_stage == "dpo"
    weights = (
        ["adapter_config.json", "adapter_model.safetensors"] if lora else ["config.json", "model.safetensors"]
    )
    for name in (
        *weights,
        "tokenizer.json",
        "tokenizer_config.json",
        "config.yaml",
        "metrics.json",
        "README.md",
    ):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "ref").exists()  # no second adapter copy: the reference is the adapter disabled
    card = (run_dir / "README.md").read_text()
    assert f"SFT policy: `{start}`" in card and "initialised from" not in card  # the start named once
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["train_pairs"], metrics["eval_pairs"], metrics["train_pairs_dropped"]) == (48, 24, 0)
    for key in ("train_loss", "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"):
        assert math.isfinite(metrics[key]), key
    assert any(key.endswith("_rewards/accuracies") and key != "eval_rewards/accuracies" for key in metrics)
    assert json.loads((run_dir / "trainer_state.json").read_text())["global_step"] == 3

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(run_dir)))
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    loaded = load_model(ModelArguments(model_name_or_path=str(run_dir)), tokenizer)
    trained = trainer.accelerator.unwrap_model(trainer.model)
    torch.testing.assert_close(_logits(loaded, ids), _logits(trained, ids), rtol=1e-5, atol=1e-5)

    sft = load_model(ModelArguments(model_name_or_path=str(start)), tokenizer)
    assert not torch.allclose(_logits(loaded, ids), _logits(sft, ids), atol=1e-4)  # trained away from SFT
    if lora:  # the reference: the trained model with its adapter off is the SFT policy
        with trained.disable_adapter():
            torch.testing.assert_close(_logits(trained, ids), _logits(sft, ids), rtol=1e-5, atol=1e-5)
    else:  # the reference: a frozen copy of the SFT policy
        reference = trainer.accelerator.unwrap_model(trainer.ref_model)
        torch.testing.assert_close(_logits(reference, ids), _logits(sft, ids), rtol=1e-5, atol=1e-5)


# --- multi-process ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_accelerate_launch_two_processes(tiny_model_dir: Path, comparisons, tmp_path: Path) -> None:
    output_dir = tmp_path / "runs" / "dpo"
    config = tmp_path / "dpo.yaml"
    values = {
        "model_name_or_path": str(tiny_model_dir),
        "use_peft": False,
        "dataset_name": str(comparisons[0]),
        "eval_dataset_name": str(comparisons[1]),
        "output_dir": str(output_dir),
        "num_train_epochs": 1,
        "per_device_train_batch_size": 8,
        "learning_rate": 1.0e-3,
        "max_length": 128,
        "gradient_checkpointing": False,
        "logging_steps": 1,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 0,
    }
    config.write_text(yaml.safe_dump(values))
    accelerate_launch(DDP_CPU, "recipes/dpo.py", ["--config", str(config), "--use_cpu", "true"])

    assert [p.name for p in output_dir.parent.iterdir()] == ["dpo"]
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 48 // (2 * 8)  # 2 ranks share the 48 pairs
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_rewards/accuracies"])
    model_args = ModelArguments(model_name_or_path=str(output_dir))
    model = load_model(model_args, load_tokenizer(model_args))
    assert all(torch.isfinite(p).all() for p in model.parameters())
