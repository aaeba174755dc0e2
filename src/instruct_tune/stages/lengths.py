"""Token lengths against the model's context and against `max_length`: checked, or counted and reported.

- `model_context`: the most positions a checkpoint (or run folder, through its adapter chain) takes.
- `check_fits_context`: a stage's token budget (SFT/reward `max_length`, PPO prompt + response) must fit it,
  or the stage stops naming the option and the model's limit (a GPT-2 fed more positions fails deep in torch
  with "index out of range in self").
- `sft_row_losses`: the rows TRL's SFT preparation dropped (prompt alone filling `max_length`) or cut
  (completion truncated, EOS lost), counted for the log and metrics.json, and refused above
  `max_dropped_share`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from transformers import AutoConfig

from instruct_tune.config import ConfigError
from instruct_tune.models.sampling import config_context

logger = logging.getLogger(__name__)



def model_context(source: str, *, trust_remote_code: bool = False) -> tuple[int, str] | None:
    """`(limit, attribute)`: the positions the model of `source` takes and the config key that says so.

    `source` may be a run folder holding an adapter: its root checkpoint's config counts. None when the
    config names no limit.
    """
    from instruct_tune.models import adapter_chain

    root, _ = adapter_chain(source)
    return config_context(AutoConfig.from_pretrained(root, trust_remote_code=trust_remote_code))


def check_fits_context(
    stage: str, option: str, tokens: int, context: tuple[int, str] | None, source: str
) -> None:
    """Refuse a token budget (`option` = `tokens`) above the model's context, naming both."""
    if context is None or tokens <= context[0]:
        return
    limit, attribute = context
    raise ConfigError(
        f"{stage}: {option} {tokens} exceeds the model's context ({source}: {attribute} {limit}); set "
        f"{option} to at most {limit}"
    )


def fit_max_length(stage: str, args: Any, context: tuple[int, str] | None, source: str) -> None:
    """Check `args.max_length` against the model's context; an unset one (TRL's default) is lowered to it.

    A `max_length` left at its default (1024 in TRL) on a model with a shorter context is not the user's
    choice: it becomes the context, with a log line. A value set above the context is refused.
    """
    default = next((f.default for f in dataclasses.fields(args) if f.name == "max_length"), None)
    if context is not None and args.max_length == default and args.max_length > context[0]:
        logger.warning(
            "%s: max_length %d (the default) exceeds the model's context (%s %d): using %d",
            stage,
            args.max_length,
            context[1],
            context[0],
            context[0],
        )
        args.max_length = context[0]
        return
    check_fits_context(stage, "max_length", args.max_length, context, source)


def _full_length(tokenizer: Any, row: Mapping[str, Any], chat_template: str | None) -> int:
    """Tokens of a chat row before truncation, rendered as TRL renders it (prompt + completion, or messages)."""
    chat = list(row["messages"]) if "messages" in row else list(row["prompt"]) + list(row["completion"])
    ids = tokenizer.apply_chat_template(chat, tokenize=True, chat_template=chat_template)
    return len(ids["input_ids"] if isinstance(ids, Mapping) else ids)


def _cut_rows(trainer: Any, dataset: Any, max_length: int) -> int:
    """Rows of a prepared (unpacked) dataset that TRL truncated to `max_length`.

    Only rows exactly `max_length` long can have been cut; those are rendered again to tell a cut row from one
    that fits exactly.
    """
    lengths = [len(ids) for ids in dataset["input_ids"]]
    candidates = [i for i, n in enumerate(lengths) if n >= max_length]
    if not candidates:
        return 0
    chat_template = getattr(trainer, "chat_template", None)
    tokenizer = trainer.processing_class
    rows = dataset.select(candidates)
    if not any(c in rows.column_names for c in ("messages", "prompt")):
        return len(candidates)  # the source text is gone: every row at the limit counts as cut
    return sum(_full_length(tokenizer, row, chat_template) > max_length for row in rows)


def _packed_cut_chats(dataset: Any, max_length: int, strategy: str) -> int:
    """Chats TRL's `bfd` packing truncated to `max_length` (at most: a chat exactly that long counts too)."""
    if strategy != "bfd" or "seq_lengths" not in dataset.column_names:
        return 0
    return sum(n >= max_length for lengths in dataset["seq_lengths"] for n in lengths)


