"""The SFT stage end to end on the tiny model: run folder, losses, completion-only labels, full/QLoRA, resume, DDP."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTTrainer

from instruct_tune.config import ConfigError, DataArguments, ModelArguments, SFTStageConfig, parse_args
from instruct_tune.data.row_packing import REAL_TOKENS, RowPackedCollator, repack_batch, row_position_ids
from instruct_tune.models import DEFAULT_CHAT_TEMPLATE, load_model, load_tokenizer
from instruct_tune.stages.runner import checkpoint_to_resume
from instruct_tune.stages.sft import run_sft, sft_datasets

REPO = Path(__file__).resolve().parents[1]
SFT_TYPES = (SFTStageConfig, DataArguments, ModelArguments)
TASKS = ("add", "repeat", "reverse", "sort")
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle")


def sft_args(output_dir: Path, **overrides) -> SFTStageConfig:
    """A small, fast CPU configuration; `overrides` replace any of its values."""
    values = dict(
        output_dir=str(output_dir),
        max_steps=15,
        per_device_train_batch_size=8,
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
        packing=False,
        gradient_checkpointing=False,
        use_cpu=True,
        seed=0,
    )
    values.update(overrides)
    return SFTStageConfig(**values)


def lora_args(model_dir: Path, **overrides) -> ModelArguments:
    return ModelArguments(
        model_name_or_path=str(model_dir),
        use_peft=True,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        **overrides,
    )


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def losses(state: dict) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def assert_finite_number(value: object, name: str) -> None:
    assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{name}={value!r}"
    assert math.isfinite(value), f"{name}={value!r}"


# --- LoRA SFT run and its folder -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir: Path, tiny_sft_file: Path, tmp_path_factory: pytest.TempPathFactory):
    """One 15-step LoRA SFT run with a held-out eval share and per-task metrics."""
    training = sft_args(tmp_path_factory.mktemp("lora") / "sft")
    data = DataArguments(dataset_name=str(tiny_sft_file), eval_fraction=0.1, per_task_metrics=True)
    model = lora_args(tiny_model_dir)
    run_dir = run_sft(training, data, model)
    return run_dir, training, data, model


@pytest.mark.slow
def test_lora_run_folder_holds_every_artifact(lora_run) -> None:
    run_dir, training, _, _ = lora_run
    assert run_dir == Path(training.output_dir)
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "config.yaml",
        "metrics.json",
        "trainer_state.json",
    ):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "model.safetensors").exists()  # an adapter run stores only the adapter

    # the chat template travels with the tokenizer (inline or as chat_template.jinja)
    inline = read_json(run_dir / "tokenizer_config.json").get("chat_template")
    jinja = run_dir / "chat_template.jinja"
    assert inline == DEFAULT_CHAT_TEMPLATE or (jinja.is_file() and jinja.read_text() == DEFAULT_CHAT_TEMPLATE)
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id

    pickles = [p.name for pattern in PICKLE_PATTERNS for p in run_dir.glob(pattern)]
    assert pickles == []

    state = read_json(run_dir / "trainer_state.json")
    assert state["global_step"] == 15


@pytest.mark.slow
def test_lora_run_model_card_and_config(lora_run, tiny_model_dir: Path) -> None:
    run_dir, training, data, model = lora_run
    card = ModelCard.load(run_dir / "README.md")
    assert card.data.library_name == "peft"
    assert "sft" in card.data.tags
    assert "lora" in card.data.tags
    assert card.data.pipeline_tag == "text-generation"
    assert str(tiny_model_dir) in card.text  # the base model is named in the body

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert "hub_token" not in saved
    training2, data2, model2 = parse_args(*SFT_TYPES, args=["--config", str(run_dir / "config.yaml")])
    assert training2.output_dir == training.output_dir
    assert training2.max_steps == 15
    assert training2.learning_rate == pytest.approx(training.learning_rate)
    assert data2.dataset_name == data.dataset_name
    assert data2.eval_fraction == pytest.approx(0.1)
    assert model2.model_name_or_path == model.model_name_or_path
    assert (model2.use_peft, model2.lora_r, model2.lora_alpha) == (True, 8, 16)


@pytest.mark.slow
def test_lora_run_metrics_and_learning(lora_run) -> None:
    run_dir, _, _, _ = lora_run
    metrics = read_json(run_dir / "metrics.json")
    assert_finite_number(metrics["train_loss"], "train_loss")
    assert_finite_number(metrics["eval_loss"], "eval_loss")

    logged = losses(read_json(run_dir / "trainer_state.json"))
    assert sorted(logged) == [5, 10, 15]
    assert logged[15] < logged[5], logged

    # LoRA B matrices start at zero: every one of them was trained
    weights = load_file(run_dir / "adapter_model.safetensors")
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert len(lora_b) == 4 * 2  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of the 2 blocks
    for key, tensor in lora_b.items():
        assert torch.isfinite(tensor).all(), key
        assert tensor.abs().max() > 0, key


@pytest.mark.slow
def test_lora_run_per_task_eval_losses(lora_run) -> None:
    run_dir, training, data, _ = lora_run
    metrics = read_json(run_dir / "metrics.json")
    for task in TASKS:
        assert_finite_number(metrics[f"eval_{task}_loss"], f"eval_{task}_loss")
    assert len({metrics[f"eval_{task}_loss"] for task in TASKS}) == len(TASKS)


@pytest.mark.slow
def test_per_task_losses_match_an_independent_computation(lora_run, tiny_model_dir: Path) -> None:
    """eval_<task>_loss is the completion-token cross-entropy of that task's held-out rows under the saved model."""
    run_dir, training, data, _ = lora_run
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir).eval()
    _, eval_set = sft_datasets(data, seed=training.seed, completion_only=True)
    assert len(eval_set) <= training.per_device_eval_batch_size  # one batch: the loss is a plain token mean

    totals: dict[str, list[float]] = {}
    for row in eval_set:
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True)["input_ids"]
        full = tokenizer.apply_chat_template(row["prompt"] + row["completion"])["input_ids"]
        ids = torch.tensor([full])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        targets = ids[0, 1:].clone()
        targets[: len(prompt) - 1] = -100
        loss_sum = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
        total = totals.setdefault(row["task"], [0.0, 0])
        total[0] += loss_sum.item()
        total[1] += int((targets != -100).sum())

    metrics = read_json(run_dir / "metrics.json")
    assert sorted(totals) == list(TASKS)
    for task, (loss_sum, count) in totals.items():
        assert metrics[f"eval_{task}_loss"] == pytest.approx(loss_sum / count, rel=1e-3), task
    overall = sum(t[0] for t in totals.values()) / sum(t[1] for t in totals.values())
    assert metrics["eval_loss"] == pytest.approx(overall, rel=1e-3)


