"""The PPO stage on tiny models: model layouts, rollouts, a real run folder, PPO-ptx, NaN guard, resume, DDP."""

from __future__ import annotations

import json
import os
import shutil
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
from helpers import DDP_CPU, REPO, TINY_DATA, accelerate_launch, head_of
from huggingface_hub import ModelCard
from stage_runs import PPO_TYPES, normalised_by, reward_args, train_reward

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
    folder = tmp_path_factory.mktemp("ppo-data")
    return {
        "prompts": head_of(TINY_DATA / "prompts.jsonl", folder / "prompts.jsonl", 64),
        "eval": head_of(TINY_DATA / "heldout_prompts.jsonl", folder / "heldout.jsonl", 16),
        "pretrain": head_of(TINY_DATA / "pretrain.jsonl", folder / "pretrain.jsonl", 64),
        "comparisons": head_of(TINY_DATA / "comparisons.jsonl", folder / "comparisons.jsonl", 48),
        "comparisons_eval": head_of(
            TINY_DATA / "comparisons_eval.jsonl", folder / "comparisons_eval.jsonl", 16
        ),
    }


def _reward_run(out: Path, sft_folder: Path, data: dict[str, Path], use_peft: bool) -> Path:
    args = reward_args(
        out,
        gradient_checkpointing=False,
        **normalised_by(sft_folder, data["prompts"], samples=32, max_new_tokens=12),
    )
    model_args = policy_args(sft_folder, use_peft=use_peft)
    return train_reward(args, model_args, data["comparisons"], data["comparisons_eval"])


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


def _write_config(path: Path, sft_folder: Path, reward: Path, data, output_dir: Path, **extra) -> Path:
    values = {
        "model_name_or_path": str(sft_folder),
        "use_peft": True,
        "lora_r": 8,
        "lora_alpha": 16,
        "reward_model_path": str(reward),
        "dataset_name": str(data["prompts"]),
        "eval_fraction": 0.0,
        "eval_samples": 0,
        "output_dir": str(output_dir),
        "total_episodes": 48,
        "rollout_batch_size": 4,
        "num_mini_batches": 2,
        "ppo_epochs": 2,
        "max_new_tokens": 10,
        "learning_rate": 1.0e-3,
        "logging_steps": 1,
        "sample_steps": 0,
        "report_to": "none",
        "seed": 0,
    }
    values.update(extra)
    path.write_text(yaml.safe_dump(values))
    return path


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


def test_accelerate_launch_two_processes(sft_folder: Path, lora_reward: Path, data, tmp_path: Path) -> None:
    out = tmp_path / "runs" / "ppo"
    config = _write_config(
        tmp_path / "ppo.yaml",
        sft_folder,
        lora_reward,
        data,
        out,
        total_episodes=16,
        eval_dataset_name=str(data["eval"]),
        eval_samples=8,
    )
    accelerate_launch(DDP_CPU, "recipes/ppo.py", ["--config", str(config), "--use_cpu", "true"])
    assert [p.name for p in out.parent.iterdir()] == ["ppo"]
    state = json.loads((out / "trainer_state.json").read_text())
    steps = [e for e in state["log_history"] if "step" in e]
    assert [e["episodes"] for e in steps] == [8, 16]  # 2 ranks x 4 prompts per step
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_end_prompts"] == 8  # the 8 eval prompts were split over the ranks
    assert (out / "adapter_model.safetensors").is_file()


def test_a_multi_process_launch_on_cpu_without_use_cpu_is_refused(
    sft_folder: Path, lora_reward: Path, data, tmp_path: Path
) -> None:
    """Without `--use_cpu true` on a machine without a GPU, each PPO process would train alone and all would
    write the same run folder: refused before any model loads."""
    out = tmp_path / "runs" / "ppo"
    config = _write_config(tmp_path / "ppo.yaml", sft_folder, lora_reward, data, out)
    output = accelerate_launch(
        DDP_CPU, "recipes/ppo.py", ["--config", str(config)], succeed=False, CUDA_VISIBLE_DEVICES=""
    )
    assert "2 processes were launched but each would train alone (this one sees 1)" in output
    assert "add `--use_cpu true`" in output
    assert not (out / "metrics.json").exists() and "Loading" not in output


FSDP_CPU = str(REPO / "recipes" / "accelerate" / "fsdp_cpu.yaml")
ZERO3_CPU = str(REPO / "recipes" / "accelerate" / "zero3_cpu.yaml")


def _step_log(run_dir: Path) -> list[dict]:
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return [e for e in state["log_history"] if "step" in e]


