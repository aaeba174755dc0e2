"""The built-in tiny instruction task: four verifiable families, a gold judge and a noisy demonstrator.

The gold judge (:func:`gold_score`) plays the human labeller: it ranks responses for the reward model's
training data and scores held-out prompts at eval time. The :class:`NoisyDemonstrator` writes SFT
demonstrations that are right most of the time but make the systematic mistakes people make (and sometimes
chat after the answer), so an SFT model copies them and PPO has headroom to improve on SFT.

Pure standard library, deterministic given a ``random.Random``.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "CHATTER",
    "FAMILIES",
    "NoisyDemonstrator",
    "SPLITS",
    "Task",
    "WORDS",
    "expected_imperfect_share",
    "gold_compare",
    "gold_score",
    "is_heldout",
    "parse_prompt",
    "sample_task",
]

FAMILIES: tuple[str, ...] = ("sort", "reverse", "add", "repeat")
SPLITS: tuple[str, ...] = ("train", "heldout")

# Short common lowercase words. None of them occurs in a prompt template or in the chatter phrases.
_WORD_TEXT = """
        apple ant arm baby bag ball bank bath bean bear bed bee bell bike bird boat body bone book boot
        bowl box boy bread brick bus cake camp car card cat chair chin city clock cloud coat cook corn cow
        cup desk dish dog door duck ear egg eye face farm fish flag foot fork fox frog game gate girl goat
        gold grass hair hand hat head hill home horse house ice ink jam jar key king kite lamp leaf leg lion
        lake map milk moon mouse nest net nose nut owl pan park pen pig pin pipe plant plate pot queen rain
        ring road rock roof room rope rose salt sand seed ship shoe shop sky snow sock song soup star stone
        sun table tail tent toe town toy train tree van wall water wind wing wolf wood yard zoo red blue
        green pink gray black white brown big hot cold warm soft hard fast slow tall long new old happy sad
        quiet loud dark light run jump swim sing read walk sleep play eat drink fly sit open close cap fan
        hen hut log mat mud oak pea pie rat rug tea web yak zip bug jet kid
