"""Parsers of the conversation formats (messages, sharegpt, alpaca, prompt_completion), prompts and text.

Each parser reads one source row into an :class:`~.parsing.Example`; ``formats.py`` registers them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .messages import assistant_turn, message_list, prompt_turns, sharegpt_conversation, system_turns
from .parsing import Example, Message, RowProblem, as_text, column, type_name

__all__ = [
    "parse_alpaca",
    "parse_messages",
    "parse_prompt_completion",
    "parse_prompt_only",
    "parse_sharegpt",
    "parse_text",
]


def parse_messages(row: Mapping[str, Any], row_num: int) -> Example:
    """``messages``: a list of OpenAI-style ``{"role", "content"}`` turns."""
    return Example(conversation=message_list(column(row, "messages"), "messages"), label="messages")


def parse_sharegpt(row: Mapping[str, Any], row_num: int) -> Example:
    """``conversations``: ShareGPT ``{"from", "value"}`` turns (+ optional ``system``)."""
    return Example(conversation=sharegpt_conversation(row), label="conversations")


def parse_alpaca(row: Mapping[str, Any], row_num: int) -> Example:
    """``instruction`` + ``output`` (+ ``input``, ``system``, ``history`` of [instruction, response] pairs)."""
    instruction = as_text(column(row, "instruction"), "instruction")
    extra = row.get("input")
    extra = "" if extra is None else as_text(extra, "input")
    output = as_text(column(row, "output"), "output")
    history: list[Message] = []
    pairs = row.get("history") or []
    if not isinstance(pairs, list | tuple):
        raise RowProblem(f"history is {type_name(pairs)}, expected a list of [instruction, response] pairs")
    for i, pair in enumerate(pairs, 1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise RowProblem(f"history entry {i} is not an [instruction, response] pair")
        history += [
            {"role": "user", "content": as_text(pair[0], f"history entry {i} instruction")},
            {"role": "assistant", "content": as_text(pair[1], f"history entry {i} response")},
        ]
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    conv = [
        *system_turns(row),
        *history,
        {"role": "user", "content": user},
        {"role": "assistant", "content": output},
    ]
    return Example(conversation=conv, label="conversation")


def parse_prompt_completion(row: Mapping[str, Any], row_num: int) -> Example:
    """``prompt`` + ``completion``, each a string or a list of messages."""
    prompt = prompt_turns(column(row, "prompt"))
    completion = column(row, "completion")
    reply = assistant_turn(completion) if isinstance(completion, str) else message_list(completion, "completion")
    return Example(conversation=prompt + reply, label="prompt + completion", prompt=prompt)


def parse_prompt_only(row: Mapping[str, Any], row_num: int) -> Example:
    """``prompt``: a string or a list of messages ending in a user turn."""
    return Example(prompt=prompt_turns(column(row, "prompt")))


def parse_text(row: Mapping[str, Any], row_num: int) -> Example:
    """``text``: plain text."""
    return Example(text=as_text(column(row, "text"), "text"))
