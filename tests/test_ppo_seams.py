"""The PPO loop's seams on a real tiny model and the real trainer: a second rollout backend, a second advantage
estimator, and the reward normalisation the trainer applies."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import stage_runs
import torch
from helpers import TINY_DATA, head_of
from stage_runs import lora_args, normalised_by, reward_args, train_reward

from instruct_tune.config import ModelArguments
from instruct_tune.models import load_tokenizer
from instruct_tune.models.reward_normalization import RewardNormalization
from instruct_tune.models.sampling import Rollout, decode_responses, encode_prompts
from instruct_tune.ppo import core
from instruct_tune.ppo.adapters import POLICY
from instruct_tune.ppo.advantages import (
    AdvantageEstimator,
    AdvantageInputs,
    Advantages,
    KLPenalizedGAE,
)
from instruct_tune.ppo.models import PPOModels, build_ppo_models
from instruct_tune.ppo.rollout import HFRolloutBackend, RolloutBackend
from instruct_tune.ppo.trainer import PPOTrainer

# the shared tiny PPO config at this module's size: 3 steps of 8 prompts, no eval
ppo_args = partial(
    stage_runs.ppo_args,
    total_episodes=24,
    num_mini_batches=2,
    max_new_tokens=8,
    kl_coef=0.1,
    eval_samples=0,
    sample_steps=1,
    num_samples_logged=2,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("seams-data")
    files = {
        "prompts": ("prompts.jsonl", 32),
        "eval": ("heldout_prompts.jsonl", 8),
        "comparisons": ("comparisons.jsonl", 48),
        "comparisons_eval": ("comparisons_eval.jsonl", 16),
    }
    return {key: head_of(TINY_DATA / name, folder / name, n) for key, (name, n) in files.items()}


@pytest.fixture(scope="module")
def reward_folder(sft_folder: Path, data, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA reward model trained from the SFT run folder (one shared base for PPO's four models)."""
    args = reward_args(
        tmp_path_factory.mktemp("seams-rm") / "reward",
        gradient_checkpointing=False,
        **normalised_by(sft_folder, data["prompts"], samples=16, max_new_tokens=8),
    )
    return train_reward(args, lora_args(sft_folder), data["comparisons"], data["comparisons_eval"])


def prompt_ids(tokenizer, path: Path) -> list[list[int]]:
    rows = [json.loads(line)["prompt"] for line in path.read_text().splitlines()]
    return encode_prompts(tokenizer, [[{"role": "user", "content": r}] for r in rows])


def build(sft_folder: Path, reward_folder: Path):
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(sft_folder)))
    torch.manual_seed(0)  # the policy adapter's A weights
    models = build_ppo_models(lora_args(sft_folder), tokenizer, str(reward_folder))
    return tokenizer, models


def weights(module: torch.nn.Module, part: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad and part in n}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    assert before and before.keys() == after.keys()
    return any(not torch.equal(before[n], after[n]) for n in before)


def step_entries(trainer: PPOTrainer) -> list[dict]:
    return [entry for entry in trainer.log_history if "step" in entry]


# --- rollout backend ------------------------------------------------------------------------------------


class GreedyRecordingBackend(HFRolloutBackend):
    """The HF backend made greedy, recording each call, its seed, its rollout and the policy weights it saw."""

    def __init__(self, policy: torch.nn.Module, tokenizer, max_new_tokens: int) -> None:
        super().__init__(policy, tokenizer, max_new_tokens=max_new_tokens, temperature=0.0)
        self.events: list[tuple[str, float]] = []
        self.rollouts: list[Rollout] = []
        self.seeds: list[int | None] = []

    def _checksum(self) -> float:
        return sum(
            float(p.detach().double().sum()) for n, p in self.policy.named_parameters() if f".{POLICY}." in n
        )

    def generate(self, prompts, *, seed=None) -> Rollout:
        rollout = super().generate(prompts, seed=seed)
        self.events.append(("generate", self._checksum()))
        self.rollouts.append(rollout)
        self.seeds.append(seed)
        return rollout

    def sync_weights(self) -> None:
        self.events.append(("sync", self._checksum()))


