"""The PPO stage on tiny models: model layouts, rollouts, a real run folder, PPO-ptx, NaN guard, resume, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import stage_runs
import torch
import yaml
from helpers import REPO, TINY_DATA
from huggingface_hub import ModelCard
from stage_runs import PPO_TYPES

from instruct_tune.config import DataArguments, ModelArguments, PPOStageConfig, parse_args
from instruct_tune.models import adapter_chain, load_model, load_tokenizer
from instruct_tune.models.reward import NORMALIZATION_FILE, load_reward_model
from instruct_tune.models.sampling import encode_prompts, left_pad
from instruct_tune.ppo.adapters import POLICY, active_adapter
from instruct_tune.ppo.models import build_ppo_models
from instruct_tune.ppo.rollout import sample_rollout, sampling_policy
from instruct_tune.ppo.trainer import NonFiniteError
from instruct_tune.stages.ppo import ptx_ids, run_ppo

# the shared tiny PPO config at this module's size: 4 steps of 8 prompts, 2 PPO epochs of 2 mini-batches
ppo_args = partial(
    stage_runs.ppo_args,
    total_episodes=32,
    num_mini_batches=2,
    ppo_epochs=2,
    max_new_tokens=10,
    kl_coef=0.1,
    missing_eos_penalty=1.0,
    eval_samples=8,
    sample_steps=2,
    num_samples_logged=3,
)
policy_args = stage_runs.lora_args


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return stage_runs.ppo_data(tmp_path_factory.mktemp("ppo-data"))


def _reward_run(out: Path, sft_folder: Path, data: dict[str, Path], use_peft: bool) -> Path:
    return stage_runs.ppo_reward_run(out, sft_folder, data, use_peft)


@pytest.fixture(scope="module")
def lora_reward(sft_folder: Path, data, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA reward model trained from the SFT run folder: it can share the policy's base."""
    return _reward_run(tmp_path_factory.mktemp("rm-lora") / "reward", sft_folder, data, use_peft=True)