@pytest.mark.slow
def test_lora_run_generates_with_peft(lora_run, tiny_model_dir: Path) -> None:
    run_dir, _, _, _ = lora_run
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir).eval()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 30?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    prompt_len = inputs["input_ids"].shape[1]
    new = out[0, prompt_len:]
    assert 1 <= len(new) <= 20
    assert out[0, :prompt_len].tolist() == inputs["input_ids"][0].tolist()
    assert isinstance(tokenizer.decode(new, skip_special_tokens=True), str)


# --- completion-only labels ----------------------------------------------------------------------------


def test_completion_only_labels(tiny_model_dir: Path, tiny_sft_file: Path, tmp_path: Path) -> None:
    """Built as run_sft builds its trainer: prompt tokens are masked, completion tokens and EOS are trained."""
    training = sft_args(tmp_path / "sft", max_steps=1)
    data = DataArguments(dataset_name=str(tiny_sft_file), eval_fraction=0.1, max_train_samples=40)
    model_args = lora_args(tiny_model_dir)
    tokenizer = load_tokenizer(model_args)
    train, eval_set = sft_datasets(data, seed=training.seed, completion_only=True)
    assert {"prompt", "completion"} <= set(train.column_names)
    model = load_model(model_args, tokenizer)
    trainer = SFTTrainer(
        model=model, args=training, train_dataset=train, eval_dataset=eval_set, processing_class=tokenizer
    )
    prepared = trainer.train_dataset
    assert len(prepared) == 40
    eos = tokenizer.eos_token_id
    for row in prepared:
        ids, labels = row["input_ids"], row["labels"]
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True)["input_ids"]
        full = tokenizer.apply_chat_template(row["prompt"] + row["completion"])["input_ids"]
        assert ids == full
        n = len(prompt)
        assert ids[:n] == prompt
        assert labels[:n] == [-100] * n
        assert labels[n:] == ids[n:]
        assert len(labels) > n
        assert labels[-1] == eos
        assert tokenizer.decode(ids[n:]) == row["completion"][0]["content"] + tokenizer.eos_token

    # the collator pads with the pad token, masks the padding, and keeps the (distinct) EOS as a target
    batch = trainer.data_collator([prepared[i] for i in range(8)])
    pad = batch["attention_mask"] == 0
    assert pad.any()
    assert (batch["input_ids"][pad] == tokenizer.pad_token_id).all()
    assert (batch["labels"][pad] == -100).all()
    assert ((batch["labels"] == eos).sum(dim=1) == 1).all()


