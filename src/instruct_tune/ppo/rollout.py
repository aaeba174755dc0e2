"""PPO rollouts: the policy adapter merged into its base while it samples (`models.sampling` does the rest).

A LoRA policy is merged for the duration of sampling when the base allows it (not 4-bit), so sampling costs
what the plain model costs, then unmerged so training goes on with the adapter.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from instruct_tune.models.sampling import Rollout, sample_responses
from instruct_tune.ppo.models import POLICY, active_adapter


def _can_merge(model: nn.Module) -> bool:
    if not isinstance(model, PeftModel):
        return False
    return not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


@contextmanager
def sampling_policy(policy: nn.Module, merge: bool = True) -> Iterator[nn.Module]:
    """The policy ready to sample: LoRA merged into the base (and unmerged after) where possible."""
    if not isinstance(policy, PeftModel):
        yield policy
        return
    with active_adapter(policy, POLICY):
        if merge and _can_merge(policy):
            policy.base_model.merge_adapter([POLICY])
            try:
                yield policy
            finally:
                policy.base_model.unmerge_adapter()
        else:
            yield policy


def sample_rollout(
    policy: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    generator_seed: int | None = None,
) -> Rollout:
    """Sample one response per left-padded prompt from the policy (merged while it samples)."""
    with sampling_policy(policy) as model:
        return sample_responses(
            model,
            tokenizer,
            query,
            query_mask,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            generator_seed=generator_seed,
        )