@pytest.fixture(scope="module")
def full_reward(sft_folder: Path, data, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fully fine-tuned reward model: its base differs from the policy's."""
    return _reward_run(tmp_path_factory.mktemp("rm-full") / "reward", sft_folder, data, use_peft=False)


def prompt_batch(tokenizer, data, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [json.loads(line) for line in data["prompts"].read_text().splitlines()[:n]]
    ids = encode_prompts(tokenizer, [[{"role": "user", "content": r["prompt"]}] for r in rows])
    return left_pad(ids, tokenizer.pad_token_id)


# --- model layouts --------------------------------------------------------------------------------------


def _parameter_bytes(models) -> int:
    """Bytes of distinct parameter storage held by the PPO models."""
    seen, total = set(), 0
    modules = [models.trainable, *models.frozen_modules()]
    for module in modules:
        for p in module.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
    return total


def test_one_shared_base_serves_all_four_models(sft_folder: Path, lora_reward: Path) -> None:
    tokenizer = load_tokenizer(policy_args(sft_folder))
    shared = build_ppo_models(policy_args(sft_folder), tokenizer, str(lora_reward))
    assert shared.layout.startswith("one shared base")
    separate = build_ppo_models(policy_args(sft_folder), tokenizer, str(lora_reward), shared_base=False)
    assert separate.layout.startswith("four models")
    shared_bytes, separate_bytes = _parameter_bytes(shared), _parameter_bytes(separate)
    print(f"parameter bytes: shared base {shared_bytes}, four models {separate_bytes}")
    assert shared_bytes < 0.6 * separate_bytes

    # Only the policy and value adapters and the value head train; the base and reward adapter stay frozen.
    trainable = {n for n, p in shared.trainable.named_parameters() if p.requires_grad}
    assert trainable and all(
        f".{POLICY}." in n or ".value." in n or n.startswith("value_head") for n in trainable
    )
    assert any(".value." in n for n in trainable) and "value_head.weight" in trainable

    # Same inputs, same answers: the shared layout's reference, reward and value equal the separate models'.
    ids, mask = prompt_batch(tokenizer, {"prompts": TINY_DATA / "prompts.jsonl"})
    last = torch.full((len(ids),), ids.shape[1] - 1)
    assert torch.allclose(shared.ref_logits(ids, mask), separate.ref_logits(ids, mask), atol=1e-4)
    assert torch.allclose(shared.scores(ids, mask, last), separate.scores(ids, mask, last), atol=1e-4)
    assert torch.allclose(shared.trainable.values(ids, mask), separate.trainable.values(ids, mask), atol=1e-4)
    # The reward normalisation travels with the models: its bias, and its std (the scale) for `scale_scores`.
    record = json.loads((lora_reward / NORMALIZATION_FILE).read_text())
    norm = shared.normalization
    assert norm.std == pytest.approx(record["std"]) and norm.bias == pytest.approx(record["bias"])
    assert norm.scale == pytest.approx(record.get("scale", record["std"]))
    raw = shared.raw_scores(ids, mask, last)
    assert torch.allclose(shared.scores(ids, mask, last), (raw + norm.bias) / norm.scale)
    # The LoRA policy starts equal to the reference (B = 0).
    assert torch.allclose(shared.trainable.logits(ids, mask), shared.ref_logits(ids, mask), atol=1e-5)

    # The reward equals the reward stage's own loader (normalisation included) on a scored conversation.
    rm = load_reward_model(lora_reward, device="cpu")
    prompt = [{"role": "user", "content": "Add 2 and 3."}]
    conversation = tokenizer.apply_chat_template(
        prompt + [{"role": "assistant", "content": "5"}], tokenize=True
    )
    conv = torch.tensor([list(conversation["input_ids"] if hasattr(conversation, "keys") else conversation)])
    got = shared.scores(conv, torch.ones_like(conv), torch.tensor([conv.shape[1] - 1]))
    assert got.item() == pytest.approx(rm.score([prompt], ["5"]).item(), abs=1e-4)


def test_full_reward_model_gives_two_bases(sft_folder: Path, full_reward: Path) -> None:
    tokenizer = load_tokenizer(policy_args(sft_folder))
    models = build_ppo_models(policy_args(sft_folder), tokenizer, str(full_reward))
    assert models.layout.startswith("two bases")
    ids, mask = prompt_batch(tokenizer, {"prompts": TINY_DATA / "prompts.jsonl"})
    last = torch.full((len(ids),), ids.shape[1] - 1)
    # The value adapter is off while the reward is read: training it cannot move the reward.
    before = models.scores(ids, mask, last)
    with torch.no_grad():
        start_values = models.trainable.values(ids, mask)[:, -1]
        for name, p in models.trainable.named_parameters():
            if ".value." in name and "lora_B" in name:
                p.add_(0.5)
    assert torch.allclose(models.scores(ids, mask, last), before)
    assert not torch.allclose(
        models.trainable.values(ids, mask)[:, -1] - models.normalization.bias, before, atol=1e-3
    )
    # The value model started as the reward shifted by the bias only (not scaled); training moved it.
    shifted = models.normalization.shift_only().apply(models.raw_scores(ids, mask, last))
    assert torch.allclose(start_values, shifted, atol=1e-5)
    assert not torch.allclose(models.trainable.values(ids, mask)[:, -1], shifted, atol=1e-3)


def test_sampling_merges_the_adapter_and_restores_the_base(sft_folder: Path, lora_reward: Path, data) -> None:
    tokenizer = load_tokenizer(policy_args(sft_folder))
    models = build_ppo_models(policy_args(sft_folder), tokenizer, str(lora_reward))
    policy = models.trainable.policy
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if f".{POLICY}." in name and "lora_B" in name:
                p.normal_(std=0.05)
    ids, mask = prompt_batch(tokenizer, data)
    base_before = {n: p.clone() for n, p in policy.named_parameters() if "base_layer" in n}
    with active_adapter(policy, POLICY):
        unmerged = models.trainable.logits(ids, mask)
    with sampling_policy(policy) as merged_model:
        assert any(getattr(m, "merged", False) for m in merged_model.modules())
        merged = merged_model(
            input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
        ).logits
    assert torch.allclose(merged, unmerged, atol=1e-4)
    for name, p in policy.named_parameters():
        if name in base_before:
            assert torch.allclose(p, base_before[name], atol=1e-6), name

    rollout = sample_rollout(
        policy, tokenizer, ids, mask, max_new_tokens=12, temperature=1.0, generator_seed=0
    )
    again = sample_rollout(policy, tokenizer, ids, mask, max_new_tokens=12, temperature=1.0, generator_seed=0)
    assert torch.equal(rollout.response, again.response)  # fixed seed, same samples
    eos = tokenizer.eos_token_id
    for row, m in zip(rollout.response.tolist(), rollout.response_mask.tolist(), strict=True):
        if eos in row:
            cut = row.index(eos)
            assert m == [1] * (cut + 1) + [0] * (len(row) - cut - 1)
            assert all(t == tokenizer.pad_token_id for t in row[cut + 1 :])


# --- padding-free forwards ------------------------------------------------------------------------------


def test_packing_lays_real_tokens_side_by_side() -> None:
    from instruct_tune.models.packed_forward import Packing

    # Left-padded prompts, right-padded responses: real runs of 4, 6, 2 and 3 tokens in 7 columns.
    mask = torch.tensor(
        [
            [0, 0, 1, 1, 1, 1, 0],
            [0, 1, 1, 1, 1, 1, 1],
            [0, 0, 0, 1, 1, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
        ]
    )
    ids = torch.arange(1, 29).view(4, 7) * mask
    packing = Packing.of(mask)
    assert packing is not None and packing.rows == 3  # 6 | 4+3 | 2 (first fit, longest first)
    packed, positions = packing.pack(ids)
    assert packed.shape == (3, 7) and int((packed > 0).sum()) == int(mask.sum())
    assert positions[0].tolist() == [0, 1, 2, 3, 4, 5, 0]  # row 0: the 6-token run, then one padding slot
    assert positions[1].tolist() == [0, 1, 2, 3, 0, 1, 2]  # the 4-token run, then the 3-token run
    assert torch.equal(packing.gather(packed), ids)  # back in place, zeros at padding
    assert torch.equal(packing.gather(packed, slice(-3, -1)), ids[:, -3:-1])
    # Not contiguous, or nothing to gain: no packing.
    assert Packing.of(torch.tensor([[1, 0, 1], [1, 1, 1]])) is None
    assert Packing.of(torch.ones(3, 5, dtype=torch.long)) is None


@pytest.mark.parametrize("reward", ["lora", "full"])
def test_packed_forwards_equal_padded(
    sft_folder: Path, lora_reward: Path, full_reward: Path, data, reward: str
) -> None:
    """Policy and reference logits, values, scores and gradients are the padded forwards' (PPO's default)."""
    tokenizer = load_tokenizer(policy_args(sft_folder))
    reward_path = lora_reward if reward == "lora" else full_reward
    models = build_ppo_models(policy_args(sft_folder), tokenizer, str(reward_path), packed=True)
    with torch.no_grad():
        for name, p in models.trainable.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    ids, mask = prompt_batch(tokenizer, data, n=8)
    rollout = sample_rollout(
        models.trainable.policy, tokenizer, ids, mask, max_new_tokens=10, temperature=1.0, generator_seed=0
    )
    # Responses of different lengths (as if each ended in EOS): padding on both sides of the real tokens.
    keep = torch.tensor([10, 3, 7, 1, 10, 5, 2, 8])
    rollout.response_mask = (torch.arange(10)[None, :] < keep[:, None]).long()
    rollout.response = rollout.response.masked_fill(rollout.response_mask == 0, tokenizer.pad_token_id)
    ids, mask, length = rollout.input_ids, rollout.attention_mask, rollout.response.shape[1]
    from instruct_tune.models.packed_forward import Packing, has_plain_lm_head

    # The packed path runs: the batch packs into fewer rows, and the LoRA policy's head is applied directly.
    assert Packing.of(mask).rows < len(ids) and has_plain_lm_head(models.trainable.policy)

    results = {}
    for packed in (False, True):
        models.trainable.packed = packed
        models.trainable.zero_grad(set_to_none=True)
        logits, values = models.trainable(ids, mask, length)
        rmask = rollout.response_mask
        logp = torch.log_softmax(logits, -1).gather(-1, rollout.response[..., None])[..., 0]
        ((logp * rmask).sum() + (values * rmask).sum()).backward()
        grads = {n: p.grad.clone() for n, p in models.trainable.named_parameters() if p.grad is not None}
        results[packed] = (
            logp * rmask,
            values * rmask,
            models.ref_logits(ids, mask, length)
            .log_softmax(-1)
            .gather(-1, rollout.response[..., None])[..., 0]
            * rmask,
            models.scores(ids, mask, rollout.last_index),
            grads,
        )
    (lp0, v0, r0, s0, g0), (lp1, v1, r1, s1, g1) = results[False], results[True]
    assert torch.allclose(lp0, lp1, atol=1e-5) and torch.allclose(v0, v1, atol=1e-5)
    assert torch.allclose(r0, r1, atol=1e-5) and torch.allclose(s0, s1, atol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) > 4
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-4, rtol=1e-3), name


# --- the stage ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ppo_run(sft_folder: Path, lora_reward: Path, data, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ppo") / "ppo"
    args = ppo_args(out, lora_reward)
    data_args = DataArguments(dataset_name=str(data["prompts"]), eval_dataset_name=str(data["eval"]))
    return run_ppo(args, data_args, policy_args(sft_folder))


LOGGED = (
    "objective/scores",
    "objective/kl",
    "objective/non_score_reward",
    "objective/rlhf_reward",
    "objective/entropy",
    "policy/clipfrac",
    "policy/approxkl",
    "val/clipfrac",
    "loss/policy",
    "loss/value",
    "response/length",
    "response/eos_share",
    "speed/generation_tokens_per_s",
    "speed/train_tokens_per_s",
    "kl_coef",
)


def test_run_folder_metrics_and_card(
    ppo_run: Path, sft_folder: Path, lora_reward: Path, tiny_model_dir: Path
) -> None:
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "config.yaml",
        "metrics.json",
        "trainer_state.json",
        "README.md",
        "samples.jsonl",
    ):
        assert (ppo_run / name).is_file(), name
    assert not list(ppo_run.glob("*.bin")) and not list(ppo_run.glob("*.pt"))
    # The adapter names the SFT run folder as its base: the chain resolves to the tiny model.
    assert adapter_chain(ppo_run) == (str(tiny_model_dir), [str(sft_folder), str(ppo_run)])

    state = json.loads((ppo_run / "trainer_state.json").read_text())
    steps = [entry for entry in state["log_history"] if "step" in entry]
    assert [entry["step"] for entry in steps] == [1, 2, 3, 4]  # 32 episodes / 8 per step
    for entry in steps:
        for key in LOGGED:
            assert key in entry and isinstance(entry[key], float), key
        assert 0.0 <= entry["response/eos_share"] <= 1.0
    metrics = json.loads((ppo_run / "metrics.json").read_text())
    for key in ("eval_start_reward", "eval_end_reward", "eval_end_kl", "eval_end_eos_share", "train_runtime"):
        assert key in metrics, key
    assert metrics["eval_start_kl"] == pytest.approx(0.0, abs=1e-5)  # the starting policy is the reference
    assert metrics["ppo_steps"] == 4

    samples = [json.loads(line) for line in (ppo_run / "samples.jsonl").read_text().splitlines()]
    assert {row["step"] for row in samples} == {1, 2, 4} and all("response" in row for row in samples)

    card = ModelCard.load(ppo_run / "README.md")
    assert card.data.library_name == "peft" and "ppo" in card.data.tags
    assert str(sft_folder) in card.text and str(lora_reward) in card.text
    saved = yaml.safe_load((ppo_run / "config.yaml").read_text())
    assert saved["reward_model_path"] == str(lora_reward) and saved["rollout_batch_size"] == 8

    # The saved policy loads through the one model loader and differs from the SFT policy.
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(ppo_run)))
    ppo_model = load_model(ModelArguments(model_name_or_path=str(ppo_run)), tokenizer).eval()
    sft_model = load_model(ModelArguments(model_name_or_path=str(sft_folder)), tokenizer).eval()
    ids = torch.tensor([tokenizer("What is 2 + 3?")["input_ids"]])
    with torch.no_grad():
        assert not torch.allclose(ppo_model(ids).logits, sft_model(ids).logits, atol=1e-4)