# --- full fine-tuning ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_finetuning_writes_full_weights(
    tiny_model_dir: Path, tiny_sft_file: Path, tmp_path: Path
) -> None:
    training = sft_args(tmp_path / "full", max_steps=5, learning_rate=1e-3)
    data = DataArguments(dataset_name=str(tiny_sft_file), eval_fraction=0.05, per_task_metrics=False)
    model = ModelArguments(model_name_or_path=str(tiny_model_dir))
    run_dir = run_sft(training, data, model)

    assert (run_dir / "model.safetensors").is_file()
    assert not (run_dir / "adapter_config.json").exists()
    assert not (run_dir / "adapter_model.safetensors").exists()
    assert [p.name for pattern in PICKLE_PATTERNS for p in run_dir.glob(pattern)] == []
    assert ModelCard.load(run_dir / "README.md").data.library_name == "transformers"

    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(run_dir / "model.safetensors")
    assert set(after) == set(before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "transformer.h.0.attn.c_attn.weight" in changed
    assert len(changed) > len(before) // 2
    assert all(torch.isfinite(t).all() for t in after.values())

    metrics = read_json(run_dir / "metrics.json")
    assert_finite_number(metrics["eval_loss"], "eval_loss")
    assert not [k for k in metrics if k.startswith(tuple(f"eval_{t}_" for t in TASKS))]  # per-task off

    reloaded = AutoModelForCausalLM.from_pretrained(run_dir)
    assert reloaded.config.pad_token_id == AutoTokenizer.from_pretrained(run_dir).pad_token_id


# --- QLoRA ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_qlora_sft_writes_a_trained_adapter(
    tiny_model_dir: Path, tiny_sft_file: Path, tmp_path: Path
) -> None:
    # with gradient checkpointing, as QLoRA is mostly run (prepare_model_for_kbit_training path)
    training = sft_args(tmp_path / "qlora", max_steps=5, gradient_checkpointing=True)
    data = DataArguments(dataset_name=str(tiny_sft_file), eval_fraction=0.05, per_task_metrics=False)
    model = lora_args(tiny_model_dir, load_in_4bit=True)
    run_dir = run_sft(training, data, model)

    assert (run_dir / "adapter_config.json").is_file()
    weights = load_file(run_dir / "adapter_model.safetensors")
    assert weights
    for key, tensor in weights.items():
        assert torch.isfinite(tensor.float()).all(), key
    lora_b = [t for k, t in weights.items() if "lora_B" in k]
    assert len(lora_b) == 8
    assert all(t.float().abs().max() > 0 for t in lora_b)
    assert_finite_number(read_json(run_dir / "metrics.json")["eval_loss"], "eval_loss")

    # the adapter also loads onto the unquantised base
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir
    ).eval()
    with torch.no_grad():
        logits = peft_model(**tokenizer(["What is 2 + 3?"], return_tensors="pt")).logits
    assert torch.isfinite(logits).all()


# --- resume --------------------------------------------------------------------------------------------


