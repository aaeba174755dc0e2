"""The GRPO and RLOO stages on TRL's trainers: the reward adapter in PPO's units, real runs, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY_DATA, head_of
from huggingface_hub import ModelCard

from instruct_tune.config import ConfigError, DataArguments, ModelArguments, PPOStageConfig, parse_args
from instruct_tune.config.online_rl import GRPOStageConfig, RLOOStageConfig
from instruct_tune.models import load_model, load_tokenizer
from instruct_tune.models.reward import init_reward_head, load_reward_model, reward_input_ids
from instruct_tune.models.reward_function import GoldJudgeFunction, RewardModelFunction
from instruct_tune.models.reward_normalization import RewardNormalization
from instruct_tune.models.sampling import Rollout, encode_prompts, left_pad, sample_responses
from instruct_tune.ppo.models import build_ppo_models
from instruct_tune.ppo.trainer import PPOTrainer
from instruct_tune.stages import online_rl
from instruct_tune.stages.run_folder import RunFolderArguments
from instruct_tune.tiny.gold import gold_score

PROMPTS = 8


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return head_of(TINY_DATA / "prompts.jsonl", tmp_path_factory.mktemp("rl-data") / "prompts.jsonl", PROMPTS)


@pytest.fixture(scope="module")
def chats(prompts_file: Path) -> list[list[dict]]:
    rows = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    return [[{"role": "user", "content": row["prompt"]}] for row in rows]


@pytest.fixture(scope="module")
def reward_folder(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reward run folder over the tiny model (a fresh N(0, 1/sqrt(d+1)) head) with a normalisation whose bias
    and scale are not the identity's, so both show in every score."""
    out = tmp_path_factory.mktemp("reward") / "reward"
    model_args = ModelArguments(model_name_or_path=str(tiny_model_dir))
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, tokenizer, head="reward")
    init_reward_head(model, seed=1)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    RewardNormalization(bias=0.4, scale=1.7, mean=-0.4, std=1.7, n=8, source="test").write(out)
    return out


