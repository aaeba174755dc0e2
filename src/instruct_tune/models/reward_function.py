"""Reward functions in TRL's form (`GRPOTrainer`/`RLOOTrainer` `reward_funcs`): one float per completion.

    reward = RewardModelFunction.from_run_folder("outputs/tiny/reward", policy_tokenizer, scale_scores=True)
    reward(prompts=[[{"role": "user", "content": "What is 2 + 3?"}]], completions=[...], completion_ids=[[...]])

`RewardModelFunction` scores exactly what PPO scores (`instruct_tune.ppo.trainer`): the reward model reads the
prompt as PPO's rollouts encode it (chat template with the generation prompt, `encode_prompts`) followed by the
completion's sampled token ids, cut after the first EOS, and the score is read at the last token; it is
normalised by the reward folder's `RewardNormalization` (full, or its shift only: `scale_scores`), minus
`missing_eos_penalty` where the completion has no EOS. `GoldJudgeFunction` is the tiny task's gold judge as a
verifiable reward: the answer key scores the completion, no learned reward model is involved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from instruct_tune.config.errors import ConfigError
from instruct_tune.data.messages import last_user_text
from instruct_tune.data.preference_groups import reward_input_ids
from instruct_tune.models.reward import RewardModel, load_reward_model
from instruct_tune.models.reward_normalization import RewardNormalization
from instruct_tune.models.sampling import encode_prompts, first_eos_mask, penalize_missing_eos

__all__ = ["GoldJudgeFunction", "RewardModelFunction", "completion_texts"]

Chat = Sequence[Mapping[str, Any]]


def _chats(prompts: Sequence[Any]) -> list[Chat]:
    if prompts and isinstance(prompts[0], str):
        # A plain-text prompt reaches the policy without the chat template: PPO never samples such prompts,
        # so there are no PPO units to score it in.
        raise TypeError(
            "reward functions here score conversational prompts (lists of messages), not plain text"
        )
    return list(prompts)


def completion_texts(completions: Sequence[Any]) -> list[str]:
    """The text of each completion: TRL passes `[{"role": "assistant", "content": ...}]` for chat prompts."""
    return [c if isinstance(c, str) else "".join(m["content"] for m in c) for c in completions]


def _cut_after_eos(ids: Sequence[Sequence[int]], eos_token_id: int) -> tuple[list[list[int]], list[bool]]:
    """Each completion up to and including its first EOS (as PPO truncates), and whether it has one."""
    if not ids:
        return [], []
    width = max(len(row) for row in ids) or 1
    padded = torch.full((len(ids), width), -1, dtype=torch.long)
    for i, row in enumerate(ids):
        padded[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
    mask, has_eos = first_eos_mask(padded, eos_token_id)
    kept = [list(row)[: int(m.sum())] for row, m in zip(ids, mask, strict=True)]
    return kept, has_eos.tolist()


class RewardModelFunction:
    """The reward model's normalised score of each completion, in PPO's units (see the module docstring).

    `tokenizer` is the policy's: prompts are encoded with it, as PPO encodes them, and the reward model reads
    the same ids (the stage checks both tokenizers agree). `scale_scores`: the full normalisation,
    (raw + bias) / scale, else its shift only, raw + bias.
    """

    __name__ = "reward_model"

    def __init__(
        self,
        reward: RewardModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        scale_scores: bool,
        missing_eos_penalty: float | None = 1.0,
        batch_size: int = 64,
    ) -> None:
        if scale_scores and not reward.normalization.std:
            raise ConfigError(
                "scale_scores: the reward model's normalisation records no std (raw scores only)"
            )
        self.reward = reward
        self.tokenizer = tokenizer
        self.normalization: RewardNormalization = (
            reward.normalization if scale_scores else reward.normalization.shift_only()
        )
        self.missing_eos_penalty = missing_eos_penalty
        self.batch_size = batch_size

    @classmethod
    def from_run_folder(
        cls,
        path: str | Path,
        tokenizer: PreTrainedTokenizerBase,
        *,
        device: str | torch.device | None = None,
        dtype: str | None = None,
        trust_remote_code: bool = False,
        **options: Any,
    ) -> RewardModelFunction:
        """Load the reward stage's run folder (`load_reward_model`) as a reward function; `options` as `__init__`."""
        reward = load_reward_model(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        reward.model.requires_grad_(False)
        return cls(reward, tokenizer, **options)

    def input_ids(
        self, prompts: Sequence[Chat], completion_ids: Sequence[Sequence[int]]
    ) -> tuple[list[list[int]], list[bool]]:
        """What the reward model reads for each completion (prompt ids + completion ids through its first EOS),
        and whether the completion has an EOS."""
        completions, has_eos = _cut_after_eos(completion_ids, self.tokenizer.eos_token_id)
        unique = {repr(p): p for p in prompts}  # each prompt comes num_generations times: encode it once
        encoded = dict(zip(unique, encode_prompts(self.tokenizer, list(unique.values())), strict=True))
        ids = [encoded[repr(p)] + c for p, c in zip(prompts, completions, strict=True)]
        return ids, has_eos

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        chats = _chats(prompts)
        if completion_ids is not None:
            ids, has_eos = self.input_ids(chats, completion_ids)
        else:
            # Text alone: each completion is a whole assistant turn, its EOS written by the chat template.
            ids = reward_input_ids(self.tokenizer, chats, completion_texts(completions))
            has_eos = [True] * len(ids)
        raw = self.reward.raw_score_ids(ids, self.batch_size)
        scores = penalize_missing_eos(
            self.normalization.apply(raw), torch.tensor(has_eos, dtype=torch.bool), self.missing_eos_penalty
        )
        return scores.tolist()


class GoldJudgeFunction:
    """The tiny task's gold judge (`instruct_tune.tiny.gold.gold_score`, in [0, 1]) as a verifiable reward.

    The judge scores the answer against the prompt's answer key and halves the score of a completion without
    EOS itself; `tokenizer` (the policy's) tells which completions ended with EOS.
    """

    __name__ = "tiny_gold"

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    @staticmethod
    def check_prompts(prompts: Sequence[Chat], where: str = "prompts") -> None:
        """Refuse a prompt the gold judge cannot parse (only tiny-task prompts have an answer key)."""
        from instruct_tune.tiny.task import parse_prompt

        for row, prompt in enumerate(prompts, start=1):
            try:
                parse_prompt(last_user_text(prompt))
            except ValueError:
                raise ConfigError(
                    f"reward: tiny_gold scores only tiny-task prompts; {where} row {row} "
                    f"({last_user_text(prompt)[:80]!r}) is not one (use reward: reward_model)"
                ) from None

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        from instruct_tune.tiny.gold import gold_score

        chats = _chats(prompts)
        texts = completion_texts(completions)
        if completion_ids is not None:
            _, ended = _cut_after_eos(completion_ids, self.tokenizer.eos_token_id)
        else:
            ended = [True] * len(texts)
        return [
            gold_score(last_user_text(p), text, eos) for p, text, eos in zip(chats, texts, ended, strict=True)
        ]