"""
WORDS: tuple[str, ...] = tuple(sorted(_WORD_TEXT.split()))

# Things people append after an answer. Each starts with a capital letter, so it never parses as an answer.
CHATTER: tuple[str, ...] = (
    "Hope this helps!",
    "Done.",
    "Let me know if you need anything else.",
    "That is the answer.",
    "Is there anything else?",
    "Easy!",
)

TRAILING_FACTOR = 0.5  # multiplier when there is any text after the answer
NO_EOS_FACTOR = 0.5  # multiplier when the response did not end with EOS (truncated / rambling)
ADD_WRONG_MAX = 0.8  # best score a wrong sum can get
ADD_ERR_SCALE = 20.0  # a wrong sum loses all credit at |error| >= this

_TEMPLATES: dict[str, tuple[str, ...]] = {
    "sort": (
        "Sort these numbers in ascending order: {items}",
        "Put these numbers in order from smallest to largest: {items}",
    ),
    "reverse": (
        "Reverse this list: {items}",
        "Write this list in reverse order: {items}",
    ),
    "add": ("What is {a} + {b}?", "Add {a} and {b}."),
    "repeat": ("Repeat the word {w} {n} times.", "Say the word {w} {n} times."),
}
_NUM = r"\d{1,2}"
_PROMPT_RES: dict[str, tuple[re.Pattern[str], ...]] = {
    "sort": (
        re.compile(r"Sort these numbers in ascending order: (\d+(?:, \d+)*)"),
        re.compile(r"Put these numbers in order from smallest to largest: (\d+(?:, \d+)*)"),
    ),
    "reverse": (
        re.compile(r"Reverse this list: ([a-z]+(?:, [a-z]+)*)"),
        re.compile(r"Write this list in reverse order: ([a-z]+(?:, [a-z]+)*)"),
    ),
    "add": (re.compile(rf"What is ({_NUM}) \+ ({_NUM})\?"), re.compile(rf"Add ({_NUM}) and ({_NUM})\.")),
    "repeat": (
        re.compile(r"Repeat the word ([a-z]+) (\d) times\."),
        re.compile(r"Say the word ([a-z]+) (\d) times\."),
    ),
}
# Grammar of a well-formed answer prefix; whatever follows it is "trailing text".
_NUM_LIST_RE = re.compile(r"\d+(?:[ \t]*,[ \t]*\d+)*")
_WORD_LIST_RE = re.compile(r"[a-z]+(?:[ \t]*,[ \t]*[a-z]+)*")
_INT_RE = re.compile(r"-?\d+")
_WORD_RUN_RE = re.compile(r"[a-z]+(?:[ \t]+[a-z]+)*")

_N_ITEMS = (3, 5)  # sort / reverse list length range
_REPEAT_N = (2, 5)


@dataclass(frozen=True)
class Task:
    """One tiny-task instance.

    ``args`` per family: sort ``(int, ...)`` in prompt order; reverse ``(str, ...)``; add ``(a, b)``;
    repeat ``(word, n)``. ``template`` picks the prompt wording (it is not part of :attr:`key`).
    """

    family: str
    args: tuple
    template: int = 0

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def prompt(self) -> str:
        """The instruction text."""
        t = _TEMPLATES[self.family][self.template]
        if self.family in ("sort", "reverse"):
            return t.format(items=", ".join(str(x) for x in self.args))
        if self.family == "add":
            return t.format(a=self.args[0], b=self.args[1])
        return t.format(w=self.args[0], n=self.args[1])

    @property
    def answer(self) -> str:
        """The correct response."""
        return _fmt_answer(self.family, _correct(self))

    @property
    def key(self) -> str:
        """Canonical identity (independent of wording and, for sort/add, of item order)."""
        if self.family == "sort":
            return "sort:" + ",".join(str(x) for x in sorted(self.args))
        if self.family == "reverse":
            return "reverse:" + ",".join(self.args)
        if self.family == "add":
            a, b = sorted(self.args)
            return f"add:{a}+{b}"
        return f"repeat:{self.args[0]}*{self.args[1]}"


def _validate(task: Task) -> None:
    f, args = task.family, task.args
    if f not in FAMILIES:
        raise ValueError(f"unknown family {f!r}")
    if not isinstance(args, tuple):
        raise ValueError(f"args must be a tuple, got {type(args).__name__}")
    if not 0 <= task.template < len(_TEMPLATES[f]):
        raise ValueError(f"bad template index {task.template} for {f}")
    if f in ("sort", "reverse"):
        if not _N_ITEMS[0] <= len(args) <= _N_ITEMS[1] or len(set(args)) != len(args):
            raise ValueError(f"{f} needs {_N_ITEMS[0]}-{_N_ITEMS[1]} distinct items, got {args!r}")
        if f == "sort" and not all(isinstance(x, int) and 0 <= x <= 99 for x in args):
            raise ValueError(f"sort items must be ints 0-99, got {args!r}")
        if f == "reverse" and not all(isinstance(x, str) and re.fullmatch("[a-z]+", x) for x in args):
            raise ValueError(f"reverse items must be lowercase words, got {args!r}")
    elif f == "add":
        if len(args) != 2 or not all(isinstance(x, int) and 0 <= x <= 99 for x in args):
            raise ValueError(f"add needs two ints 0-99, got {args!r}")
    else:
        ok = len(args) == 2 and isinstance(args[0], str) and re.fullmatch("[a-z]+", args[0])
        if not ok or not isinstance(args[1], int) or not _REPEAT_N[0] <= args[1] <= _REPEAT_N[1]:
            raise ValueError(f"repeat needs (word, n in {_REPEAT_N[0]}-{_REPEAT_N[1]}), got {args!r}")


def _correct(task: Task) -> tuple:
    """The correct answer as a value: a tuple of items for list-like families, an int for add."""
    if task.family == "sort":
        return tuple(sorted(task.args))
    if task.family == "reverse":
        return tuple(reversed(task.args))
    if task.family == "add":
        return (task.args[0] + task.args[1],)
    return (task.args[0],) * task.args[1]


def _fmt_answer(family: str, items: tuple) -> str:
    if family in ("sort", "reverse"):
        return ", ".join(str(x) for x in items)
    if family == "add":
        return str(items[0])
    return " ".join(items)


@lru_cache(maxsize=65536)
def parse_prompt(prompt: str) -> Task:
    """Recover the :class:`Task` from its prompt text alone (ValueError if it is not a tiny-task prompt)."""
    text = prompt.strip()
    for family, patterns in _PROMPT_RES.items():
        for template, pat in enumerate(patterns):
            m = pat.fullmatch(text)
            if m is None:
                continue
            try:
                if family == "sort":
                    args: tuple = tuple(int(x) for x in m.group(1).split(", "))
                elif family == "reverse":
                    args = tuple(m.group(1).split(", "))
                elif family == "add":
                    args = (int(m.group(1)), int(m.group(2)))
                else:
                    args = (m.group(1), int(m.group(2)))
                return Task(family, args, template)
            except ValueError as e:
                raise ValueError(f"not a valid tiny-task prompt: {prompt!r} ({e})") from None
    raise ValueError(f"not a tiny-task prompt: {prompt!r}")


# ---------------------------------------------------------------------------------------------- gold judge


def _positional(got: list, want: tuple) -> float:
    """Share of positions right; a wrong item count costs through the larger denominator."""
    if not got:
        return 0.0
    hits = sum(1 for g, w in zip(got, want, strict=False) if g == w)
    return hits / max(len(got), len(want))


def _content_score(task: Task, text: str) -> tuple[float, bool]:
    """Score of the answer prefix of ``text`` (already stripped) and whether text follows it."""
    want = _correct(task)
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


# ----------------------------------------------------------------------------------------------- sampling


# repeat has only 200 words x 4 counts = 800 keys: hold out 20% of them so 100 distinct held-out prompts exist.
_HELDOUT_MODULUS = {"repeat": 5}


def is_heldout(task: Task) -> bool:
    """Whether ``task`` belongs to the held-out split: crc32 of its key % 10 == 0 (a stable 10%; 20% for repeat).

    The key is the item list (sort: as a set, reverse: in order), the number pair, or the (word, N) pair,
    so held-out prompts share none of these with training prompts. Words themselves are shared: measured
    on the tiny model, a prompt whose word never appeared in any instruction scored 0.0 after SFT
    (reverse and repeat), against 0.64 and 0.80 on training words; such a split measures nothing.
    """
    return zlib.crc32(task.key.encode()) % _HELDOUT_MODULUS.get(task.family, 10) == 0


def _in_split(task: Task, split: str) -> bool:
    return is_heldout(task) == (split == "heldout")


def sample_task(rng: random.Random, family: str | None = None, split: str = "train") -> Task:
    """Draw a random task of ``family`` (uniform over FAMILIES if None) from ``split`` ("train"/"heldout").

    The splits are disjoint: no item list, number pair or (word, N) pair is shared.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if family is None:
        family = rng.choice(FAMILIES)
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}")
    words = WORDS
    template = rng.randrange(len(_TEMPLATES[family]))
    for _ in range(10_000):
        if family == "sort":
            args: tuple = tuple(rng.sample(range(100), rng.randint(*_N_ITEMS)))
        elif family == "reverse":
            args = tuple(rng.sample(words, rng.randint(*_N_ITEMS)))
        elif family == "add":
            args = (rng.randrange(100), rng.randrange(100))
        else:
            args = (rng.choice(words), rng.randint(*_REPEAT_N))
        task = Task(family, args, template)
        if _in_split(task, split):
            return task
    raise RuntimeError(f"could not sample a {split} {family} task")  # pragma: no cover


