"""Sampling from a causal LM: chat prompts left padded, `generate` with the KV cache, responses cut after EOS.

One sampler for every stage that needs policy samples: PPO rollouts, the reward normalisation, comparison
labelling and evaluation. Prompts are left padded so every response starts at the same column.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from instruct_tune.models.prompt_encoding import encode_chats


def first_eos_mask(
    responses: torch.Tensor, eos_token_id: int | list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of the tokens up to and including each response's first EOS, and whether it has one.

    A response without EOS keeps all its tokens (it was cut at `max_new_tokens`).
    """
    eos_ids = torch.as_tensor(eos_token_id, device=responses.device).reshape(-1)
    is_eos = torch.isin(responses, eos_ids)
    has_eos = is_eos.any(dim=1)
    # Number of EOS strictly before each position: 0 means "still inside the response".
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (eos_before == 0).long(), has_eos


def truncate_after_eos(
    responses: torch.Tensor, eos_token_id: int | list[int], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace everything after each response's first EOS by padding; returns `(responses, mask, has_eos)`."""
    mask, has_eos = first_eos_mask(responses, eos_token_id)
    return responses.masked_fill(mask == 0, pad_token_id), mask, has_eos


@dataclass
class Rollout:
    """Left-padded prompts and their sampled responses (padding after the first EOS)."""

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
    """Token ids of each chat prompt up to the assistant's turn (chat template with generation prompt).

    Special-token strings typed into a message (`<|endoftext|>`) are tokenized as text, not as control tokens.
    """
    return encode_chats(tokenizer, prompts, add_generation_prompt=True)


# Config attributes that bound the positions a model takes, in the order they are looked up.
CONTEXT_ATTRIBUTES = ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length")


def config_context(config: Any) -> tuple[int, str] | None:
    """`(limit, attribute)`: the positions a model config allows and the key that says so (None: no limit)."""
    if config is None:
        return None
    values = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    for name in CONTEXT_ATTRIBUTES:
        value = values.get(name)
        if isinstance(value, int) and value > 0:
            return value, name
    return None


def context_length(model: nn.Module) -> int | None:
    """The most positions the model reads (its config's position limit), or None when it declares none."""
    found = config_context(getattr(model, "config", None))
    return found[0] if found else None


def prompts_that_fit(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Sequence[dict]], max_tokens: int | None
) -> list[int]:
    """Indices of the chat prompts whose tokens (with the generation prompt) number at most `max_tokens`."""
    if max_tokens is None:
        return list(range(len(prompts)))
    return [i for i, ids in enumerate(encode_prompts(tokenizer, prompts)) if len(ids) <= max_tokens]


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


@torch.no_grad()
def sample_responses(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator_seed: int | None = None,
    streamer: Any = None,
) -> Rollout:
    """One response per left-padded prompt (temperature 0: greedy; no top-k), cut after its first EOS.

    With `generator_seed` the samples are reproducible and the global RNG is left as it was; a transformers
    `streamer` receives the tokens as they come (one prompt only).
    """
    do_sample = temperature > 0
    sample_kwargs = {"temperature": temperature, "top_p": top_p, "top_k": 0} if do_sample else {}
    devices = [query.device] if query.device.type == "cuda" else []
    fork = torch.random.fork_rng(devices=devices) if generator_seed is not None else nullcontext()
    with fork:
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        # The model stays in its mode: stage models have every dropout off, and bitsandbytes repacks 4-bit
        # weights for CPU inference on an eval-mode forward, after which they can no longer train.
        out = model.generate(
            input_ids=query,
            attention_mask=query_mask,
            do_sample=do_sample,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
            streamer=streamer,
            **sample_kwargs,
        )
    response, mask, has_eos = truncate_after_eos(
        out[:, query.shape[1] :], tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    return Rollout(query, query_mask, response, mask, has_eos)


def decode_responses(tokenizer: PreTrainedTokenizerBase, rollout: Rollout) -> list[str]:
    """Response texts without special tokens."""
    return tokenizer.batch_decode(rollout.response, skip_special_tokens=True)


def sample_batches(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Sequence[dict]], **sampling: Any
) -> Iterator[Rollout]:
    """Sample one response per chat prompt, `batch_size` prompts at a time, each batch seeded `seed + first row`
    (the options of `sample_id_batches`)."""
    yield from sample_id_batches(model, tokenizer, encode_prompts(tokenizer, prompts), **sampling)


def sample_id_batches(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> Iterator[Rollout]:
    """`sample_batches` for prompts already encoded (token id lists), e.g. cut to fit the context."""
    device = next(model.parameters()).device
    for start in range(0, len(ids), batch_size):
        query, mask = left_pad(ids[start : start + batch_size], tokenizer.pad_token_id)
        yield sample_responses(
            model,
            tokenizer,
            query.to(device),
            mask.to(device),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            generator_seed=seed + start,
        )


def sample_texts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[dict]],
    **sampling: Any,
) -> tuple[list[str], list[bool]]:
    """Sample one response per chat prompt (options of `sample_batches`); returns the texts and whether each
    ended with EOS."""
    texts: list[str] = []
    ended: list[bool] = []
    for rollout in sample_batches(model, tokenizer, prompts, **sampling):
        texts.extend(decode_responses(tokenizer, rollout))
        ended.extend(rollout.has_eos.tolist())
    return texts, ended


def penalize_missing_eos(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Subtract `penalty` from the score of every response that did not end with EOS."""
    if not penalty:
        return scores
    return torch.where(has_eos, scores, scores - penalty)
