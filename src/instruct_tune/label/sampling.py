"""The items of a new project: K sampled responses of a policy run folder per prompt, or responses from a file.

Sampling goes through the one loader and sampler of the package (``generate.load_policy``,
``sampling.sample_id_batches``): pass ``j`` of the K is seeded ``seed + 10_000 * j``, so the same folder, file
and options give the same items. Prompts longer than the context leaves room for are cut from the left, as
``instruct-tune generate`` does. Duplicate (after stripping) and empty responses are dropped, since a ranking
cannot order two equal answers; a prompt left with fewer than two responses is skipped and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from instruct_tune.data.preference_formats import MAX_RESPONSES
from instruct_tune.label.db import Item, ProjectError

logger = logging.getLogger(__name__)

# Columns of an item's source row that are not carried into the export as extra columns.
RESERVED = frozenset(
    {"prompt", "responses", "ranking", "scores", "messages", "prompt_id", "n_labelers", "labeler"}
)


def _extra(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in RESERVED and isinstance(v, (str, int, float, bool))}


def distinct_responses(responses: Sequence[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """The responses without empty ones and repeats (compared stripped), first occurrence kept."""
    seen: set[str] = set()
    kept = []
    for text, ended in responses:
        key = text.strip()
        if key and key not in seen:
            seen.add(key)
            kept.append((text, ended))
    return kept


def _items(
    rows: Sequence[Mapping[str, Any]], responses: Sequence[Sequence[tuple[str, bool]]]
) -> tuple[list[Item], int]:
    items, skipped = [], 0
    for row, candidates in zip(rows, responses, strict=True):
        kept = distinct_responses(candidates)
        if len(kept) < 2:
            skipped += 1
            continue
        items.append(Item(prompt=list(row["prompt"]), responses=kept, extra=_extra(row)))
    return items, skipped


def _chat(prompt: Any) -> list[dict[str, str]]:
    return [dict(m) for m in prompt] if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def read_prompt_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a prompt file in any format the package reads as prompts (``prompt`` as chat messages)."""
    from instruct_tune.data import load_source

    ds, _ = load_source(str(path), "prompts")
    return [{**row, "prompt": _chat(row["prompt"])} for row in ds]


def items_from_responses(path: str | Path) -> tuple[list[Item], int]:
    """Items of a file of ``{"prompt": ..., "responses": [...]}`` rows (JSONL, JSON, Parquet, CSV, a ranking
    file...; the prompt a string or chat messages); returns them and how many prompts were skipped for having
    fewer than two distinct responses."""
    from instruct_tune.data import DataError, read_source
    from instruct_tune.data.messages import prompt_turns
    from instruct_tune.data.parsing import RowProblem

    raw = read_source(str(path))
    if not {"prompt", "responses"} <= set(raw.columns):
        raise ProjectError(
            f"{path}: rows need 'prompt' and 'responses' columns (found {', '.join(raw.columns)})"
        )
    rows, responses = [], []
    for n, row in raw:
        if isinstance(row, DataError):
            raise ProjectError(str(row))
        got = row.get("responses")
        if not isinstance(got, list) or not all(isinstance(r, str) for r in got):
            raise ProjectError(f"{path}: row {n}: 'responses' is not a list of strings")
        if len(got) > MAX_RESPONSES:
            raise ProjectError(
                f"{path}: row {n}: {len(got)} responses (a ranking takes at most {MAX_RESPONSES})"
            )
        try:
            prompt = prompt_turns(row.get("prompt"))
        except RowProblem as e:
            raise ProjectError(f"{path}: row {n}: {e}") from None
        if not prompt or prompt[-1]["role"] != "user":
            raise ProjectError(f"{path}: row {n}: the prompt does not end with a user turn")
        rows.append({**row, "prompt": prompt})
        responses.append([(r, True) for r in got])
    return _items(rows, responses)


def sample_items(
    policy: str,
    prompts_path: str | Path,
    k: int,
    *,
    seed: int = 0,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 32,
) -> tuple[list[Item], int]:
    """Items of ``k`` samples of the ``policy`` run folder (or Hub id) per prompt of ``prompts_path``;
    returns them and how many prompts were skipped for having fewer than two distinct responses."""
    if not 2 <= k <= MAX_RESPONSES:
        raise ProjectError(f"-k {k}: a ranking needs 2 to {MAX_RESPONSES} responses per prompt")
    if temperature <= 0:
        raise ProjectError("--temperature must be above 0: greedy decoding gives K equal responses")
    import torch

    from instruct_tune.generate import load_policy
    from instruct_tune.models.prompt_fit import context_budget, fit_prompt
    from instruct_tune.models.sampling import decode_responses, encode_prompts, sample_id_batches

    rows = read_prompt_rows(prompts_path)
    model, tokenizer = load_policy(policy)
    budget = context_budget(model, max_new_tokens)
    encoded = encode_prompts(tokenizer, [row["prompt"] for row in rows])
    ids = [fit_prompt(x, budget, f"{prompts_path}: prompt {i}") for i, x in enumerate(encoded, 1)]
    samples: list[list[tuple[str, bool]]] = [[] for _ in rows]
    with torch.no_grad():
        for j in range(k):
            at = 0
            batches = sample_id_batches(
                model,
                tokenizer,
                ids,
                max_new_tokens=budget.max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed + 10_000 * j,
                batch_size=batch_size,
            )
            for rollout in batches:
                texts = decode_responses(tokenizer, rollout)
                for text, ended in zip(texts, rollout.has_eos.tolist(), strict=True):
                    samples[at].append((text.strip(), bool(ended)))
                    at += 1
    logger.info("sampled %d responses for each of %d prompts from %s", k, len(rows), policy)
    return _items(rows, samples)
