"""Fit prompts and chat histories into a model's context before generating.

A prompt plus its `max_new_tokens` must fit the positions the model reads (`max_position_embeddings`,
`n_positions`): past them a learned position table fails with `IndexError: index out of range in self`.
Longer prompts are cut from the left (the end, where the question and the generation prompt are, is kept)
with a warning; a chat drops its oldest turns (the system turn is kept) before any cutting.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedTokenizerBase

from instruct_tune.models.sampling import context_length, encode_prompts

__all__ = ["ContextBudget", "context_budget", "fit_prompt", "trim_history"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContextBudget:
    """The model's context (None: it declares none) and the new tokens generated within it."""

    context: int | None
    max_new_tokens: int

    @property
    def prompt_tokens(self) -> int | None:
        """The most prompt tokens that leave room for `max_new_tokens`."""
        return None if self.context is None else self.context - self.max_new_tokens


def context_budget(model: nn.Module, max_new_tokens: int) -> ContextBudget:
    """The budget of `model` for `max_new_tokens`; one that leaves no room for a prompt is halved to fit."""
    context = context_length(model)
    if context is not None and max_new_tokens >= context:
        fitted = max(1, context // 2)
        logger.warning(
            "--max-new-tokens %d leaves no room for a prompt in the model's context of %d tokens: generating "
            "at most %d new tokens",
            max_new_tokens,
            context,
            fitted,
        )
        max_new_tokens = fitted
    return ContextBudget(context, max_new_tokens)


def fit_prompt(ids: Sequence[int], budget: ContextBudget, what: str) -> list[int]:
    """`ids`, or their last `budget.prompt_tokens` tokens with a warning naming `what` when they are more."""
    limit = budget.prompt_tokens
    if limit is None or len(ids) <= limit:
        return list(ids)
    logger.warning(
        "%s has %d tokens, more than the %d the context leaves (%d positions - --max-new-tokens %d): kept its "
        "last %d tokens",
        what,
        len(ids),
        limit,
        budget.context,
        budget.max_new_tokens,
        limit,
    )
    return list(ids[-limit:])


def trim_history(
    tokenizer: PreTrainedTokenizerBase, history: Sequence[dict], budget: ContextBudget
) -> tuple[list[dict], list[int], int]:
    """Drop the oldest turns (a leading system turn stays) until the chat's prompt fits the budget.

    Returns the kept history, its prompt ids (cut from the left if the last message alone is too long) and
    the number of turns dropped.
    """
    kept = list(history)
    ids = encode_prompts(tokenizer, [kept])[0]
    limit, dropped = budget.prompt_tokens, 0
    first = 1 if kept and kept[0]["role"] == "system" else 0
    while limit is not None and len(ids) > limit and len(kept) - first > 1:
        # The oldest exchange: a user turn and the reply after it, so the roles still alternate.
        n = 2 if len(kept) - first > 2 and kept[first + 1]["role"] == "assistant" else 1
        del kept[first : first + n]
        dropped += n
        ids = encode_prompts(tokenizer, [kept])[0]
    return kept, fit_prompt(ids, budget, "the last message"), dropped