def test_ptx_adds_the_language_modelling_loss(
    sft_folder: Path, full_reward: Path, data, tmp_path: Path
) -> None:
    args = ppo_args(
        tmp_path / "ptx",
        full_reward,
        total_episodes=16,
        ptx_coef=0.5,
        ptx_dataset=str(data["pretrain"]),
        ptx_batch_size=4,
        eval_samples=0,
    )
    data_args = DataArguments(dataset_name=str(data["prompts"]), eval_fraction=0.0)
    out = run_ppo(args, data_args, policy_args(sft_folder, use_peft=False))
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    ptx = [entry["loss/ptx"] for entry in history if "loss/ptx" in entry]
    assert len(ptx) == 2 and all(0.5 < v < 20 for v in ptx)
    assert (out / "model.safetensors").is_file()  # full fine-tuning writes the whole policy
    assert json.loads((out / "metrics.json").read_text())["model_layout"].startswith("four models")


def test_ptx_rows_leave_out_the_eval_perplexity_rows(sft_folder: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(sft_folder)))
    texts = [f"row {i} of the pretraining text." for i in range(10)]
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    kept = ptx_ids(tokenizer, str(path), 64, heldout_rows=3)
    assert [tokenizer.decode(ids[:-1]) for ids in kept] == texts[:7]
    assert all(ids[-1] == tokenizer.eos_token_id for ids in kept)
    with pytest.raises(ValueError, match="ptx_heldout_rows: 10 leaves none of the 10 rows"):
        ptx_ids(tokenizer, str(path), 64, heldout_rows=10)


