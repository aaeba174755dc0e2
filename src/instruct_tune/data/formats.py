"""Detect the format of a data source and convert its rows to TRL's conversational form.

Output schema per kind of data:

- ``sft``: ``{"messages": [{"role", "content"}, ...]}`` ending in an assistant turn;
- ``preference``: ``{"prompt": [...], "chosen": [assistant], "rejected": [assistant], "group_id": int}``,
  one row per (better, worse) pair; ``group_id`` is the source row, shared by all pairs of one ranking;
  rankings given by ``scores`` also get ``margin`` = score(chosen) - score(rejected) (None on other rows);
- ``prompts``: ``{"prompt": [...]}`` ending in a user turn;
- ``text``: ``{"text": str}``.

Columns a format does not consume (``task``, ids, ...) are carried through unchanged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .errors import DataError, LoadReport
from .values import finite_number, margin_problem

__all__ = [
    "FORMATS",
    "FORMAT_KIND",
    "KINDS",
    "KIND_FORMATS",
    "Kind",
    "convert_rows",
    "detect_format",
    "format_candidates",
]

Kind = Literal["sft", "preference", "prompts", "text"]
KINDS: tuple[str, ...] = ("sft", "preference", "prompts", "text")

SFT_FORMATS = ("messages", "prompt_completion", "alpaca", "sharegpt")
PREFERENCE_FORMATS = ("preference", "hh_rlhf", "sharegpt_preference", "ranking")
FORMATS: tuple[str, ...] = (*SFT_FORMATS, *PREFERENCE_FORMATS, "prompt_only", "text")

KIND_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": SFT_FORMATS,
    "preference": PREFERENCE_FORMATS,
    "prompts": ("prompt_only", *SFT_FORMATS, *PREFERENCE_FORMATS),
    "text": ("text",),
}

# The kind a format naturally is, used to guess the kind when none is given.
FORMAT_KIND: dict[str, str] = {
    **dict.fromkeys(SFT_FORMATS, "sft"),
    **dict.fromkeys(PREFERENCE_FORMATS, "preference"),
    "prompt_only": "prompts",
    "text": "text",
}

_COLUMNS_HINT: dict[str, str] = {
    "messages": "messages",
    "prompt_completion": "prompt + completion",
    "alpaca": "instruction + output (+ input)",
    "sharegpt": "conversations",
    "preference": "chosen + rejected (+ prompt)",
    "hh_rlhf": "chosen + rejected as 'Human: ... Assistant: ...' text",
    "sharegpt_preference": "conversations + chosen + rejected",
    "ranking": "prompt + responses + ranking or scores",
    "prompt_only": "prompt",
    "text": "text",
}

_CONSUMED: dict[str, frozenset[str]] = {
    "messages": frozenset({"messages"}),
    "prompt_completion": frozenset({"prompt", "completion"}),
    "alpaca": frozenset({"instruction", "input", "output", "system", "history"}),
    "sharegpt": frozenset({"conversations", "system"}),
    "preference": frozenset({"prompt", "chosen", "rejected"}),
    "hh_rlhf": frozenset({"chosen", "rejected"}),
    "sharegpt_preference": frozenset({"conversations", "chosen", "rejected", "system"}),
    "ranking": frozenset({"prompt", "responses", "ranking", "scores"}),
    "prompt_only": frozenset({"prompt"}),
    "text": frozenset({"text"}),
}

_OUTPUT: dict[str, tuple[str, ...]] = {
    "sft": ("messages",),
    "preference": ("prompt", "chosen", "rejected", "group_id"),
    "prompts": ("prompt",),
    "text": ("text",),
}

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_SHAREGPT_ROLES = {
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
_MAX_RESPONSES = 9

Message = dict[str, str]


class _RowProblem(Exception):
    """A problem with one row; the converter adds the source and row number."""


# --- detection -----------------------------------------------------------------------------------------


def _is_hh_text(value: Any) -> bool:
    return isinstance(value, str) and "\n\nAssistant:" in value and bool(re.search(r"(^|\n\n)Human:", value))


def format_candidates(columns: Sequence[str], first_row: Mapping[str, Any]) -> list[str]:
    """Every format the columns fit, most specific first (a preference set with ``messages`` fits both)."""
    cols = set(columns)
    found: list[str] = []
    if {"prompt", "responses"} <= cols and cols & {"ranking", "scores"}:
        found.append("ranking")
    if {"chosen", "rejected"} <= cols:
        if "conversations" in cols:
            found.append("sharegpt_preference")
        elif "prompt" not in cols and _is_hh_text(first_row.get("chosen")):
            found.append("hh_rlhf")
        else:
            found.append("preference")
    if "messages" in cols:
        found.append("messages")
    if "conversations" in cols and "sharegpt_preference" not in found:
        found.append("sharegpt")
    if {"instruction", "output"} <= cols:
        found.append("alpaca")
    if {"prompt", "completion"} <= cols:
        found.append("prompt_completion")
    if "prompt" in cols:
        found.append("prompt_only")
    if "text" in cols:
        found.append("text")
    return found


def detect_format(
    columns: Sequence[str],
    first_row: Mapping[str, Any],
    *,
    kind: str | None = None,
    source: str = "<data>",
) -> str:
    """Name a source's format from its columns (and first row); with ``kind``, the first usable as it.

    Raises :class:`DataError` naming the expected and the found columns when nothing fits.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
    candidates = format_candidates(columns, first_row)
    usable = [f for f in candidates if kind is None or f in KIND_FORMATS[kind]]
    if usable:
        return usable[0]
    found = ", ".join(columns) or "(none)"
    if kind is None:
        wanted = " | ".join(_COLUMNS_HINT[f] for f in FORMATS)
        raise DataError(source, f"missing column: expected one of {wanted}; found columns: {found}")
    wanted = " | ".join(_COLUMNS_HINT[f] for f in KIND_FORMATS[kind])
    if candidates:
        raise DataError(
            source,
            f"format '{candidates[0]}' ({FORMAT_KIND[candidates[0]]} data) cannot be used as {kind} data, "
            f"which needs columns {wanted}; "
            f"found columns: {found}",
        )
    raise DataError(source, f"missing column: {kind} data needs columns {wanted}; found columns: {found}")


