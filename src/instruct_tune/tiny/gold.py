"""The tiny task's gold judge: it plays the human labeller, ranking responses for the reward model's training
data and scoring held-out prompts at eval time."""

from __future__ import annotations

import re

from instruct_tune.tiny.families import Task, correct_items, parse_prompt

TRAILING_FACTOR = 0.5  # multiplier when there is any text after the answer
NO_EOS_FACTOR = 0.5  # multiplier when the response did not end with EOS (truncated / rambling)
ADD_WRONG_MAX = 0.8  # best score a wrong sum can get
ADD_ERR_SCALE = 20.0  # a wrong sum loses all credit at |error| >= this

# Grammar of a well-formed answer prefix; whatever follows it is "trailing text".
_NUM_LIST_RE = re.compile(r"\d+(?:[ \t]*,[ \t]*\d+)*")
_WORD_LIST_RE = re.compile(r"[a-z]+(?:[ \t]*,[ \t]*[a-z]+)*")
_INT_RE = re.compile(r"-?\d+")
_WORD_RUN_RE = re.compile(r"[a-z]+(?:[ \t]+[a-z]+)*")


def _positional(got: list, want: tuple) -> float:
    """Share of positions right; a wrong item count costs through the larger denominator."""
    if not got:
        return 0.0
    hits = sum(1 for g, w in zip(got, want, strict=False) if g == w)
    return hits / max(len(got), len(want))


def _content_score(task: Task, text: str) -> tuple[float, bool]:
    """Score of the answer prefix of ``text`` (already stripped) and whether text follows it."""
    want = correct_items(task)
    if task.family in ("sort", "reverse"):
        m = (_NUM_LIST_RE if task.family == "sort" else _WORD_LIST_RE).match(text)
        if m is None:
            return 0.0, True
        parts = [p.strip() for p in m.group(0).split(",")]
        got = [int(p) for p in parts] if task.family == "sort" else parts
        return _positional(got, want), m.end() < len(text)
    if task.family == "add":
        m = _INT_RE.match(text)
        if m is None:
            return 0.0, True
        err = abs(int(m.group(0)) - want[0])
        score = 1.0 if err == 0 else ADD_WRONG_MAX * max(0.0, 1.0 - err / ADD_ERR_SCALE)
        return score, m.end() < len(text)
    m = _WORD_RUN_RE.match(text)
    if m is None:
        return 0.0, True
    words = m.group(0).split()
    word, n = task.args
    hits = min(sum(1 for w in words if w == word), n)
    return hits / max(len(words), n), m.end() < len(text)


def gold_score(prompt: str, response: str, ended_with_eos: bool = True) -> float:
    """Gold score in [0, 1] of ``response`` to a tiny-task ``prompt``.

    Content: sort/reverse = share of positions right over max(len(response list), len(answer));
    add = 1 if exact else 0.8 * max(0, 1 - |error| / 20); repeat = min(#target words, n) / max(#words, n).
    The answer must start the response (ends' whitespace ignored); any text after it multiplies by 0.5,
    and a missing EOS multiplies by 0.5. An empty response scores 0.
    """
    task = parse_prompt(prompt)
    text = response.strip()
    if not text:
        return 0.0
    score, trailing = _content_score(task, text)
    if trailing:
        score *= TRAILING_FACTOR
    if not ended_with_eos:
        score *= NO_EOS_FACTOR
    return score


def gold_compare(
    prompt: str, response_a: str, response_b: str, eos_a: bool = True, eos_b: bool = True
) -> float:
    """1.0 if ``response_a`` scores higher, 0.0 if ``response_b`` does, 0.5 on a tie (within 1e-9)."""
    a = gold_score(prompt, response_a, eos_a)
    b = gold_score(prompt, response_b, eos_b)
    if abs(a - b) <= 1e-9:
        return 0.5
    return 1.0 if a > b else 0.0

