"""Rollouts: prompts in, sampled responses out, in the layout the PPO arithmetic expects.

Prompts are left padded so that every response starts at the same column; responses are cut after their
first EOS. Sampling uses `generate` (KV cache); a LoRA policy is merged into its base for the duration of
sampling when the base allows it (not 4-bit), so sampling costs what the plain model costs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from instruct_tune.ppo.core import truncate_after_eos
from instruct_tune.ppo.models import POLICY, active_adapter


@dataclass
class Rollout:
    """Left-padded prompts and their responses (padding after the first EOS)."""

    query: torch.Tensor  # [batch, prompt_len]
    query_mask: torch.Tensor
    response: torch.Tensor  # [batch, response_len]
    response_mask: torch.Tensor
    has_eos: torch.Tensor  # [batch] bool

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query, self.response], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)

    @property
    def prompt_length(self) -> int:
        return self.query.shape[1]

    @property
    def last_index(self) -> torch.Tensor:
        """Column of each response's last token (its EOS when it has one)."""
        return self.prompt_length + self.response_mask.sum(dim=1).clamp(min=1) - 1

    def select(self, rows: torch.Tensor) -> Rollout:
        return Rollout(
            self.query[rows],
            self.query_mask[rows],
            self.response[rows],
            self.response_mask[rows],
            self.has_eos[rows],
        )


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Sequence[dict]]) -> list[list[int]]:
    """Token ids of each chat prompt up to the assistant's turn (chat template with generation prompt)."""
    encoded = tokenizer.apply_chat_template(
        [list(p) for p in prompts], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return [list(ids) for ids in encoded["input_ids"]]


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists; returns `(ids, mask)`."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, length - len(seq) :] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, length - len(seq) :] = 1
    return ids, mask


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


@torch.no_grad()
def sample_responses(
    policy: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator_seed: int | None = None,
    merge: bool = True,
) -> Rollout:
    """Sample one response per left-padded prompt (temperature 0: greedy) and cut it after its first EOS."""
    do_sample = temperature > 0
    sample_kwargs = {"temperature": temperature, "top_p": top_p, "top_k": 0} if do_sample else {}
    fork = torch.random.fork_rng(devices=[]) if generator_seed is not None else nullcontext()
    with fork, sampling_policy(policy, merge) as model:
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        # The model stays in its mode: PPO models have every dropout off, and bitsandbytes repacks 4-bit
        # weights for CPU inference on an eval-mode forward, after which they can no longer train.
        out = model.generate(
            input_ids=query,
            attention_mask=query_mask,
            do_sample=do_sample,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
            **sample_kwargs,
        )
    response, mask, has_eos = truncate_after_eos(
        out[:, query.shape[1] :], tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    return Rollout(query, query_mask, response, mask, has_eos)


def decode_responses(tokenizer: PreTrainedTokenizerBase, rollout: Rollout) -> list[str]:
    """Response texts without special tokens."""
    return tokenizer.batch_decode(rollout.response, skip_special_tokens=True)