# --- field parsing -------------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


def _field(row: Mapping[str, Any], key: str) -> Any:
    if key not in row:
        raise _RowProblem(f"missing column '{key}'")
    return row[key]


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _RowProblem(f"{what} is not a string (got {_type_name(value)})")
    return value


def _message(
    obj: Any, where: str, roles: Mapping[str, str], role_key: str = "role", content_key: str = "content"
) -> Message:
    if not isinstance(obj, Mapping):
        raise _RowProblem(
            f"{where} is not an object with '{role_key}' and '{content_key}' (got {_type_name(obj)})"
        )
    if role_key not in obj:
        raise _RowProblem(f"{where} has no '{role_key}'")
    raw_role = _text(obj[role_key], f"{where} {role_key}")
    role = roles.get(raw_role.strip().lower())
    if role is None:
        known = ", ".join(sorted(roles))
        raise _RowProblem(f"unknown role '{raw_role}' in {where} (expected one of {known})")
    if content_key not in obj:
        raise _RowProblem(f"{where} has no '{content_key}'")
    return {"role": role, "content": _text(obj[content_key], f"{where} {content_key}")}


def _messages(
    value: Any,
    what: str,
    roles: Mapping[str, str] = _ROLES,
    role_key: str = "role",
    content_key: str = "content",
) -> list[Message]:
    if not isinstance(value, (list, tuple)):
        raise _RowProblem(f"{what} is not a list of messages (got {_type_name(value)})")
    return [_message(m, f"{what} turn {i}", roles, role_key, content_key) for i, m in enumerate(value, 1)]


def _sharegpt(value: Any, what: str) -> list[Message]:
    return _messages(value, what, _SHAREGPT_ROLES, "from", "value")


