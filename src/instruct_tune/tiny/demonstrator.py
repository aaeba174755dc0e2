"""The tiny task's noisy demonstrator: demonstrations that are right most of the time but make the
systematic mistakes people make (and sometimes chat after the answer), so an SFT model copies them and PPO
has headroom to improve on SFT."""

from __future__ import annotations

import random

from instruct_tune.tiny.families import WORDS, Task, correct_items, format_answer
from instruct_tune.tiny.gold import gold_score

# Things people append after an answer. Each starts with a capital letter, so it never parses as an answer.
CHATTER: tuple[str, ...] = (
    "Hope this helps!",
    "Done.",
    "Let me know if you need anything else.",
    "That is the answer.",
    "Is there anything else?",
    "Easy!",
)


def _swap_adjacent(items: tuple, rng: random.Random) -> tuple:
    i = rng.randrange(len(items) - 1)
    out = list(items)
    out[i], out[i + 1] = out[i + 1], out[i]
    return tuple(out)


def _mistakes(task: Task, rng: random.Random) -> list[str]:
    """Systematic mistakes people make, each with 0 < gold content score < 1 (one of each kind)."""
    want = correct_items(task)
    fam = task.family
    if fam == "sort":
        return [format_answer(fam, _swap_adjacent(want, rng))]
    if fam == "reverse":
        rotated = (task.args[-1],) + task.args[:-1]  # moved the last item to the front instead of reversing
        dropped = want[:-1]  # stopped one item early
        return [format_answer(fam, x) for x in (_swap_adjacent(want, rng), rotated, dropped)]
    if fam == "add":
        a, b = task.args
        out = [str(want[0] + (rng.choice((-1, 1)) if want[0] else 1))]  # off by one
        if a % 10 + b % 10 >= 10:
            out.append(str(want[0] - 10))  # dropped the carry from the units
        return out
    word, n = task.args
    return [" ".join([word] * (n + 1)), " ".join([word] * (n - 1))]


def _severe(task: Task, rng: random.Random) -> list[str]:
    """Bad answers of varying severity; the last one always has content score 0."""
    want = correct_items(task)
    fam = task.family
    if fam == "sort":
        others = [x for x in range(100) if x not in task.args]
        return [
            format_answer(fam, task.args),  # copied the input
            format_answer(fam, tuple(reversed(want))),  # descending
            format_answer(fam, want[:-1]),  # dropped the largest
            format_answer(fam, tuple(sorted(rng.sample(others, len(want))))),
        ]
    if fam == "reverse":
        others = [w for w in WORDS if w not in task.args]
        return [
            format_answer(fam, task.args),  # copied the input
            format_answer(fam, want[:1]),  # only the first item
            format_answer(fam, tuple(rng.sample(others, len(want)))),
        ]
    if fam == "add":
        a, b = task.args
        total = want[0]
        wrong = [abs(a - b), total + rng.choice((-1, 1)) * rng.randint(2, 9), total + 20 + rng.randrange(50)]
        return [str(x) for x in wrong if x != total]
    word, n = task.args
    other = rng.choice([w for w in WORDS if w != word])
    return [word, " ".join([word] * (2 * n)), f"{word} {other}", " ".join([other] * n)]


class NoisyDemonstrator:
    """Writes demonstrations: correct most of the time, else a systematic mistake; sometimes chats after.

    With probability ``error_rate`` the answer has a family-specific mistake (sort: adjacent swap; reverse:
    adjacent swap, rotated instead of reversed, or last item dropped; add: off by one or dropped carry;
    repeat: n+1 or n-1 copies); independently with probability ``chatter_rate`` a phrase follows it.
    The defaults make about 1 - 0.72 * 0.80 = 42% of demonstrations imperfect. Chatter is the mistake a policy
    can always unlearn (every family, any model size): at 0.08 it was 10% of SFT samples against 0% after PPO.
    """

    def __init__(self, error_rate: float = 0.28, chatter_rate: float = 0.2) -> None:
        if not (0.0 <= error_rate <= 1.0 and 0.0 <= chatter_rate <= 1.0):
            raise ValueError("error_rate and chatter_rate must be in [0, 1]")
        self.error_rate = error_rate
        self.chatter_rate = chatter_rate

    def respond(self, task: Task, rng: random.Random) -> str:
        """One demonstration for ``task``."""
        text = rng.choice(_mistakes(task, rng)) if rng.random() < self.error_rate else task.answer
        if rng.random() < self.chatter_rate:
            text = f"{text} {rng.choice(CHATTER)}"
        return text

    def variants(self, task: Task, rng: random.Random, k: int = 4) -> list[str]:
        """``k`` responses of distinct gold score, in no particular order.

        Always the correct answer and one systematic mistake; then a chatty response (the correct answer
        plus chatter half the time, else any of correct / mistakes plus chatter); then severe errors
        (and, for k > 4, anything else left), skipping any response whose score is already taken.
        """
        if k < 1:
            raise ValueError("k must be >= 1")
        prompt = task.prompt
        chosen: list[str] = []
        scores: list[float] = []

        def take(cands: list[str]) -> bool:
            rng.shuffle(cands)
            for c in cands:
                s = gold_score(prompt, c)
                if all(abs(s - t) > 1e-9 for t in scores):
                    chosen.append(c)
                    scores.append(s)
                    return True
            return False

        mistakes = _mistakes(task, rng)
        chatty = [f"{r} {rng.choice(CHATTER)}" for r in [task.answer, *mistakes]]
        severe = _severe(task, rng)
        take([task.answer])
        if k > 1:
            take(list(mistakes))
        if k > 2 and not (rng.random() < 0.5 and take([chatty[0]])):
            take(chatty)
        if len(chosen) < k:
            take(list(severe))
        leftovers = [*mistakes, *chatty, *severe, *(f"{s} {rng.choice(CHATTER)}" for s in severe)]
        while len(chosen) < k and take(leftovers):
            pass
        if len(chosen) < k:
            raise RuntimeError(f"could not find {k} responses of distinct score for {prompt!r}")
        return chosen[:k]


def expected_imperfect_share(error_rate: float, chatter_rate: float) -> float:
    """Share of demonstrations with gold < 1 implied by the rates (every mistake is imperfect)."""
    return 1.0 - (1.0 - error_rate) * (1.0 - chatter_rate)
