"""Parsers of the preference formats (preference, hh_rlhf, sharegpt_preference, ranking).

Each parser reads one source row into a prompt plus a deferred list of (chosen, rejected) pairs; rankings
of K responses give every one of their K*(K-1)/2 pairs. ``formats.py`` registers the parsers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from .messages import SHAREGPT_ROLES, message, message_list, prompt_turns, sharegpt_conversation
from .parsing import Example, Message, Pairs, RowProblem, as_text, column, type_name
from .values import finite_number

__all__ = [
    "MAX_RESPONSES",
    "is_hh_text",
    "parse_hh",
    "parse_preference",
    "parse_ranking",
    "parse_sharegpt_preference",
]

MAX_RESPONSES = 9

_HH_SPLIT = re.compile(r"\n\n(Human|Assistant):")


def is_hh_text(value: Any) -> bool:
    """Whether ``value`` looks like HH-RLHF dialogue text (``Human: ... Assistant: ...``)."""
    return isinstance(value, str) and "\n\nAssistant:" in value and bool(re.search(r"(^|\n\n)Human:", value))


# --- chosen + rejected (+ prompt) ----------------------------------------------------------------------


def _response(value: Any, what: str) -> tuple[list[Message], str]:
    """Split a chosen/rejected value into (conversation before the response, response text)."""
    if isinstance(value, str):
        return [], value
    msgs = message_list(value, what)
    if not msgs:
        raise RowProblem(f"{what} is empty")
    if msgs[-1]["role"] != "assistant":
        raise RowProblem(f"{what} does not end with an assistant turn (its last turn has role '{msgs[-1]['role']}')")
    return msgs[:-1], msgs[-1]["content"]


def parse_preference(row: Mapping[str, Any], row_num: int) -> Example:
    """``chosen`` + ``rejected``, strings or conversations, with the prompt in ``prompt`` or before them."""
    chosen_prefix, chosen = _response(column(row, "chosen"), "chosen")
    rejected_prefix, rejected = _response(column(row, "rejected"), "rejected")
    if chosen_prefix and rejected_prefix and chosen_prefix != rejected_prefix:
        raise RowProblem("chosen and rejected do not share the same prompt")
    prefix, prefix_label = (chosen_prefix, "chosen") if chosen_prefix else (rejected_prefix, "rejected")

    def pairs() -> Pairs:
        return [(chosen, rejected)]

    if row.get("prompt") is not None:
        prompt = prompt_turns(row["prompt"])
        # Some sets (e.g. UltraFeedback binarized) repeat the prompt inside chosen/rejected.
        if prefix and prefix != prompt:
            raise RowProblem(f"prompt does not match the conversation before the {prefix_label} response")
        return Example(prompt=prompt, pairs=pairs)
    if not prefix:
        raise RowProblem("missing column 'prompt': chosen holds only the response, so the prompt is unknown")
    return Example(prompt=prefix, prompt_label=prefix_label, pairs=pairs)


# --- HH-RLHF dialogue text -----------------------------------------------------------------------------


def _hh_turns(value: Any, what: str) -> list[Message]:
    text = as_text(value, what)
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    parts = _HH_SPLIT.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise RowProblem(
            f"{what} is not HH-RLHF dialogue text (expected '\\n\\nHuman: ...\\n\\nAssistant: ...')"
        )
    turns = [
        {"role": "user" if speaker == "Human" else "assistant", "content": body.strip()}
        for speaker, body in zip(parts[1::2], parts[2::2], strict=True)
    ]
    if turns[-1]["role"] != "assistant":
        raise RowProblem(f"{what} does not end with an Assistant turn")
    return turns


def parse_hh(row: Mapping[str, Any], row_num: int) -> Example:
    """``chosen`` + ``rejected`` as whole ``Human: ... Assistant: ...`` dialogues sharing all but the last turn."""
    chosen = _hh_turns(column(row, "chosen"), "chosen")
    rejected = _hh_turns(column(row, "rejected"), "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise RowProblem("chosen and rejected do not share the same prompt")
    pair = (chosen[-1]["content"], rejected[-1]["content"])
    return Example(prompt=chosen[:-1], pairs=lambda: [pair])


# --- ShareGPT conversations + chosen/rejected turns ----------------------------------------------------


def _one_turn(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    msg = message(value, what, SHAREGPT_ROLES, "from", "value")
    if msg["role"] != "assistant":
        raise RowProblem(f"{what} is a {msg['role']} turn, not an assistant turn")
    return msg["content"]


def parse_sharegpt_preference(row: Mapping[str, Any], row_num: int) -> Example:
    """``conversations`` (the prompt) + ``chosen`` and ``rejected`` turns, strings or ShareGPT turns."""
    prompt = sharegpt_conversation(row)
    pair = (_one_turn(column(row, "chosen"), "chosen"), _one_turn(column(row, "rejected"), "rejected"))
    return Example(prompt=prompt, prompt_label="conversations", pairs=lambda: [pair])


# --- rankings of K responses ---------------------------------------------------------------------------


def _ranked_pairs(row: Mapping[str, Any]) -> Pairs:
    responses = column(row, "responses")
    if not isinstance(responses, (list, tuple)):
        raise RowProblem(f"responses is not a list (got {type_name(responses)})")
    k = len(responses)
    if k < 2:
        raise RowProblem(f"fewer than 2 responses (got {k})")
    if k > MAX_RESPONSES:
        raise RowProblem(f"too many responses (got {k}, at most {MAX_RESPONSES})")
    texts = [as_text(r, f"responses[{i}]") for i, r in enumerate(responses)]
    seen: dict[str, int] = {}
    for i, t in enumerate(texts):
        if not t.strip():
            raise RowProblem(f"empty response (responses[{i}])")
        if t.strip() in seen:
            raise RowProblem(
                f"duplicate responses: responses[{seen[t.strip()]}] and responses[{i}] are identical"
            )
        seen[t.strip()] = i
    ranking = row.get("ranking")
    scores = None
    if ranking is not None:
        if not (
            isinstance(ranking, (list, tuple))
            and all(isinstance(r, int) and not isinstance(r, bool) for r in ranking)
            and sorted(ranking) == list(range(k))
        ):
            shown = list(ranking) if isinstance(ranking, tuple) else ranking
            raise RowProblem(f"ranking {shown!r} is not a permutation of the response indices 0..{k - 1}")
        order = list(ranking)
    else:
        scores = row.get("scores")
        order = _order_by_scores(scores, k)
    # Every (better, worse) pair of the ranking: K*(K-1)/2 comparisons, best-first.
    pairs = [(order[i], order[j]) for i in range(k) for j in range(i + 1, k)]
    if scores is None:
        return [(texts[win], texts[lose]) for win, lose in pairs]
    return [(texts[win], texts[lose], float(scores[win]) - float(scores[lose])) for win, lose in pairs]


def _order_by_scores(scores: Any, k: int) -> list[int]:
    if scores is None:
        raise RowProblem("missing ranking: neither 'ranking' nor 'scores' is set")
    if not isinstance(scores, (list, tuple)) or len(scores) != k:
        n = len(scores) if isinstance(scores, (list, tuple)) else type_name(scores)
        raise RowProblem(f"scores must be a list of {k} numbers, one per response (got {n})")
    for i, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or (isinstance(s, float) and math.isnan(s)):
            raise RowProblem(f"scores[{i}] is not a number (got {type_name(s)})")
        if finite_number(s) is None:
            raise RowProblem(f"scores[{i}] is not a finite number (got {s!r:.40})")
    first_with: dict[float, int] = {}
    for i, s in enumerate(scores):
        if s in first_with:
            raise RowProblem(
                f"tied scores: responses[{first_with[s]}] and responses[{i}] both score {s} "
                "(a ranking needs a strict order)"
            )
        first_with[s] = i
    return sorted(range(k), key=lambda i: scores[i], reverse=True)


def parse_ranking(row: Mapping[str, Any], row_num: int) -> Example:
    """``prompt`` + ``responses`` (2 to 9) ordered by ``ranking`` (best first) or by ``scores``."""
    return Example(prompt=prompt_turns(column(row, "prompt")), pairs=lambda: _ranked_pairs(row))