def _prompt(value: Any, what: str = "prompt") -> list[Message]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, (list, tuple)):
        return _messages(value, what)
    raise _RowProblem(f"{what} is not a string or a list of messages (got {_type_name(value)})")


def _system(row: Mapping[str, Any]) -> list[Message]:
    # LLaMA-Factory's optional "system" column; empty means "no system prompt".
    value = row.get("system")
    if value is None:
        return []
    text = _text(value, "system")
    return [{"role": "system", "content": text}] if text.strip() else []


def _check_turns(msgs: list[Message], what: str, *, end: Literal["user", "assistant"]) -> list[Message]:
    """Check role order and emptiness; returns the conversation without an empty leading system message."""
    if not msgs:
        raise _RowProblem(f"{what} is empty")
    prev: str | None = None
    for i, msg in enumerate(msgs, 1):
        role = msg["role"]
        if role == "system":
            if i != 1:
                raise _RowProblem(
                    f"roles out of order: {what} turn {i} is a system message (only allowed first)"
                )
        elif role == prev:
            raise _RowProblem(f"roles out of order: {what} turns {i - 1} and {i} are both {role} turns")
        elif role == "assistant" and prev in (None, "system"):
            raise _RowProblem(
                f"roles out of order: {what} turn {i} is an assistant turn before any user turn"
            )
        if not msg["content"].strip():
            if role == "user":
                raise _RowProblem(f"empty user message ({what} turn {i})")
            if role == "assistant":
                raise _RowProblem(
                    "empty assistant response"
                    if i == len(msgs)
                    else f"empty assistant message ({what} turn {i})"
                )
        prev = role
    last = msgs[-1]["role"]
    if last != end:
        if end == "assistant":
            raise _RowProblem(f"no assistant response: the last turn of {what} has role '{last}'")
        raise _RowProblem(f"{what} must end with a user turn (its last turn has role '{last}')")
    # An empty system prompt carries nothing; dropping it keeps chat templates from rendering a blank one.
    if msgs[0]["role"] == "system" and not msgs[0]["content"].strip():
        return msgs[1:]
    return msgs


# --- per-format parsing into one normalized example ----------------------------------------------------

# (chosen, rejected), or (chosen, rejected, margin) when the source gives scores.
Pairs = list[tuple[str, str] | tuple[str, str, float]]


@dataclass
class _Example:
    """One source row, normalized: a full conversation, or a prompt with (chosen, rejected) pairs, or text."""

    conversation: list[Message] | None = None
    label: str = "messages"
    prompt: list[Message] | None = None
    prompt_label: str = "prompt"
    # Deferred so that loading a preference set as prompts does not reject rows for their responses.
    pairs: Callable[[], Pairs] | None = None
    text: str | None = None


def _parse_messages(row: Mapping[str, Any], row_num: int) -> _Example:
    return _Example(conversation=_messages(_field(row, "messages"), "messages"), label="messages")


def _parse_sharegpt(row: Mapping[str, Any], row_num: int) -> _Example:
    conv = _sharegpt(_field(row, "conversations"), "conversations")
    if not (conv and conv[0]["role"] == "system"):
        conv = _system(row) + conv
    return _Example(conversation=conv, label="conversations")