def test_a_second_rollout_backend_plugs_into_the_trainer(
    sft_folder: Path, reward_folder: Path, data, tmp_path: Path
) -> None:
    tokenizer, models = build(sft_folder, reward_folder)
    args = ppo_args(tmp_path / "ppo", reward_folder, eval_samples=4)
    backend = GreedyRecordingBackend(models.trainable.policy, tokenizer, max_new_tokens=args.max_new_tokens)
    assert isinstance(backend, RolloutBackend)
    trainer = PPOTrainer(
        args,
        models,
        tokenizer,
        prompt_ids(tokenizer, data["prompts"]),
        eval_prompts=prompt_ids(tokenizer, data["eval"]),
        rollout_backend=backend,
    )
    # What greedy decoding of the starting policy answers to the first step's prompts.
    first = HFRolloutBackend(models.trainable.policy, tokenizer, max_new_tokens=8, temperature=0.0)
    expected = first.generate(trainer._prompt_batch(0), seed=123)
    seen: list[Rollout] = []
    score_rollout = trainer.score_rollout

    def spy(rollout: Rollout):
        seen.append(rollout)
        return score_rollout(rollout)

    trainer.score_rollout = spy  # on this instance: the trainer's code is untouched
    metrics = trainer.train()
    steps = trainer.num_steps
    assert steps == 3 and metrics["ppo_steps"] == 3 and len(step_entries(trainer)) == 3

    # Every rollout came from the backend: the start eval, one per step, the end eval (evals seeded, steps not).
    kinds = [kind for kind, _ in backend.events]
    assert kinds == ["generate"] + ["generate", "sync"] * steps + ["generate"]
    assert backend.seeds[0] is not None and backend.seeds[-1] is not None
    assert backend.seeds[1:-1] == [None] * steps
    assert len(seen) == steps
    for rollout, produced in zip(seen, backend.rollouts[1:-1], strict=True):
        assert torch.equal(rollout.response, produced.response) and torch.equal(rollout.query, produced.query)
    # The first step trained on the starting policy's greedy answers (the default backend samples at
    # temperature 1), and samples.jsonl logs the backend's responses.
    assert torch.equal(seen[0].response, expected.response)
    samples = [json.loads(line) for line in (tmp_path / "ppo" / "samples.jsonl").read_text().splitlines()]
    for step, rollout in enumerate(seen, start=1):
        logged = [row["response"] for row in samples if row["step"] == step]
        assert logged == decode_responses(tokenizer, rollout)[:2]

    # sync_weights once per update, after it: each sync sees new weights, and the next rollout samples them.
    checks = [value for _, value in backend.events]
    for k in range(steps):
        before, synced, after = checks[2 * k + 1], checks[2 * k + 2], checks[2 * k + 3]
        assert synced != before and after == synced


def test_the_default_backend_is_hf_sampling_at_the_training_options(
    sft_folder: Path, reward_folder: Path, data, tmp_path: Path
) -> None:
    tokenizer, models = build(sft_folder, reward_folder)
    args = ppo_args(tmp_path / "ppo", reward_folder, temperature=0.7, top_p=0.9)
    trainer = PPOTrainer(args, models, tokenizer, prompt_ids(tokenizer, data["prompts"]))
    backend = trainer.rollout_backend
    assert isinstance(backend, HFRolloutBackend) and backend.policy is trainer.unwrapped.policy
    assert (backend.temperature, backend.top_p, backend.max_new_tokens) == (0.7, 0.9, 8)
    assert (
        isinstance(trainer.advantage_estimator, KLPenalizedGAE) and trainer.advantage_estimator.needs_values
    )


# --- advantage estimator --------------------------------------------------------------------------------


class WhitenedReinforce:
    """REINFORCE with a batch baseline, no value model: every token of a response gets the response's whitened
    total reward (score minus the KL penalty)."""

    needs_values = False

    def __init__(self) -> None:
        self.returned: list[torch.Tensor] = []

    def estimate(self, inputs: AdvantageInputs) -> Advantages:
        rewards, kl, non_score = core.kl_penalized_rewards(
            inputs.scores, inputs.logprobs, inputs.ref_logprobs, inputs.mask, inputs.kl_coef
        )
        total = rewards.sum(1)
        advantages = ((total - total.mean()) / (total.std() + 1e-8))[:, None] * inputs.mask
        self.returned.append(advantages)
        return Advantages(advantages, torch.zeros_like(rewards), rewards, kl, non_score)


class ZeroAdvantages(KLPenalizedGAE):
    """GAE's returns (the value model trains) with every advantage zero: nothing moves the policy."""

    def estimate(self, inputs: AdvantageInputs) -> Advantages:
        estimate = super().estimate(inputs)
        return replace(estimate, advantages=torch.zeros_like(estimate.advantages))


