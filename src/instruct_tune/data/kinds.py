"""The kinds of data, and per kind the emitter that checks a parsed row and writes its output rows.

Output schema per kind:

- ``sft``: ``{"messages": [{"role", "content"}, ...]}`` ending in an assistant turn;
- ``preference``: ``{"prompt": [...], "chosen": [assistant], "rejected": [assistant], "group_id": int}``,
  one row per (better, worse) pair; ``group_id`` is the source row, shared by all pairs of one ranking;
  rankings given by ``scores`` also get ``margin`` = score(chosen) - score(rejected)
  (None on the other rows of a conversion that has any);
- ``prompts``: ``{"prompt": [...]}`` ending in a user turn;
- ``text``: ``{"text": str}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from .messages import assistant_turn, check_turns
from .parsing import Example, RowProblem

__all__ = ["EMITTERS", "KINDS", "OUTPUT_COLUMNS", "Emitter", "Kind", "require_kind"]

Kind = Literal["sft", "preference", "prompts", "text"]
KINDS: tuple[str, ...] = ("sft", "preference", "prompts", "text")


def require_kind(kind: object) -> None:
    """Raise :class:`ValueError` unless ``kind`` is one of :data:`KINDS`."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r} (expected one of {', '.join(KINDS)})")


# The columns each kind writes (a source's other columns are carried through beside them).
OUTPUT_COLUMNS: dict[str, tuple[str, ...]] = {
    "sft": ("messages",),
    "preference": ("prompt", "chosen", "rejected", "group_id"),
    "prompts": ("prompt",),
    "text": ("text",),
}

# An emitter: (parsed row, row number) -> the output rows; raises RowProblem for a row it cannot use.
Emitter = Callable[[Example, int], list[dict[str, Any]]]


def _emit_sft(ex: Example, row_num: int) -> list[dict[str, Any]]:
    assert ex.conversation is not None
    return [{"messages": check_turns(ex.conversation, ex.label, end="assistant")}]


def _emit_preference(ex: Example, row_num: int) -> list[dict[str, Any]]:
    assert ex.prompt is not None and ex.pairs is not None
    prompt = check_turns(ex.prompt, ex.prompt_label, end="user")
    rows = []
    for chosen, rejected, *margin in ex.pairs():
        if not chosen.strip():
            raise RowProblem("empty chosen response")
        if not rejected.strip():
            raise RowProblem("empty rejected response")
        if chosen.strip() == rejected.strip():
            raise RowProblem("chosen and rejected responses are identical")
        rows.append(
            {
                "prompt": prompt,
                "chosen": assistant_turn(chosen),
                "rejected": assistant_turn(rejected),
                "group_id": row_num,
                **({"margin": margin[0]} if margin else {}),
            }
        )
    return rows


def _emit_prompts(ex: Example, row_num: int) -> list[dict[str, Any]]:
    if ex.prompt is not None:
        return [{"prompt": check_turns(ex.prompt, ex.prompt_label, end="user")}]
    conv = ex.conversation
    assert conv is not None
    if conv and conv[-1]["role"] == "assistant":
        conv = conv[:-1]
    return [{"prompt": check_turns(conv, ex.label, end="user")}]


def _emit_text(ex: Example, row_num: int) -> list[dict[str, Any]]:
    assert ex.text is not None
    if not ex.text.strip():
        raise RowProblem("empty text")
    return [{"text": ex.text}]


EMITTERS: dict[str, Emitter] = {
    "sft": _emit_sft,
    "preference": _emit_preference,
    "prompts": _emit_prompts,
    "text": _emit_text,
}