def test_non_finite_reward_stops_naming_step_and_quantity(
    sft_folder: Path, lora_reward: Path, data, tmp_path: Path
) -> None:
    broken = tmp_path / "broken-reward"
    subprocess.run(["cp", "-r", str(lora_reward), str(broken)], check=True)
    record = json.loads((broken / NORMALIZATION_FILE).read_text())
    (broken / NORMALIZATION_FILE).write_text(json.dumps({**record, "bias": float("nan")}))
    out = tmp_path / "ppo"
    args = ppo_args(out, broken, eval_samples=0)
    data_args = DataArguments(dataset_name=str(data["prompts"]), eval_fraction=0.0)
    with pytest.raises(NonFiniteError, match=r"PPO step 0: scores is not finite"):
        run_ppo(args, data_args, policy_args(sft_folder))
    assert not (out / "adapter_model.safetensors").exists()


def test_ppo_config_parses_and_checks_options(tmp_path: Path) -> None:
    args, _, model_args = parse_args(
        *PPO_TYPES, args=["--config", "recipes/configs/tiny/ppo.yaml", "--output_dir", str(tmp_path)]
    )
    assert (
        args.reward_model_path == "outputs/tiny/reward"
        and model_args.model_name_or_path == "outputs/tiny/sft"
    )
    with pytest.raises(ValueError, match="rollout_batch_size 10 must divide"):
        PPOStageConfig(output_dir=str(tmp_path), rollout_batch_size=10, num_mini_batches=4, use_cpu=True)
    with pytest.raises(ValueError, match="ptx_coef > 0 needs `ptx_dataset`"):
        PPOStageConfig(output_dir=str(tmp_path), ptx_coef=1.0, use_cpu=True)


