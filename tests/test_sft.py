"""The SFT stage end to end on the tiny model: run folder, losses, completion-only labels, full/QLoRA, resume, DDP.

Packing chats in separate rows and the plain LM head: `test_sft_packing.py`.
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
from helpers import DDP_CPU, accelerate_launch
from huggingface_hub import ModelCard
from peft import PeftModel
from safetensors.torch import load_file
from stage_runs import SFT_TYPES
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTTrainer

from instruct_tune.config import DataArguments, ModelArguments, parse_args
from instruct_tune.models import DEFAULT_CHAT_TEMPLATE, load_model, load_tokenizer
from instruct_tune.stages.runner import checkpoint_to_resume
from instruct_tune.stages.sft import run_sft, sft_datasets

TASKS = ("add", "repeat", "reverse", "sort")
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle")

# the shared tiny SFT config at this module's size: 15 steps without packing, logged every 5
sft_args = partial(
    stage_runs.sft_args,
    max_steps=15,
    per_device_eval_batch_size=64,
    lr_scheduler_type="linear",
    warmup_steps=0,
    logging_steps=5,
    packing=False,
    gradient_checkpointing=False,
)
lora_args = partial(stage_runs.lora_args, lora_dropout=0.0)


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
    args = ["--config", str(config), "--use_cpu", "true", "--max_train_samples", str(rows)]
    accelerate_launch(DDP_CPU, "recipes/sft.py", args)

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