def _parse_alpaca(row: Mapping[str, Any], row_num: int) -> _Example:
    instruction = _text(_field(row, "instruction"), "instruction")
    extra = row.get("input")
    extra = "" if extra is None else _text(extra, "input")
    output = _text(_field(row, "output"), "output")
    history: list[Message] = []
    for i, pair in enumerate(row.get("history") or [], 1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise _RowProblem(f"history entry {i} is not an [instruction, response] pair")
        history += [
            {"role": "user", "content": _text(pair[0], f"history entry {i} instruction")},
            {"role": "assistant", "content": _text(pair[1], f"history entry {i} response")},
        ]
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    conv = [
        *_system(row),
        *history,
        {"role": "user", "content": user},
        {"role": "assistant", "content": output},
    ]
    return _Example(conversation=conv, label="conversation")


def _parse_prompt_completion(row: Mapping[str, Any], row_num: int) -> _Example:
    prompt = _prompt(_field(row, "prompt"))
    completion = _field(row, "completion")
    if isinstance(completion, str):
        reply = [{"role": "assistant", "content": completion}]
    else:
        reply = _messages(completion, "completion")
    return _Example(conversation=prompt + reply, label="prompt + completion", prompt=prompt)


def _response(value: Any, what: str) -> tuple[list[Message], str]:
    """Split a chosen/rejected value into (conversation before the response, response text)."""
    if isinstance(value, str):
        return [], value
    msgs = _messages(value, what)
    if not msgs:
        raise _RowProblem(f"{what} is empty")
    if msgs[-1]["role"] != "assistant":
        raise _RowProblem(f"{what} does not end with an assistant turn (its last turn has role '{msgs[-1]['role']}')")
    return msgs[:-1], msgs[-1]["content"]


def _parse_preference(row: Mapping[str, Any], row_num: int) -> _Example:
    chosen_prefix, chosen = _response(_field(row, "chosen"), "chosen")
    rejected_prefix, rejected = _response(_field(row, "rejected"), "rejected")
    if chosen_prefix and rejected_prefix and chosen_prefix != rejected_prefix:
        raise _RowProblem("chosen and rejected do not share the same prompt")
    prefix, prefix_label = (chosen_prefix, "chosen") if chosen_prefix else (rejected_prefix, "rejected")

    def pairs() -> Pairs:
        return [(chosen, rejected)]

    if row.get("prompt") is not None:
        prompt = _prompt(row["prompt"])
        # Some sets (e.g. UltraFeedback binarized) repeat the prompt inside chosen/rejected.
        if prefix and prefix != prompt:
            raise _RowProblem(f"prompt does not match the conversation before the {prefix_label} response")
        return _Example(prompt=prompt, pairs=pairs)
    if not prefix:
        raise _RowProblem("missing column 'prompt': chosen holds only the response, so the prompt is unknown")
    return _Example(prompt=prefix, prompt_label=prefix_label, pairs=pairs)


_HH_SPLIT = re.compile(r"\n\n(Human|Assistant):")


def _hh_turns(value: Any, what: str) -> list[Message]:
    text = _text(value, what)
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    parts = _HH_SPLIT.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise _RowProblem(
            f"{what} is not HH-RLHF dialogue text (expected '\\n\\nHuman: ...\\n\\nAssistant: ...')"
        )
    turns = [
        {"role": "user" if speaker == "Human" else "assistant", "content": body.strip()}
        for speaker, body in zip(parts[1::2], parts[2::2], strict=True)
    ]
    if turns[-1]["role"] != "assistant":
        raise _RowProblem(f"{what} does not end with an Assistant turn")
    return turns


def _parse_hh(row: Mapping[str, Any], row_num: int) -> _Example:
    chosen = _hh_turns(_field(row, "chosen"), "chosen")
    rejected = _hh_turns(_field(row, "rejected"), "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise _RowProblem("chosen and rejected do not share the same prompt")
    pair = (chosen[-1]["content"], rejected[-1]["content"])
    return _Example(prompt=chosen[:-1], pairs=lambda: [pair])


def _one_turn(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    msg = _message(value, what, _SHAREGPT_ROLES, "from", "value")
    if msg["role"] != "assistant":
        raise _RowProblem(f"{what} is a {msg['role']} turn, not an assistant turn")
    return msg["content"]


def _parse_sharegpt_preference(row: Mapping[str, Any], row_num: int) -> _Example:
    prompt = _sharegpt(_field(row, "conversations"), "conversations")
    if not (prompt and prompt[0]["role"] == "system"):
        prompt = _system(row) + prompt
    pair = (_one_turn(_field(row, "chosen"), "chosen"), _one_turn(_field(row, "rejected"), "rejected"))
    return _Example(prompt=prompt, prompt_label="conversations", pairs=lambda: [pair])


def _ranked_pairs(row: Mapping[str, Any]) -> Pairs:
    responses = _field(row, "responses")
    if not isinstance(responses, (list, tuple)):
        raise _RowProblem(f"responses is not a list (got {_type_name(responses)})")
    k = len(responses)
    if k < 2:
        raise _RowProblem(f"fewer than 2 responses (got {k})")
    if k > _MAX_RESPONSES:
        raise _RowProblem(f"too many responses (got {k}, at most {_MAX_RESPONSES})")
    texts = [_text(r, f"responses[{i}]") for i, r in enumerate(responses)]
    seen: dict[str, int] = {}
    for i, t in enumerate(texts):
        if not t.strip():
            raise _RowProblem(f"empty response (responses[{i}])")
        if t.strip() in seen:
            raise _RowProblem(
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
            raise _RowProblem(f"ranking {shown!r} is not a permutation of the response indices 0..{k - 1}")
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
        raise _RowProblem("missing ranking: neither 'ranking' nor 'scores' is set")
    if not isinstance(scores, (list, tuple)) or len(scores) != k:
        n = len(scores) if isinstance(scores, (list, tuple)) else _type_name(scores)
        raise _RowProblem(f"scores must be a list of {k} numbers, one per response (got {n})")
    for i, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or (isinstance(s, float) and math.isnan(s)):
            raise _RowProblem(f"scores[{i}] is not a number (got {_type_name(s)})")
        if finite_number(s) is None:
            raise _RowProblem(f"scores[{i}] is not a finite number (got {s!r:.40})")
    first_with: dict[float, int] = {}
    for i, s in enumerate(scores):
        if s in first_with:
            raise _RowProblem(
                f"tied scores: responses[{first_with[s]}] and responses[{i}] both score {s} "
                "(a ranking needs a strict order)"
            )
        first_with[s] = i
    return sorted(range(k), key=lambda i: scores[i], reverse=True)


def _parse_ranking(row: Mapping[str, Any], row_num: int) -> _Example:
    return _Example(prompt=_prompt(_field(row, "prompt")), pairs=lambda: _ranked_pairs(row))


def _parse_prompt_only(row: Mapping[str, Any], row_num: int) -> _Example:
    return _Example(prompt=_prompt(_field(row, "prompt")))


def _parse_text(row: Mapping[str, Any], row_num: int) -> _Example:
    return _Example(text=_text(_field(row, "text"), "text"))


_PARSERS: dict[str, Callable[[Mapping[str, Any], int], _Example]] = {
    "messages": _parse_messages,
    "prompt_completion": _parse_prompt_completion,
    "alpaca": _parse_alpaca,
    "sharegpt": _parse_sharegpt,
    "preference": _parse_preference,
    "hh_rlhf": _parse_hh,
    "sharegpt_preference": _parse_sharegpt_preference,
    "ranking": _parse_ranking,
    "prompt_only": _parse_prompt_only,
    "text": _parse_text,
}


# --- per-kind output -----------------------------------------------------------------------------------


def _emit_sft(ex: _Example, row_num: int) -> list[dict[str, Any]]:
    assert ex.conversation is not None
    return [{"messages": _check_turns(ex.conversation, ex.label, end="assistant")}]


def _assistant(text: str) -> list[Message]:
    return [{"role": "assistant", "content": text}]


def _emit_preference(ex: _Example, row_num: int) -> list[dict[str, Any]]:
    assert ex.prompt is not None and ex.pairs is not None
    prompt = _check_turns(ex.prompt, ex.prompt_label, end="user")
    rows = []
    for chosen, rejected, *margin in ex.pairs():
        if not chosen.strip():
            raise _RowProblem("empty chosen response")
        if not rejected.strip():
            raise _RowProblem("empty rejected response")
        if chosen.strip() == rejected.strip():
            raise _RowProblem("chosen and rejected responses are identical")
        rows.append(
            {
                "prompt": prompt,
                "chosen": _assistant(chosen),
                "rejected": _assistant(rejected),
                "group_id": row_num,
                **({"margin": margin[0]} if margin else {}),
            }
        )
    return rows


def _emit_prompts(ex: _Example, row_num: int) -> list[dict[str, Any]]:
    if ex.prompt is not None:
        return [{"prompt": _check_turns(ex.prompt, ex.prompt_label, end="user")}]
    conv = ex.conversation
    assert conv is not None
    if conv and conv[-1]["role"] == "assistant":
        conv = conv[:-1]
    return [{"prompt": _check_turns(conv, ex.label, end="user")}]


def _emit_text(ex: _Example, row_num: int) -> list[dict[str, Any]]:
    assert ex.text is not None
    if not ex.text.strip():
        raise _RowProblem("empty text")
    return [{"text": ex.text}]


_EMITTERS: dict[str, Callable[[_Example, int], list[dict[str, Any]]]] = {
    "sft": _emit_sft,
    "preference": _emit_preference,
    "prompts": _emit_prompts,
    "text": _emit_text,
}


# --- conversion ----------------------------------------------------------------------------------------


def _without_columns(
    rows: Iterable[tuple[int, Mapping[str, Any] | DataError]], source: str, skip_invalid: bool
) -> tuple[list[dict[str, Any]], LoadReport]:
    # No readable row had a field (e.g. every JSON line is malformed): report the rows, not a missing format.
    report = LoadReport(source=source, format="unknown")
    for row_num, row in rows:
        report.rows_in += 1
        problem = row if isinstance(row, DataError) else DataError(source, "row has no columns", row=row_num)
        if not skip_invalid:
            raise problem
        report.problems.append(problem)
    if report.rows_in == 0:
        raise DataError(source, "no rows")
    return [], report


def convert_rows(
    rows: Iterable[tuple[int, Mapping[str, Any] | DataError]],
    kind: str,
    *,
    source: str,
    columns: Sequence[str],
    first_row: Mapping[str, Any],
    skip_invalid: bool = False,
) -> tuple[list[dict[str, Any]], LoadReport]:
    """Detect the format and convert every ``(row_number, row)`` pair to ``kind``'s schema, validating each.

    Without ``skip_invalid`` the first bad row raises :class:`DataError`; with it, bad rows are dropped
    and recorded in the report's ``problems``. Whole-source problems (no usable format, no rows) always raise.
    """
    if not columns:
        return _without_columns(rows, source, skip_invalid)
    fmt = detect_format(columns, first_row, kind=kind, source=source)
    if fmt == "preference" and "prompt" not in columns and isinstance(first_row.get("chosen"), str):
        raise DataError(
            source,
            "missing column: chosen/rejected are plain strings, so a 'prompt' column is needed "
            f"(or HH-RLHF 'Human: ... Assistant: ...' text); found columns: {', '.join(columns)}",
        )
    parse, emit = _PARSERS[fmt], _EMITTERS[kind]
    extras = [c for c in columns if c not in _CONSUMED[fmt] and c not in _OUTPUT[kind]]
    report = LoadReport(source=source, format=fmt)
    out: list[dict[str, Any]] = []
    for row_num, row in rows:
        report.rows_in += 1
        problem = row if isinstance(row, DataError) else None
        produced: list[dict[str, Any]] = []
        if problem is None:
            try:
                produced = emit(parse(row, row_num), row_num)
                if kind == "preference" and (bad := margin_problem(row.get("margin"), produced)):
                    raise _RowProblem(bad)
            except _RowProblem as e:
                problem = DataError(source, str(e), row=row_num)
        if problem is not None:
            if not skip_invalid:
                raise problem
            report.problems.append(problem)
            continue
        # Every output row gets every extra column so that the rows form one table.
        carried = {c: row.get(c) for c in extras}
        for example in produced:
            example.update(carried)
        out.extend(produced)
    if report.rows_in == 0:
        raise DataError(source, "no rows")
    if any("margin" in example for example in out):
        # Rankings by scores carry a margin, rankings by order do not: one table needs it on every row.
        for example in out:
            example.setdefault("margin", None)
    report.rows_out = len(out)
    return out, report