def test_checkpoint_to_resume_choices(tmp_path: Path) -> None:
    assert checkpoint_to_resume(str(tmp_path / "missing"), None) is None
    assert checkpoint_to_resume(str(tmp_path), None) is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint_to_resume(str(tmp_path), "last")
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        checkpoint_to_resume(str(tmp_path), str(tmp_path / "checkpoint-9"))
    for step in (3, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert checkpoint_to_resume(str(tmp_path), None) == str(tmp_path / "checkpoint-12")
    assert checkpoint_to_resume(str(tmp_path), "true") == str(tmp_path / "checkpoint-12")
    assert checkpoint_to_resume(str(tmp_path), str(tmp_path / "checkpoint-3")) == str(
        tmp_path / "checkpoint-3"
    )


@pytest.mark.slow
def test_second_run_resumes_from_the_checkpoint(
    tiny_model_dir: Path, tiny_sft_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sft"
    lr = 2e-3
    data = DataArguments(dataset_name=str(tiny_sft_file), eval_fraction=0.0)
    common = dict(learning_rate=lr, logging_steps=1, save_strategy="steps", save_steps=5)

    run_sft(sft_args(out, max_steps=5, **common), data, lora_args(tiny_model_dir))
    first = read_json(out / "trainer_state.json")
    assert first["global_step"] == 5
    assert (out / "checkpoint-5").is_dir()
    assert checkpoint_to_resume(str(out), None) == str(out / "checkpoint-5")

    run_sft(sft_args(out, max_steps=10, **common), data, lora_args(tiny_model_dir))
    second = read_json(out / "trainer_state.json")
    assert second["global_step"] == 10
    assert (out / "checkpoint-10").is_dir()
    steps = [entry["step"] for entry in second["log_history"] if "loss" in entry]
    assert steps == list(range(1, 11))

    # steps 1-5 were not trained again: their log entries are those of the first run, whose linear schedule
    # decayed over 5 steps (a fresh 10-step run would log lr * (1 - 4/10) at step 5, not lr * (1 - 4/5))
    entries = {e["step"]: e for e in second["log_history"] if "loss" in e}
    for entry in first["log_history"]:
        if "loss" in entry:
            assert entries[entry["step"]] == entry
    assert entries[5]["learning_rate"] == pytest.approx(lr * (1 - 4 / 5))
    assert all(math.isfinite(entries[s]["loss"]) for s in range(6, 11))


# --- multi-process -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_accelerate_launch_two_processes(tiny_model_dir: Path, tiny_sft_file: Path, tmp_path: Path) -> None:
    rows, batch = 96, 8
    runs = tmp_path / "runs"
    config = tmp_path / "sft.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(tiny_model_dir),
                "use_peft": True,
                "lora_r": 8,
                "lora_alpha": 16,
                "dataset_name": str(tiny_sft_file),
                "eval_fraction": 0.0,
                "max_train_samples": 1000,  # overridden by a flag below
                "output_dir": str(runs / "sft"),
                "num_train_epochs": 1,
                "per_device_train_batch_size": batch,
                "learning_rate": 2.0e-3,
                "max_length": 128,
                "packing": False,
                "logging_steps": 1,
                "eval_strategy": "no",
                "save_strategy": "no",
                "report_to": "none",
                "disable_tqdm": True,
                "seed": 0,
            }
        )
    )
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [
        str(accelerate),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "recipes/sft.py",
        "--config",
        str(config),
        "--use_cpu",
        "true",
        "--max_train_samples",
        str(rows),
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    assert [p.name for p in runs.iterdir()] == ["sft"]  # one run folder, written once
    run_dir = runs / "sft"
    assert (run_dir / "adapter_config.json").is_file()
    assert (run_dir / "adapter_model.safetensors").is_file()
    assert (run_dir / "config.yaml").is_file()
    assert not list(run_dir.glob("checkpoint-*"))

    # one epoch over 96 rows at 8 per device: 12 steps in one process, 6 when 2 ranks share the epoch
    state = read_json(run_dir / "trainer_state.json")
    assert state["global_step"] == math.ceil(rows / (2 * batch)) == math.ceil(rows / batch) // 2
    assert state["epoch"] == pytest.approx(1.0)
    assert_finite_number(read_json(run_dir / "metrics.json")["train_loss"], "train_loss")


# --- packing in separate rows --------------------------------------------------------------------------


def test_row_packed_collator_positions_labels_and_count() -> None:
    batch = RowPackedCollator(pad_token_id=0)(
        [
            {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "seq_lengths": [3, 2]},
            {"input_ids": [3, 4], "labels": [3, 4], "seq_lengths": [2]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [3, 4, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    # first token of each chat and all padding never count as targets
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 4, -100, -100, -100]]
    assert batch[REAL_TOKENS].item() == 7 and "attention_mask" not in batch
    with pytest.raises(ValueError, match="does not fit"):
        row_position_ids([3, 4], 6)


def test_rows_keep_chats_apart(tiny_model_dir: Path) -> None:
    """A chat packed behind another gets exactly the logits it gets alone: no attention across chats."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    first, second = torch.arange(3, 12), torch.arange(20, 27)
    batch = RowPackedCollator(pad_token_id=0)(
        [{"input_ids": torch.cat([first, second]).tolist(), "seq_lengths": [9, 7]}, {"input_ids": [1, 2, 3]}]
    )
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        alone = model(input_ids=second[None]).logits
        # the same row with one 2D mask (what wrapped packing does) lets the second chat see the first
        mixed = model(input_ids=batch["input_ids"][:1], attention_mask=torch.ones(1, 16, dtype=torch.long)).logits
    torch.testing.assert_close(packed[0, 9:16], alone[0], atol=1e-5, rtol=1e-5)
    assert (mixed[0, 9:16] - alone[0]).abs().max() > 1e-2


def test_sft_packing_per_row(tiny_model_dir: Path, tiny_sft_file: Path, tmp_path: Path) -> None:
    """bfd rows train and evaluate; num_tokens counts every real token of the packed rows."""
    training = sft_args(
        tmp_path / "rows", max_steps=6, packing=True, packing_strategy="bfd", packing_per_row=True
    )
    data = DataArguments(dataset_name=str(tiny_sft_file), eval_fraction=0.1, per_task_metrics=True)
    run_dir = run_sft(training, data, ModelArguments(model_name_or_path=str(tiny_model_dir)))
    metrics, state = read_json(run_dir / "metrics.json"), read_json(run_dir / "trainer_state.json")
    assert_finite_number(metrics["eval_loss"], "eval_loss")
    assert all(f"eval_{t}_loss" in metrics for t in TASKS)
    # 6 steps x 8 rows of up to 128 tokens: far more than 6 x 128 (what TRL's flat-row count would give)
    tokens = max(entry.get("num_tokens", 0) for entry in state["log_history"])
    assert 6 * 8 * 60 < tokens <= 6 * 8 * 128
    with pytest.raises(ConfigError, match="packing_per_row"):
        sft_args(tmp_path / "bad", packing=False, packing_per_row=True)


def test_repack_batch_lays_chats_side_by_side() -> None:
    rows = repack_batch(
        [
            {"input_ids": [1, 2, 3, 4, 5, 6], "labels": [-100, -100, 3, 4, 5, 6]},
            {"input_ids": [7, 8], "labels": [-100, 8]},
            {"input_ids": [9, 10, 11, 12], "labels": [-100, 10, 11, 12]},
            {"input_ids": [13, 14], "labels": [13, 14]},
        ]
    )
    # Rows as wide as the longest chat (6), longest first, each chat into the first row with room.
    assert [r["seq_lengths"] for r in rows] == [[6], [4, 2], [2]]
    assert rows[1]["input_ids"] == [9, 10, 11, 12, 7, 8] and rows[1]["labels"] == [-100, 10, 11, 12, -100, 8]
    batch = RowPackedCollator(pad_token_id=0, repack=True)(
        [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}, {"input_ids": [6]}]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, 5, -100]] and batch[REAL_TOKENS].item() == 6


def test_repack_batches_trains_as_padding_does(tiny_model_dir: Path, tiny_sft_file: Path, tmp_path: Path) -> None:
    """The same chats and loss each step on fewer positions: the losses of a padded run, and its token count."""
    data = DataArguments(dataset_name=str(tiny_sft_file), eval_fraction=0.1)
    model = ModelArguments(model_name_or_path=str(tiny_model_dir))
    runs = {}
    for repack in (False, True):
        training = sft_args(tmp_path / f"repack-{repack}", max_steps=6, logging_steps=1, repack_batches=repack)
        run_dir = run_sft(training, data, model)
        runs[repack] = (read_json(run_dir / "trainer_state.json"), read_json(run_dir / "metrics.json"))
    (padded, padded_metrics), (repacked, repacked_metrics) = runs[False], runs[True]
    assert losses(repacked) == pytest.approx(losses(padded), rel=1e-4)
    assert repacked_metrics["eval_loss"] == pytest.approx(padded_metrics["eval_loss"], rel=1e-4)
    count = [max(e.get("num_tokens", 0) for e in state["log_history"]) for state in (padded, repacked)]
    assert count[0] == count[1] and count[0] > 6 * 8 * 10
    with pytest.raises(ConfigError, match="repack_batches"):
        sft_args(tmp_path / "bad", packing=True, repack_batches=True)


@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "lora"])
def test_plain_lm_head_trains_as_trls_fused_head(
    use_peft: bool, tiny_model_dir: Path, tiny_sft_file: Path, tmp_path: Path
) -> None:
    """On CPU the model's own head replaces TRL's fused-head fallback: same losses, entropy and token accuracy
    every step, same eval loss; only the arithmetic's order differs."""
    data = DataArguments(dataset_name=str(tiny_sft_file), eval_fraction=0.1)
    model = ModelArguments(model_name_or_path=str(tiny_model_dir), use_peft=use_peft, lora_r=8, lora_alpha=16)
    logs, evals = {}, {}
    for fused in (True, False):
        training = sft_args(tmp_path / f"fused-{fused}", max_steps=6, logging_steps=1, fused_lm_head=fused)
        run_dir = run_sft(training, data, model)
        logs[fused] = [e for e in read_json(run_dir / "trainer_state.json")["log_history"] if "loss" in e]
        evals[fused] = read_json(run_dir / "metrics.json")["eval_loss"]
    assert len(logs[False]) == len(logs[True]) == 6
    for key in ("loss", "entropy", "mean_token_accuracy", "num_tokens"):
        assert [e[key] for e in logs[False]] == pytest.approx([e[key] for e in logs[True]], rel=1e-4), key
    assert evals[False] == pytest.approx(evals[True], rel=1e-5)


@pytest.mark.parametrize("chunk_rows", [None, 5], ids=["whole", "chunked"])
def test_plain_lm_head_is_chosen_off_cuda(
    chunk_rows: int | None, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unset, the plain head replaces TRL's on CPU and not on CUDA; an explicit choice wins; its fields and
    gradients match TRL's, also when the logits are taken in checkpointed chunks of 5 positions."""
    from trl.trainer.utils import add_fused_lm_head

    from instruct_tune.models import lm_head
    from instruct_tune.models.lm_head import select_lm_head

    if chunk_rows:
        vocab = AutoModelForCausalLM.from_pretrained(tiny_model_dir).config.vocab_size
        monkeypatch.setattr(lm_head, "CHUNK_ELEMENTS", chunk_rows * vocab)

    def patched():
        net = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        add_fused_lm_head(net, outputs=("log_probs", "entropy", "is_top1"))
        return net

    assert not select_lm_head(patched(), torch.device("cuda"))
    assert not select_lm_head(patched(), torch.device("cpu"), fused=True)
    fused, plain = patched(), patched()
    assert select_lm_head(plain, torch.device("cpu"))
    ids = torch.randint(0, fused.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :5] = -100
    labels[2] = -100  # a row without labels
    out = {name: net(input_ids=ids, labels=labels, fused_lm_head=True) for name, net in (("f", fused), ("p", plain))}
    for key in ("log_probs", "entropy"):
        torch.testing.assert_close(out["p"][key], out["f"][key], rtol=1e-5, atol=1e-5)
    assert torch.equal(out["p"].is_top1, out["f"].is_top1) and torch.equal(out["p"].label_mask, out["f"].label_mask)
    out["p"].loss.backward()
    out["f"].loss.backward()
    for (name, a), b in zip(plain.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
