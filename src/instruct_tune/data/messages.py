"""Message and turn helpers: read chat turns (OpenAI or ShareGPT style) and check a conversation's roles."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from .parsing import Message, RowProblem, as_text, column, type_name

__all__ = [
    "ROLES",
    "SHAREGPT_ROLES",
    "assistant_turn",
    "check_turns",
    "message",
    "message_list",
    "prompt_turns",
    "sharegpt_conversation",
    "sharegpt_turns",
    "system_turns",
]

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    # Names used by the original ShareGPT scrapes.
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}


def message(
    obj: Any, where: str, roles: Mapping[str, str], role_key: str = "role", content_key: str = "content"
) -> Message:
    """One turn ``{"role", "content"}`` read from ``obj``'s ``role_key``/``content_key``, its role mapped by ``roles``."""
    if not isinstance(obj, Mapping):
        raise RowProblem(
            f"{where} is not an object with '{role_key}' and '{content_key}' (got {type_name(obj)})"
        )
    if role_key not in obj:
        raise RowProblem(f"{where} has no '{role_key}'")
    raw_role = as_text(obj[role_key], f"{where} {role_key}")
    role = roles.get(raw_role.strip().lower())
    if role is None:
        known = ", ".join(sorted(roles))
        raise RowProblem(f"unknown role '{raw_role}' in {where} (expected one of {known})")
    if content_key not in obj:
        raise RowProblem(f"{where} has no '{content_key}'")
    return {"role": role, "content": as_text(obj[content_key], f"{where} {content_key}")}


def message_list(
    value: Any,
    what: str,
    roles: Mapping[str, str] = ROLES,
    role_key: str = "role",
    content_key: str = "content",
) -> list[Message]:
    """A list of turns (OpenAI style by default); roles are not checked for order here."""
    if not isinstance(value, (list, tuple)):
        raise RowProblem(f"{what} is not a list of messages (got {type_name(value)})")
    return [message(m, f"{what} turn {i}", roles, role_key, content_key) for i, m in enumerate(value, 1)]


def sharegpt_turns(value: Any, what: str) -> list[Message]:
    """A list of ShareGPT ``{"from", "value"}`` turns."""
    return message_list(value, what, SHAREGPT_ROLES, "from", "value")


def sharegpt_conversation(row: Mapping[str, Any]) -> list[Message]:
    """The row's ``conversations``, after the ``system`` column's prompt unless they start with their own."""
    conv = sharegpt_turns(column(row, "conversations"), "conversations")
    if conv and conv[0]["role"] == "system":
        return conv
    return system_turns(row) + conv


def prompt_turns(value: Any, what: str = "prompt") -> list[Message]:
    """A prompt given as a string (one user turn) or as a list of messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, (list, tuple)):
        return message_list(value, what)
    raise RowProblem(f"{what} is not a string or a list of messages (got {type_name(value)})")


def system_turns(row: Mapping[str, Any]) -> list[Message]:
    """The row's optional ``system`` column as a system turn (none when absent or blank)."""
    # LLaMA-Factory's optional "system" column; empty means "no system prompt".
    value = row.get("system")
    if value is None:
        return []
    text = as_text(value, "system")
    return [{"role": "system", "content": text}] if text.strip() else []


def assistant_turn(text: str) -> list[Message]:
    """``text`` as a one-turn assistant conversation."""
    return [{"role": "assistant", "content": text}]


def check_turns(msgs: list[Message], what: str, *, end: Literal["user", "assistant"]) -> list[Message]:
    """Check role order and emptiness; returns the conversation without an empty leading system message."""
    if not msgs:
        raise RowProblem(f"{what} is empty")
    prev: str | None = None
    for i, msg in enumerate(msgs, 1):
        role = msg["role"]
        if role == "system":
            if i != 1:
                raise RowProblem(
                    f"roles out of order: {what} turn {i} is a system message (only allowed first)"
                )
        elif role == prev:
            raise RowProblem(f"roles out of order: {what} turns {i - 1} and {i} are both {role} turns")
        elif role == "assistant" and prev in (None, "system"):
            raise RowProblem(
                f"roles out of order: {what} turn {i} is an assistant turn before any user turn"
            )
        if not msg["content"].strip():
            if role == "user":
                raise RowProblem(f"empty user message ({what} turn {i})")
            if role == "assistant":
                raise RowProblem(
                    "empty assistant response"
                    if i == len(msgs)
                    else f"empty assistant message ({what} turn {i})"
                )
        prev = role
    last = msgs[-1]["role"]
    if last != end:
        if end == "assistant":
            raise RowProblem(f"no assistant response: the last turn of {what} has role '{last}'")
        raise RowProblem(f"{what} must end with a user turn (its last turn has role '{last}')")
    # An empty system prompt carries nothing; dropping it keeps chat templates from rendering a blank one.
    if msgs[0]["role"] == "system" and not msgs[0]["content"].strip():
        return msgs[1:]
    return msgs


def last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The content of a chat prompt's last user turn ("" without one): what the tiny task's judge parses."""
    return next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
