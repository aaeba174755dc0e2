"""PPO rollouts: the `RolloutBackend` seam the trainer samples through, and its Hugging Face implementation.

The trainer never samples itself: it asks its backend for a `Rollout` of a prompt batch and calls
`sync_weights` after every policy update, so an engine holding its own copy of the policy (vLLM, SGLang, a
remote server) can plug in. The logprobs of PPO's ratio are always recomputed by the training model.

`HFRolloutBackend` samples with `generate` from the training model itself: a LoRA policy is merged for the
duration of sampling when the base allows it (not 4-bit), so sampling costs what the plain model costs, then
unmerged so training goes on with the adapter; `sync_weights` has nothing to do.

`make_rollout_backend` builds the one a config's `rollout_backend` names: `hf`, or `vllm`
(`instruct_tune.ppo.vllm_rollout.VLLMRolloutBackend`, imported only then).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from instruct_tune.models.sampling import Rollout, left_pad, sample_responses
from instruct_tune.ppo.adapters import POLICY, active_adapter

__all__ = [
    "HFRolloutBackend",
    "RolloutBackend",
    "make_rollout_backend",
    "rollout_on",
    "sample_rollout",
    "sampling_policy",
]


@runtime_checkable
class RolloutBackend(Protocol):
    """What PPO samples its rollouts with (one instance per process)."""

    def generate(self, prompts: Sequence[Sequence[int]], *, seed: int | None = None) -> Rollout:
        """One response per prompt (token id lists): left-padded prompts, responses cut after their first EOS.

        `seed`: reproducible samples that leave the global RNG as it was (evaluation); None: the global RNG.
        The tensors may be on any device: the trainer moves them to its own.
        """
        ...

    def sync_weights(self) -> None:
        """Make the next `generate` sample from the policy's current weights (called after every update)."""
        ...


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


class HFRolloutBackend:
    """Samples with `generate` from the training policy itself (its weights are the current ones: no sync)."""

    def __init__(
        self,
        policy: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        device: torch.device | str | None = None,
    ) -> None:
        self.policy = policy
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.device = device  # None: the policy's

    @classmethod
    def from_args(
        cls, policy: nn.Module, tokenizer: PreTrainedTokenizerBase, args: Any, **overrides: Any
    ) -> HFRolloutBackend:
        """The backend with the sampling options of a `PPOStageConfig` (`overrides` win)."""
        options = {
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "top_p": args.top_p,
        }
        return cls(policy, tokenizer, **{**options, **overrides})

    def generate(self, prompts: Sequence[Sequence[int]], *, seed: int | None = None) -> Rollout:
        """Left-pad the prompts and sample one response each (see `RolloutBackend.generate`)."""
        query, query_mask = left_pad(prompts, self.tokenizer.pad_token_id)
        device = self.device if self.device is not None else next(self.policy.parameters()).device
        return sample_rollout(
            self.policy,
            self.tokenizer,
            query.to(device),
            query_mask.to(device),
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            generator_seed=seed,
        )

    def sync_weights(self) -> None:
        """Nothing to do: `generate` reads the training weights."""


def make_rollout_backend(
    args: Any, policy: nn.Module, tokenizer: PreTrainedTokenizerBase, device: torch.device | str | None = None
) -> RolloutBackend:
    """The rollout backend of a `PPOStageConfig` (`rollout_backend`) for this process's unwrapped policy.

    `device`: where the HF backend's prompts go (the vLLM engine takes this process's GPU, `LOCAL_RANK`).
    """
    backend = getattr(args, "rollout_backend", "hf")
    if backend == "hf":
        return HFRolloutBackend.from_args(policy, tokenizer, args, device=device)
    if backend == "vllm":
        from instruct_tune.ppo.vllm_rollout import VLLMRolloutBackend

        return VLLMRolloutBackend.from_args(policy, tokenizer, args, device=device)
    raise ValueError(f"rollout_backend: {backend!r} is not one of hf, vllm")


def rollout_on(rollout: Rollout, device: torch.device | str) -> Rollout:
    """`rollout` with every tensor on `device` (no copy of those already there)."""
    moved = {f.name: getattr(rollout, f.name).to(device) for f in dataclasses.fields(rollout)}
    return Rollout(**moved)