def _policy_logits(run_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    model = load_model(ModelArguments(model_name_or_path=str(run_dir)), load_tokenizer(policy_args(run_dir)))
    with torch.no_grad():
        return model(ids).logits


# PPO under FSDP2 against DDP, same seeds: the same samples (the gathered weights are the DDP model's, bit for
# bit), losses apart by the order of the gradient sums (reduce-scatter against all-reduce). Measured: the
# first step's figures equal, the third step's policy loss 2e-8 apart.
FSDP_PPO_TOLERANCE = {"rel": 1e-4, "abs": 1e-5}
PPO_STEP_KEYS = ("objective/scores", "objective/kl", "loss/policy", "loss/value", "response/length")


def _launch_sharded(engine: str, config: Path, output_dir: Path) -> str:
    """`recipes/ppo.py` on `config` over 2 CPU processes under `engine` (fsdp: FSDP2, zero3: DeepSpeed ZeRO-3)."""
    if engine == "fsdp":
        args = ["--config", str(config), "--use_cpu", "true", "--output_dir", str(output_dir)]
        output = accelerate_launch(["--config_file", FSDP_CPU], "recipes/ppo.py", args)
        assert "FSDP over CPU processes" in output
        return output
    args = ["--config", str(config), "--output_dir", str(output_dir)]
    output = accelerate_launch(["--config_file", ZERO3_CPU], "recipes/ppo.py", args, DS_ACCELERATOR="cpu")
    assert "ZeRO-3" in output
    return output


def _sharded_and_ddp_runs(config: Path, tmp_path: Path, engine: str = "fsdp") -> tuple[dict[str, Path], list[str]]:
    """The PPO run of `config` under DDP and under `engine`, each over 2 CPU processes; checks they agree."""
    runs = {"ddp": tmp_path / "ddp" / "ppo", "fsdp": tmp_path / engine / "ppo"}
    accelerate_launch(DDP_CPU, "recipes/ppo.py", ["--config", str(config), "--use_cpu", "true", "--output_dir", str(runs["ddp"])])
    _launch_sharded(engine, config, runs["fsdp"])
    for a, b in zip(_step_log(runs["ddp"]), _step_log(runs["fsdp"]), strict=True):
        print({k: (a[k], b[k]) for k in PPO_STEP_KEYS})
        for k in PPO_STEP_KEYS:
            assert b[k] == pytest.approx(a[k], **FSDP_PPO_TOLERANCE), (b["step"], k)
    files = {name: sorted(p.name for p in run.iterdir() if not p.name.startswith("checkpoint-")) for name, run in runs.items()}
    assert files["fsdp"] == files["ddp"]
    assert not any("fsdp" in f for f in files["fsdp"])
    ids = torch.tensor([[5, 17, 42, 8, 99, 3, 61]])
    torch.testing.assert_close(_policy_logits(runs["fsdp"], ids), _policy_logits(runs["ddp"], ids), rtol=1e-4, atol=1e-4)
    return runs, files["fsdp"]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_sharded_ppo_trains_as_ddp_and_resumes(
    engine: str, sft_folder: Path, lora_reward: Path, data, tmp_path: Path
) -> None:
    """PPO with LoRA on one shared base under FSDP2 (`recipes/accelerate/fsdp_cpu.yaml`) or DeepSpeed ZeRO-3
    (`recipes/accelerate/zero3_cpu.yaml`), 2 CPU processes, against the same run under DDP: the same rollouts
    and losses, a run folder of the same files whose policy gives the same logits; a rerun resumes from a
    sharded run's checkpoint and ends where the uninterrupted run did. A hang fails the test."""
    config = _write_config(
        tmp_path / "ppo.yaml", sft_folder, lora_reward, data, tmp_path / "unused",
        total_episodes=24, eval_dataset_name=str(data["eval"]), eval_samples=8, save_steps=1,
    )  # fmt: skip
    runs, files = _sharded_and_ddp_runs(config, tmp_path, engine)
    assert "adapter_model.safetensors" in files
    sharded = _step_log(runs["fsdp"])
    assert [e["episodes"] for e in sharded] == [8, 16, 24]

    for later in ("checkpoint-2", "checkpoint-3"):  # as if killed after the first step's checkpoint
        shutil.rmtree(runs["fsdp"] / later)
    (runs["fsdp"] / "metrics.json").unlink()
    output = _launch_sharded(engine, config, runs["fsdp"])
    assert f"Resumed PPO from {runs['fsdp'] / 'checkpoint-1'} at step 1" in output
    resumed = _step_log(runs["fsdp"])
    assert resumed[0] == sharded[0]
    for a, b in zip(sharded[1:], resumed[1:], strict=True):
        for k in PPO_STEP_KEYS:
            assert b[k] == pytest.approx(a[k], **FSDP_PPO_TOLERANCE), (b["step"], k)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_sharded_ppo_trains_full_models_as_ddp(
    engine: str, sft_folder: Path, lora_reward: Path, data, tmp_path: Path
) -> None:
    """Full fine-tuning (four models: the policy and value sharded, reference and reward frozen copies) under
    FSDP2 or ZeRO-3 as under DDP; the run folder holds the whole policy, its tied weights saved once."""
    config = _write_config(
        tmp_path / "ppo.yaml", sft_folder, lora_reward, data, tmp_path / "unused", use_peft=False,
        total_episodes=16, learning_rate=1.0e-4,
    )  # fmt: skip
    runs, files = _sharded_and_ddp_runs(config, tmp_path, engine)
    assert "model.safetensors" in files and "adapter_model.safetensors" not in files
    metrics = json.loads((runs["fsdp"] / "metrics.json").read_text())
    assert metrics["model_layout"] == "four models: policy, reference, reward, value"


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
