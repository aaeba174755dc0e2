"""Preference data as one row per prompt, tokenised as a reward model reads it.

    groups = group_comparisons(pairs)                       # K-way rankings back together
    groups = tokenize_groups(groups, tokenizer, max_length=512)

**Grouping.** InstructGPT trains on all C(K,2) comparisons of a K-way ranking as one batch element, because
spreading them over the epoch as independent pairs makes each response appear K-1 times and the model
overfits. Every preference source (pairs or rankings; the data layer expands a ranking into its pairs
sharing a `group_id`) is regrouped here into one row per prompt: its distinct responses and the (better,
worse) index pairs among them.

**Tokenisation.** `reward_input_ids` is the one rendering of a (prompt, response) for a reward model, used in
training, evaluation and scoring alike: the prompt messages plus one assistant turn through the tokenizer's
chat template, cut after the turn's EOS, where the reward is read.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from instruct_tune.config import ConfigError

logger = logging.getLogger(__name__)

Message = Mapping[str, str]
Prompt = str | Sequence[Message]


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    """A prompt as chat messages: a string is one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(message) for message in prompt]


def reward_input_ids(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], responses: Sequence[str]
) -> list[list[int]]:
    """Token ids the reward model reads for each (prompt, response): prompt + assistant turn, chat template.

    The one tokenisation of reward-model inputs, used in training, evaluation and scoring alike: what
    `trl.RewardTrainer` does for conversational data (`apply_chat_template(prompt + completion)`), cut after
    the turn's EOS. Templates that write text after EOS (ChatML's `<|im_end|>` then a newline) would put the
    reward on that text, while PPO reads it at the EOS its policy samples end with.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        return []
    conversations = [
        as_messages(prompt) + [{"role": "assistant", "content": response}]
        for prompt, response in zip(prompts, responses, strict=True)
    ]
    encoded = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True)
    return [through_last_eos(list(ids), tokenizer.eos_token_id) for ids in encoded["input_ids"]]


def through_last_eos(ids: list[int], eos_token_id: int | None) -> list[int]:
    """`ids` up to and including its last EOS (all of it when it has none)."""
    if eos_token_id is not None:
        for end in range(len(ids) - 1, -1, -1):
            if ids[end] == eos_token_id:
                return ids[: end + 1]
    return ids


def _response_text(messages: Sequence[Mapping[str, str]]) -> str:
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise ValueError(f"a preference response must be one assistant turn (got {len(messages)} messages)")
    return messages[0]["content"]


def group_comparisons(pairs: Dataset) -> Dataset:
    """Regroup preference pairs into one row per prompt (`group_id`; a row without one is its own group).

    Output rows: `prompt`, `responses` (distinct texts), `better`/`worse` (indices into `responses`, one entry
    per pair), `margin` (per pair, 0.0 where the data gives none), `task`, `group_id`.
    """
    columns = pairs.to_dict()  # one conversion of each column: row-wise access into Arrow is slow
    group_ids = columns.get("group_id", list(range(len(pairs))))
    margins = columns.get("margin", [None] * len(pairs))
    tasks = columns.get("task", [None] * len(pairs))
    groups: dict[Any, dict[str, Any]] = {}
    for i, (group_id, prompt, chosen, rejected) in enumerate(
        zip(group_ids, columns["prompt"], columns["chosen"], columns["rejected"], strict=True)
    ):
        group = groups.get(group_id)
        if group is None:
            group = groups[group_id] = {
                "prompt": prompt,
                "responses": [],
                "better": [],
                "worse": [],
                "margin": [],
                "task": tasks[i],
                "group_id": group_id,
                "_index": {},
            }
        elif prompt != group["prompt"]:
            raise ValueError(f"group_id {group_id}: pairs with different prompts cannot be one ranking")
        index = group["_index"]
        for text in (_response_text(chosen), _response_text(rejected)):
            if text not in index:
                index[text] = len(group["responses"])
                group["responses"].append(text)
        group["better"].append(index[_response_text(chosen)])
        group["worse"].append(index[_response_text(rejected)])
        group["margin"].append(0.0 if margins[i] is None else float(margins[i]))
    rows = [{k: v for k, v in group.items() if k != "_index"} for group in groups.values()]
    if all(row["task"] is None for row in rows):
        for row in rows:
            del row["task"]
    return Dataset.from_list(rows)


def tokenize_groups(
    groups: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int | None, what: str = "train"
) -> Dataset:
    """Add `input_ids` (one list per response) and `length` (tokens of the prompt's responses together).

    Responses over `max_length` tokens are dropped with their pairs, and prompts left without a pair;
    `what` names the set (train or eval) in the messages.
    """

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        prompts = [p for p, rs in zip(batch["prompt"], batch["responses"], strict=True) for _ in rs]
        flat = reward_input_ids(tokenizer, prompts, [r for rs in batch["responses"] for r in rs])
        out: dict[str, list] = {key: [] for key in ("input_ids", "better", "worse", "margin", "length")}
        start = 0
        for responses, better, worse, margin in zip(
            batch["responses"], batch["better"], batch["worse"], batch["margin"], strict=True
        ):
            ids = flat[start : start + len(responses)]
            start += len(responses)
            keep = [i for i, seq in enumerate(ids) if max_length is None or len(seq) <= max_length]
            new_index = {old: new for new, old in enumerate(keep)}
            pairs = [
                (new_index[win], new_index[lose], m)
                for win, lose, m in zip(better, worse, margin, strict=True)
                if win in new_index and lose in new_index
            ]
            out["input_ids"].append([ids[i] for i in keep])
            out["better"].append([p[0] for p in pairs])
            out["worse"].append([p[1] for p in pairs])
            out["margin"].append([p[2] for p in pairs])
            # the sort key of `train_sampling_strategy: group_by_length`
            out["length"].append(sum(len(ids[i]) for i in keep))
        return out

    n_pairs = sum(len(b) for b in groups["better"])
    tokenized = groups.map(tokenize, batched=True, batch_size=512, desc="Tokenizing comparisons")
    tokenized = tokenized.filter(lambda row: len(row["better"]) > 0)
    kept = sum(len(b) for b in tokenized["better"])
    if kept < n_pairs:
        logger.warning(
            "%s set: dropped %d of %d comparisons with a response over max_length=%s tokens (%d of %d prompts left)",
            what,
            n_pairs - kept,
            n_pairs,
            max_length,
            len(tokenized),
            len(groups),
        )
    if len(tokenized) == 0:
        raise ConfigError(
            f"{what} set: no comparison fits in max_length={max_length} tokens (prompt and response together): "
            "raise max_length (up to the model's context) or give shorter comparisons"
        )
    return tokenized