def length_losses(
    stage: str,
    split: str,
    given: int,
    dropped: int,
    cut: int,
    max_length: int,
    max_dropped_share: float,
    *,
    unit: str = "rows",
    cut_means: str,
) -> dict[str, int]:
    """The counts of one split's `unit` that `max_length` dropped (the prompt alone fills it) or cut
    (`cut_means`, EOS lost): `<split>_<unit>`, `_dropped`, `_truncated`. Nothing left, or a share above
    `max_dropped_share`, is refused naming the stage and the figures; any other loss is logged."""
    counts = {f"{split}_{unit}": given, f"{split}_{unit}_dropped": dropped, f"{split}_{unit}_truncated": cut}
    if not dropped and not cut:
        return counts
    what = (
        f"max_length {max_length} drops {dropped} of {given} {split} {unit} (the prompt alone fills it) and "
        f"cuts {cut} ({cut_means}, EOS lost)"
    )
    share = (dropped + cut) / max(given, 1)
    if dropped >= given or share > max_dropped_share:
        why = f"no {unit[:-1]} is left" if dropped >= given else f"{share:.0%} > max_dropped_share {max_dropped_share:g}"
        raise ConfigError(
            f"{stage}: {what}: {why}. Raise max_length (up to the model's context), shorten or filter the data "
            "(`instruct-tune data check`), or raise max_dropped_share"
        )
    logger.warning("%s: %s (%.1f%% of the %s; counted in metrics.json)", stage, what, 100 * share, unit)
    return counts


def sft_row_losses(trainer: Any, rows_in: Mapping[str, int], max_dropped_share: float) -> dict[str, int]:
    """Count the SFT rows `max_length` dropped or cut, per split; refuse a share above `max_dropped_share`.

    `rows_in` maps "train"/"eval" to the rows given to the trainer. Returns `<split>_rows`,
    `<split>_rows_dropped` and `<split>_rows_truncated` for metrics.json.
    """
    args = trainer.args
    max_length = args.max_length
    prepared = {"train": trainer.train_dataset, "eval": trainer.eval_dataset}
    counts: dict[str, int] = {}
    for split, given in rows_in.items():
        dataset = prepared.get(split)
        if dataset is None or max_length is None:
            continue
        if args.packing:
            dropped, cut = 0, _packed_cut_chats(dataset, max_length, args.packing_strategy)
        else:
            dropped, cut = given - len(dataset), _cut_rows(trainer, dataset, max_length)
        counts |= length_losses(
            "sft", split, given, dropped, cut, max_length, max_dropped_share, cut_means="completion truncated"
        )
    return counts


def prompt_budget(
    stage: str, max_prompt_length: int, max_new_tokens: int, context: tuple[int, str] | None, source: str
) -> tuple[int, str]:
    """The longest prompt a sampling stage keeps, and its description for messages ("max_prompt_length 256").

    A prompt and its `max_new_tokens` must fit the model's context: a `max_new_tokens` that leaves no room is
    an error naming both; otherwise the prompt limit is cut to the room left, so longer prompts are skipped
    (and counted) instead of crashing the model.
    """
    if context is None:
        return max_prompt_length, f"max_prompt_length {max_prompt_length}"
    limit, attribute = context
    if max_new_tokens >= limit:
        raise ConfigError(
            f"{stage}: max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's context "
            f"({source}: {attribute} {limit}); set max_new_tokens below {limit}"
        )
    room = limit - max_new_tokens
    if room < max_prompt_length:
        return room, f"{room} tokens ({source}: {attribute} {limit} less max_new_tokens {max_new_tokens})"
    return max_prompt_length, f"max_prompt_length {max_prompt_length}"


def prompts_in_context(
    tokenizer: Any, prompts: list, model: Any, max_new_tokens: int, where: str
) -> list[int]:
    """Indices of the chat `prompts` that fit the model's context with `max_new_tokens` after them.

    Longer prompts are skipped and counted in the log (as PPO skips prompts over `max_prompt_length`); none
    fitting, or `max_new_tokens` alone filling the context, is an error naming `where` and the limit.
    """
    from instruct_tune.models.sampling import context_length, prompts_that_fit

    limit = context_length(model)
    if limit is None:
        return list(range(len(prompts)))
    if max_new_tokens >= limit:
        raise ConfigError(
            f"eval: max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's context of "
            f"{limit} positions; set max_new_tokens below {limit}"
        )
    keep = prompts_that_fit(tokenizer, prompts, limit - max_new_tokens)
    why = f"{limit - max_new_tokens} tokens (the model's {limit} positions less max_new_tokens {max_new_tokens})"
    if not keep:
        raise ConfigError(f"eval: {where}: none of the {len(prompts)} prompts fits {why}")
    if len(keep) < len(prompts):
        logger.warning(
            "%s: skipped %d of %d prompts longer than %s", where, len(prompts) - len(keep), len(prompts), why
        )
    return keep