# ------------------------------------------------------------------------------------------- demonstrator


def _swap_adjacent(items: tuple, rng: random.Random) -> tuple:
    i = rng.randrange(len(items) - 1)
    out = list(items)
    out[i], out[i + 1] = out[i + 1], out[i]
    return tuple(out)


def _mistakes(task: Task, rng: random.Random) -> list[str]:
    """Systematic mistakes people make, each with 0 < gold content score < 1 (one of each kind)."""
    want = _correct(task)
    fam = task.family
    if fam == "sort":
        return [_fmt_answer(fam, _swap_adjacent(want, rng))]
    if fam == "reverse":
        rotated = (task.args[-1],) + task.args[:-1]  # moved the last item to the front instead of reversing
        dropped = want[:-1]  # stopped one item early
        return [_fmt_answer(fam, x) for x in (_swap_adjacent(want, rng), rotated, dropped)]
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
    want = _correct(task)
    fam = task.family
    if fam == "sort":
        others = [x for x in range(100) if x not in task.args]
        return [
            _fmt_answer(fam, task.args),  # copied the input
            _fmt_answer(fam, tuple(reversed(want))),  # descending
            _fmt_answer(fam, want[:-1]),  # dropped the largest
            _fmt_answer(fam, tuple(sorted(rng.sample(others, len(want))))),
        ]
    if fam == "reverse":
        others = [w for w in WORDS if w not in task.args]
        return [
            _fmt_answer(fam, task.args),  # copied the input
            _fmt_answer(fam, want[:1]),  # only the first item
            _fmt_answer(fam, tuple(rng.sample(others, len(want)))),
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