# --- operation: resume after SIGKILL, two processes ----------------------------------------------------


_write_config = stage_runs.write_ppo_config


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_sigkill_after_a_checkpoint_resumes_and_completes(
    sft_folder: Path, lora_reward: Path, data, tmp_path: Path
) -> None:
    out = tmp_path / "ppo"
    config = _write_config(
        tmp_path / "ppo.yaml", sft_folder, lora_reward, data, out, save_steps=3, save_total_limit=2
    )
    command = [sys.executable, "recipes/ppo.py", "--config", str(config), "--use_cpu", "true"]
    proc = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not (out / "checkpoint-6" / "ppo_state.json").is_file():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint-6 within 300 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter_model.safetensors").exists()  # killed before the end

    resumed = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Resumed PPO from" in resumed.stderr and "at step 6 of 12" in resumed.stderr
    state = json.loads((out / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "step" in e] == list(range(1, 13))
    assert (out / "adapter_model.safetensors").is_file()
    for name in ("model.safetensors", "optimizer.bin", "scheduler.bin", "ppo_state.json"):
        assert (out / "checkpoint-9" / name).is_file(), name


def test_qlora_base_runs_ppo_on_one_shared_4bit_base(
    sft_folder: Path, lora_reward: Path, data, tmp_path: Path
) -> None:
    """bitsandbytes NF4 runs on CPU: the 4-bit base carries policy, reference, reward and value."""
    tokenizer = load_tokenizer(policy_args(sft_folder))
    merged = tmp_path / "sft-merged"  # a 4-bit base cannot take a merged adapter: quantise a merged model
    load_model(ModelArguments(model_name_or_path=str(sft_folder)), tokenizer).save_pretrained(merged)
    tokenizer.save_pretrained(merged)
    reward = tmp_path / "reward"
    subprocess.run(["cp", "-r", str(lora_reward), str(reward)], check=True)
    config = json.loads((reward / "adapter_config.json").read_text())
    (reward / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": str(merged)})
    )

    args = ppo_args(tmp_path / "ppo", reward, total_episodes=16, eval_samples=0)
    data_args = DataArguments(dataset_name=str(data["prompts"]), eval_fraction=0.0)
    out = run_ppo(args, data_args, policy_args(merged, load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model_layout"].startswith("one shared base")
    assert metrics["ppo_steps"] == 2 and (out / "adapter_model.safetensors").is_file()


def test_bf16_mixed_precision_on_cpu(sft_folder: Path, full_reward: Path, data, tmp_path: Path) -> None:
    args = ppo_args(tmp_path / "ppo", full_reward, total_episodes=16, eval_samples=0, bf16=True)
    data_args = DataArguments(dataset_name=str(data["prompts"]), eval_fraction=0.0)
    out = run_ppo(args, data_args, policy_args(sft_folder))
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "step" in e] == [1, 2]
    assert all(abs(e["objective/kl"]) < 10 for e in history if "step" in e)