def test_a_value_free_estimator_drives_the_update(
    sft_folder: Path, reward_folder: Path, data, tmp_path: Path
) -> None:
    tokenizer, models = build(sft_folder, reward_folder)
    estimator = WhitenedReinforce()
    assert isinstance(estimator, AdvantageEstimator)
    args = ppo_args(tmp_path / "ppo", reward_folder)
    trainer = PPOTrainer(
        args, models, tokenizer, prompt_ids(tokenizer, data["prompts"]), advantage_estimator=estimator
    )
    updated: list[torch.Tensor] = []
    update = trainer.update

    def spy(batch):
        updated.append(batch.advantages)
        return update(batch)

    trainer.update = spy
    policy, value = weights(models.trainable, f".{POLICY}."), weights(models.trainable, "value")
    trainer.train()

    # The update trained on exactly the estimator's advantages, one estimate per step.
    assert len(estimator.returned) == len(updated) == trainer.num_steps == 3
    assert all(a is b for a, b in zip(updated, estimator.returned, strict=True))
    entries = step_entries(trainer)
    for entry in entries:
        assert "loss/policy" in entry and entry["loss/policy"] != 0.0
        assert not [key for key in entry if key.startswith(("val/", "loss/value"))], entry
    # No value loss: the value adapter and head are where they started; the policy moved.
    assert changed(policy, weights(models.trainable, f".{POLICY}."))
    assert not changed(value, weights(models.trainable, "value"))


def test_zero_advantages_leave_the_policy_where_it_was(
    sft_folder: Path, reward_folder: Path, data, tmp_path: Path
) -> None:
    tokenizer, models = build(sft_folder, reward_folder)
    args = ppo_args(tmp_path / "ppo", reward_folder, total_episodes=16)
    estimator = ZeroAdvantages.from_args(args)
    trainer = PPOTrainer(
        args, models, tokenizer, prompt_ids(tokenizer, data["prompts"]), advantage_estimator=estimator
    )
    policy, value = weights(models.trainable, f".{POLICY}."), weights(models.trainable, "value")
    trainer.train()
    entries = step_entries(trainer)
    assert len(entries) == 2 and all(entry["loss/policy"] == 0.0 for entry in entries)
    assert all(entry["loss/value"] > 0.0 and "val/mean" in entry for entry in entries)
    assert not changed(policy, weights(models.trainable, f".{POLICY}."))
    assert changed(value, weights(models.trainable, "value"))


def test_kl_penalized_gae_is_the_core_arithmetic() -> None:
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    logp, ref, values = (torch.randn(3, 4) for _ in range(3))
    scores = torch.tensor([1.0, -0.5, 2.0])
    inputs = AdvantageInputs(scores, logp, ref, values * mask, mask, kl_coef=0.2)
    got = KLPenalizedGAE(0.9, 0.8, whiten_rewards=True, whiten_advantages=True).estimate(inputs)
    rewards, kl, non_score = core.kl_penalized_rewards(scores, logp, ref, mask, 0.2)
    rewards = core.masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = core.gae_advantages(rewards, values * mask, mask, 0.9, 0.8)
    expected = (core.masked_whiten(advantages, mask), returns, rewards, kl, non_score)
    for a, b in zip(
        (got.advantages, got.returns, got.rewards, got.kl, got.non_score_reward), expected, strict=True
    ):
        assert torch.equal(a, b)


# --- reward normalisation -------------------------------------------------------------------------------


def test_scale_scores_applies_the_whole_normalisation_and_needs_a_std(
    sft_folder: Path, reward_folder: Path, data, tmp_path: Path
) -> None:
    tokenizer, models = build(sft_folder, reward_folder)
    norm = models.normalization
    assert norm.std > 0 and norm.scale == pytest.approx(norm.std)
    prompts = prompt_ids(tokenizer, data["prompts"])
    scaled = PPOTrainer(
        ppo_args(tmp_path / "a", reward_folder, scale_scores=True), models, tokenizer, prompts
    )
    shifted = PPOTrainer(ppo_args(tmp_path / "b", reward_folder), models, tokenizer, prompts)
    raw = torch.tensor([-1.0, 0.0, 2.5])
    assert torch.equal(scaled.normalization.apply(raw), (raw + norm.bias) / norm.std)
    assert torch.equal(shifted.normalization.apply(raw), raw + norm.bias)

    no_std = PPOModels(
        models.trainable,
        ref_model=None,
        reward_model=models.reward_model,
        reward_head=models.reward_head,
        reward_adapter=models.reward_adapter,
        normalization=replace(norm, std=0.0),
        layout=models.layout,
    )
    with pytest.raises(ValueError, match="scale_scores: the reward model's normalisation records no std"):
        PPOTrainer(ppo_args(tmp_path / "c", reward_folder, scale_scores=True), no_std, tokenizer, prompts)
    # A reward folder without a normalisation file: raw scores, and no std for scale_scores to divide by.
    bare = RewardNormalization.load(str(tmp_path))
    assert (bare.bias, bare.scale, bare.std) == (0.0, 1.0, 0.0)