def _stage_args(config_class, output_dir: Path, reward_folder: Path | None, **overrides):
    values = dict(
        output_dir=str(output_dir),
        reward_model_path=str(reward_folder) if reward_folder else None,
        num_generations=2,
        per_device_train_batch_size=4,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-3,
        beta=0.1,
        scale_scores=True,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    return config_class(**{**values, **overrides})


# --- the reward adapter -----------------------------------------------------------------------------------


def test_reward_adapter_scores_as_the_reward_model_and_as_ppo(
    tiny_model_dir: Path, reward_folder: Path, chats: list, tmp_path: Path
) -> None:
    model_args = ModelArguments(model_name_or_path=str(tiny_model_dir))
    tokenizer = load_tokenizer(model_args)
    policy = load_model(model_args, tokenizer).eval()
    query, query_mask = left_pad(encode_prompts(tokenizer, chats), tokenizer.pad_token_id)
    sampled = sample_responses(
        policy, tokenizer, query, query_mask, max_new_tokens=10, temperature=1.0, generator_seed=0
    )
    eos = tokenizer.eos_token_id
    # Sampled completions (cut after EOS, as TRL passes them), each prompt's right answer as a whole turn, and the
    # same answer cut before its EOS (no EOS: the penalty).
    sampled_ids = [r[m.bool()].tolist() for r, m in zip(sampled.response, sampled.response_mask, strict=True)]
    answers = [tokenizer(gold_answer(c), add_special_tokens=False)["input_ids"] for c in chats]
    completion_ids = sampled_ids + [a + [eos] for a in answers] + answers
    prompts = chats * 3
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    has_eos = torch.tensor([eos in ids for ids in completion_ids])
    assert has_eos.any() and not has_eos.all()

    adapter = RewardModelFunction.from_run_folder(reward_folder, tokenizer, device="cpu", scale_scores=True)
    scores = torch.tensor(adapter(prompts=prompts, completions=completions, completion_ids=completion_ids))

    # 1. RewardModel.score on the same prompt/response text, where the text renders to the same tokens.
    reward = load_reward_model(reward_folder, device="cpu")
    prompt_ids = encode_prompts(tokenizer, prompts)
    same = [
        i
        for i, ids in enumerate(reward_input_ids(tokenizer, prompts, texts))
        if has_eos[i] and ids == prompt_ids[i] + completion_ids[i]
    ]
    assert len(same) >= PROMPTS  # every right answer with its EOS, at least
    text_scores = reward.score([prompts[i] for i in same], [texts[i] for i in same])
    torch.testing.assert_close(scores[same], text_scores, atol=1e-5, rtol=0)
    from_text = adapter(prompts=[prompts[i] for i in same], completions=[completions[i] for i in same])
    torch.testing.assert_close(
        torch.tensor(from_text), text_scores, atol=1e-5, rtol=0
    )  # no ids: the text path

    # 2. What PPO computes for the same token ids: its models' raw scores through its trainer's scoring path.
    ppo_args = PPOStageConfig(
        output_dir=str(tmp_path / "ppo"),
        reward_model_path=str(reward_folder),
        scale_scores=True,
        missing_eos_penalty=1.0,
        report_to=[],
        use_cpu=True,
    )
    models = build_ppo_models(model_args, tokenizer, str(reward_folder), shared_base=False)
    trainer = PPOTrainer(ppo_args, models, tokenizer, prompt_ids[:PROMPTS])
    response, response_mask = _right_pad(completion_ids, tokenizer.pad_token_id)
    query, query_mask = left_pad(prompt_ids, tokenizer.pad_token_id)
    rollout = Rollout(query, query_mask, response, response_mask, has_eos)
    raw = models.raw_scores(rollout.input_ids, rollout.attention_mask, rollout.last_index)
    torch.testing.assert_close(scores, trainer._scores(raw, rollout), atol=1e-5, rtol=0)

    # The missing-EOS penalty, and the shift-only normalisation of `scale_scores: false`.
    no_eos = ~has_eos
    norm = reward.normalization
    torch.testing.assert_close(scores[no_eos], norm.apply(raw[no_eos]) - 1.0, atol=1e-5, rtol=0)
    shifted = RewardModelFunction(reward, tokenizer, scale_scores=False, missing_eos_penalty=None)
    shift_scores = torch.tensor(
        shifted(prompts=prompts, completions=completions, completion_ids=completion_ids)
    )
    torch.testing.assert_close(shift_scores, raw + norm.bias, atol=1e-5, rtol=0)


def gold_answer(chat: list[dict]) -> str:
    from instruct_tune.tiny.task import parse_prompt

    return parse_prompt(chat[-1]["content"]).answer


def _right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def test_gold_reward_is_the_judge_with_its_eos_rule(tiny_tokenizer, chats: list) -> None:
    judge = GoldJudgeFunction(tiny_tokenizer)
    answer = gold_answer(chats[0])
    ids = tiny_tokenizer(answer, add_special_tokens=False)["input_ids"]
    completions = [[{"role": "assistant", "content": answer}]] * 2
    scores = judge(chats[:1] * 2, completions, completion_ids=[ids + [tiny_tokenizer.eos_token_id], ids])
    assert scores == [
        gold_score(chats[0][0]["content"], answer, True),
        gold_score(chats[0][0]["content"], answer, False),
    ]
    assert scores == [1.0, 0.5]
    with pytest.raises(ConfigError, match="reward: tiny_gold scores only tiny-task prompts"):
        judge.check_prompts([[{"role": "user", "content": "Tell me a story."}]])


# --- real runs ----------------------------------------------------------------------------------------------


def _run(run, args, prompts_file: Path, model_args: ModelArguments, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """Run a stage, keeping the trainer it finished with (to compare the reloaded folder with its model)."""
    seen: dict = {}
    finish = online_rl.finish_run

    def keep(trainer, **kwargs):
        seen["trainer"] = trainer
        return finish(trainer, **kwargs)

    monkeypatch.setattr(online_rl, "finish_run", keep)
    data = DataArguments(dataset_name=str(prompts_file), eval_fraction=0.0)
    out = run(args, data, model_args)
    return out, seen["trainer"]


def _check_reloads_as_trained(out: Path, trainer, tokenizer) -> None:
    ids = torch.tensor([encode_prompts(tokenizer, [[{"role": "user", "content": "What is 2 + 3?"}]])[0]])
    folder = ModelArguments(model_name_or_path=str(out))
    reloaded = load_model(folder, load_tokenizer(folder)).eval()
    trained = trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-5, rtol=0
        )


def _card(out: Path) -> str:
    return ModelCard.load(out / "README.md").text


def test_grpo_full_finetuning_trains_against_the_sft_reference(
    tiny_model_dir: Path, reward_folder: Path, prompts_file: Path, chats: list, tmp_path: Path, monkeypatch
) -> None:
    args = _stage_args(GRPOStageConfig, tmp_path / "grpo", reward_folder)
    model_args = ModelArguments(model_name_or_path=str(tiny_model_dir))
    calls: list = []
    score = RewardModelFunction.__call__
    monkeypatch.setattr(
        RewardModelFunction, "__call__", lambda self, *a, **k: calls.append(k) or score(self, *a, **k)
    )
    out, trainer = _run(online_rl.run_grpo, args, prompts_file, model_args, monkeypatch)

    assert calls and all(k["completion_ids"] is not None for k in calls)  # TRL hands over the sampled ids
    # The reference is the SFT folder, unchanged; the policy moved away from it.
    ref = trainer.ref_model
    assert Path(ref.config._name_or_path) == tiny_model_dir.resolve()
    start = load_model(model_args, load_tokenizer(model_args))
    start_weights = dict(start.named_parameters())
    assert all(torch.equal(p, start_weights[n]) for n, p in ref.named_parameters())
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), start_weights[n])]
    assert moved
    # Policy and reference number positions over the mask, as `generate` sampled them (left-padded prompts).
    rows = encode_prompts(trainer.processing_class, [[{"role": "user", "content": "Hi"}], chats[0]])
    ids, mask = left_pad(rows, trainer.processing_class.pad_token_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    for model in (trainer.model, ref):
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
            want = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[mask.bool()]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    _check_reloads_as_trained(out, trainer, trainer.processing_class)

    metrics = json.loads((out / "metrics.json").read_text())
    assert {"last/reward", "last/kl", "last/completions/mean_length"} <= set(metrics)
    assert metrics["episodes"] == 2 * 4 and metrics["reward_function"] == "reward_model"
    assert (out / "model.safetensors").is_file() and (out / "trainer_state.json").is_file()
    card = _card(out)
    assert f"- SFT policy: `{tiny_model_dir}`" in card and f"- reward model: `{reward_folder}`" in card
    assert yaml.safe_load((out / "config.yaml").read_text())["beta"] == 0.1


def test_rloo_lora_trains_an_adapter_over_the_sft_policy(
    tiny_model_dir: Path, reward_folder: Path, prompts_file: Path, tmp_path: Path, monkeypatch
) -> None:
    args = _stage_args(RLOOStageConfig, tmp_path / "rloo", reward_folder)
    model_args = ModelArguments(model_name_or_path=str(tiny_model_dir), use_peft=True, lora_r=4, lora_alpha=8)
    out, trainer = _run(online_rl.run_rloo, args, prompts_file, model_args, monkeypatch)

    # The reference is the base with the adapter off: TRL's copy of the fresh adapter is gone, in memory and on disk.
    assert list(trainer.model.peft_config) == ["default"] and not (out / "ref").exists()
    adapter = out / "adapter_model.safetensors"
    assert adapter.is_file()
    from safetensors.torch import load_file

    assert any(t.abs().sum() > 0 for n, t in load_file(adapter).items() if "lora_B" in n)  # moved from zero
    _check_reloads_as_trained(out, trainer, trainer.processing_class)
    assert "rloo" in ModelCard.load(out / "README.md").data.tags
    card = _card(out)
    assert f"- SFT policy: `{tiny_model_dir}`" in card and f"- reward model: `{reward_folder}`" in card


def test_tiny_gold_trains_on_the_answer_key(
    tiny_model_dir: Path, prompts_file: Path, tmp_path: Path, monkeypatch
) -> None:
    args = _stage_args(GRPOStageConfig, tmp_path / "gold", None, reward="tiny_gold", beta=0.0)
    model_args = ModelArguments(model_name_or_path=str(tiny_model_dir))
    out, trainer = _run(online_rl.run_grpo, args, prompts_file, model_args, monkeypatch)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reward_function"] == "tiny_gold" and "verifiable reward" in metrics["reward_kind"]
    assert "- reward: `tiny gold judge (verifiable reward: RL on the answer key, not RLHF)`" in _card(out)
    logged = [e["rewards/tiny_gold/mean"] for e in trainer.state.log_history if "rewards/tiny_gold/mean" in e]
    assert logged and all(0.0 <= r <= 1.0 for r in logged)


# --- refusals and configs -------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("config_class", [GRPOStageConfig, RLOOStageConfig])
def test_vllm_without_cuda_is_refused(config_class, tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"use_vllm: vLLM rollouts need a GPU .*pip install instruct-tune\[vllm\]"
    ):
        config_class(output_dir=str(tmp_path), reward="tiny_gold", use_vllm=True, use_cpu=True)


def test_unknown_reward_is_refused_naming_the_option(tmp_path: Path) -> None:
    config = tmp_path / "grpo.yaml"
    config.write_text(
        yaml.safe_dump({"model_name_or_path": "m", "reward": "gold", "output_dir": str(tmp_path)})
    )
    with pytest.raises(
        ConfigError, match=r"reward: 'gold' is not a reward this stage knows \(reward_model: .*tiny_gold"
    ):
        parse_args(
            GRPOStageConfig, DataArguments, ModelArguments, RunFolderArguments, args=["--config", str(config)]
        )


def test_full_finetuning_from_a_lora_sft_folder_is_refused(sft_folder: Path, tmp_path: Path) -> None:
    """TRL would build the reference from the adapter's base model, not from the SFT policy."""
    args = _stage_args(GRPOStageConfig, tmp_path / "grpo", None, reward="tiny_gold")
    data = DataArguments(dataset_name=str(TINY_DATA / "prompts.jsonl"))
    with pytest.raises(
        ConfigError, match="is a LoRA adapter, and TRL would build the reference from its base"
    ):
        online_rl.run_grpo(args, data, ModelArguments(model_name_or_path=str(sft_folder)))
