"""Scoring a rollout: the no-grad forwards (policy, reference, value, reward) and the batch PPO updates on."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from instruct_tune.models.sampling import Rollout
from instruct_tune.ppo import core
from instruct_tune.ppo.models import PolicyAndValue, PPOModels

__all__ = ["ScoredBatch", "forward_rollout", "response_slice"]


@dataclass
class ScoredBatch:
    """A rollout with everything the PPO update needs, aligned on response tokens."""

    rollout: Rollout
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    kl: torch.Tensor
    non_score_reward: torch.Tensor


def response_slice(per_position: torch.Tensor, rollout: Rollout) -> torch.Tensor:
    """Outputs at the positions that predict the response tokens (column P-1 predicts token P)."""
    start = rollout.prompt_length - 1
    return per_position[:, start : start + rollout.response.shape[1]]


@torch.no_grad()
def forward_rollout(
    trainable: PolicyAndValue,
    models: PPOModels,
    rollout: Rollout,
    *,
    temperature: float,
    chunk: int | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> dict[str, torch.Tensor]:
    """Policy and reference logprobs, entropy, values and raw reward scores of a rollout, `chunk` rows at a
    time (default: all); logprobs at the sampling `temperature`, forwards under `autocast()`."""
    chunk = chunk or len(rollout.query)
    parts: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("logprobs", "ref_logprobs", "values", "scores", "entropy")
    }
    for start in range(0, len(rollout.query), chunk):
        part = rollout.select(torch.arange(start, min(start + chunk, len(rollout.query))))
        ids, mask, length = part.input_ids, part.attention_mask, part.response.shape[1]
        with autocast():
            logits, values = trainable(ids, mask, length)
            ref_logits = models.ref_logits(ids, mask, length)
            scores = models.raw_scores(ids, mask, part.last_index)
        parts["logprobs"].append(core.logprobs_from_logits(logits, part.response, temperature))
        parts["entropy"].append(core.entropy_from_logits(logits, temperature))
        parts["ref_logprobs"].append(core.logprobs_from_logits(ref_logits, part.response, temperature))
        parts["values"].append(values.float())
        parts["scores"].append(scores.float())
    return {k: torch.cat(v) for k, v in parts.items()}
