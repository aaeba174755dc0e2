"""Judges of policy responses, chosen by name in the eval config (`gold_judge`, `judges`).

    register_judge("length", lambda config: LengthJudge())
    judge = judge_by_name("length", config, option="judges")
    judge.check(prompts)                     # PromptNotJudged naming the first prompt row it cannot judge
    judge.score(prompts, responses, ended)   # one float per response, higher is better

A judge only scores: eval compares each policy's score with the SFT policy's for the same prompt and draw
(a tie within `tie_tolerance`, counting half) and breaks figures down by the prompt's task family itself.
The reward model is registered here as `reward_model`; the tiny task's gold judge registers itself as
`tiny_gold` from `instruct_tune.tiny.judge` (imported by the eval stage), so this package stays task-free.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from instruct_tune.config import ConfigError

if TYPE_CHECKING:
    from instruct_tune.config import EvalStageConfig

REWARD_MODEL = "reward_model"
RM, GOLD = "rm", "gold"  # labels naming the figures of the reward model and of the config's `gold_judge`
# Labels an extra judge cannot take: its figures (`<label>_mean`, `<label>/<family>`, `win_rate_vs_sft_<label>`)
# and samples' field `<label>` would collide with these figures and fields.
RESERVED_LABELS = frozenset(
    {RM, GOLD, "reward", "greedy", "kl", "policy", "decoding", "index", "sample", "task", "prompt", "response",
     "ended_with_eos", "length"}
)  # fmt: skip


@dataclass(frozen=True)
class Prompt:
    """A held-out prompt as judges see it."""

    # the row of the prompt file, counting from 1 (after `max_samples`): every draw of a prompt shares it
    row: int
    messages: list[dict[str, str]]  # the chat prompt, as the policies read it
    text: str  # content of the last user turn
    task: str  # the row's task tag: eval's per-family breakdown


class PromptNotJudged(ValueError):
    """A judge cannot score responses to this prompt (e.g. the gold judge cannot parse it)."""

    def __init__(self, prompt: Prompt, reason: str) -> None:
        super().__init__(f"prompt row {prompt.row} ({prompt.text[:80]!r}): {reason}")
        self.prompt = prompt
        self.reason = reason


@runtime_checkable
class Judge(Protocol):
    """Scores responses to prompts; eval turns the scores into means and win rates against SFT."""

    name: str
    description: str  # how the results report names it, e.g. "the reward model"
    tie_tolerance: float  # scores this close count as a tie

    def check(self, prompts: Sequence[Prompt]) -> None:
        """Raise PromptNotJudged for the first prompt this judge cannot score (before anything is generated)."""

    def score(
        self, prompts: Sequence[Prompt], responses: Sequence[str], ended: Sequence[bool]
    ) -> list[float]:
        """One score per response (`ended`: it closed with EOS rather than at `max_new_tokens`)."""

    def references(self, prompts: Sequence[Prompt]) -> list[str] | None:
        """The right answer to each prompt, when the judge knows it (exact match and ROUGE-L), else None."""


class JudgeBase:
    """Defaults for a `Judge`: every prompt judgeable, exact ties only, no reference answers."""

    name = "judge"
    tie_tolerance = 0.0

    @property
    def description(self) -> str:
        return f"the {self.name} judge"

    def check(self, prompts: Sequence[Prompt]) -> None:
        return None

    def score(
        self, prompts: Sequence[Prompt], responses: Sequence[str], ended: Sequence[bool]
    ) -> list[float]:
        raise NotImplementedError

    def references(self, prompts: Sequence[Prompt]) -> list[str] | None:
        return None


JudgeFactory = Callable[["EvalStageConfig"], Judge]
_FACTORIES: dict[str, JudgeFactory] = {}


def register_judge(name: str, factory: JudgeFactory, *, replace: bool = False) -> None:
    """Make `factory(eval_config) -> Judge` choosable as `name` in the eval config."""
    if name in _FACTORIES and not replace and _FACTORIES[name] is not factory:
        raise ValueError(f"a judge named {name!r} is already registered (pass replace=True to replace it)")
    _FACTORIES[name] = factory


def unregister_judge(name: str) -> None:
    """Forget the judge registered as `name` (a no-op when there is none)."""
    _FACTORIES.pop(name, None)


def registered_judges() -> list[str]:
    """The names `judge_by_name` knows, sorted."""
    return sorted(_FACTORIES)


def judge_by_name(name: str, config: EvalStageConfig, *, option: str = "judges") -> Judge:
    """The judge registered as `name`, built for `config`; an unknown name is a ConfigError naming `option`."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ConfigError(
            f"{option}: no judge named {name!r} (registered: {', '.join(registered_judges()) or 'none'}; "
            "add one with instruct_tune.evaluation.judges.register_judge)"
        )
    return factory(config)


class RewardModelJudge(JudgeBase):
    """The reward stage's model: its normalised score (`RewardModel.score`) of each (prompt, response).

    It reads a response as a finished assistant turn (the chat template closes it with EOS), so `ended` does
    not change a score. The model is loaded for each `score` call and freed after it: eval scores every answer
    in one call, once the policies are out of memory.
    """

    name = REWARD_MODEL
    description = "the reward model"

    def __init__(self, path: str, *, batch_size: int, trust_remote_code: bool = False) -> None:
        self.path, self.batch_size, self.trust_remote_code = path, batch_size, trust_remote_code

    def score(
        self, prompts: Sequence[Prompt], responses: Sequence[str], ended: Sequence[bool]
    ) -> list[float]:
        from instruct_tune.models.reward import load_reward_model

        # Each distinct (prompt, response) once: batch padding moves the last digits of a score, and equal
        # responses must get exactly equal scores (a tie).
        unique: dict[tuple[int, str], Prompt] = {}
        for prompt, response in zip(prompts, responses, strict=True):
            unique.setdefault((prompt.row, response), prompt)
        rm = load_reward_model(self.path, trust_remote_code=self.trust_remote_code)
        pairs = list(unique.items())
        values = rm.score(
            [p.messages for _, p in pairs], [r for (_, r), _ in pairs], self.batch_size
        ).tolist()
        by_pair: Mapping[tuple[int, str], float] = dict(zip(unique, values, strict=True))
        return [by_pair[(p.row, r)] for p, r in zip(prompts, responses, strict=True)]


def chosen_judges(config: EvalStageConfig) -> list[tuple[str, Judge]]:
    """(label, judge) of every judge `config` chooses: the reward model (`rm`), the `gold_judge` (`gold`) and
    each of `judges`, labelled by its registered name."""
    names = [(RM, REWARD_MODEL, "reward_model_path")]  # (label, registered name, the option naming it)
    if config.gold_judge:
        names.append((GOLD, config.gold_judge, "gold_judge"))
    for name in config.judges:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in RESERVED_LABELS:
            raise ConfigError(
                f"judges: {name!r} cannot name figures (use lower-case letters, digits and _, none of "
                f"{', '.join(sorted(RESERVED_LABELS))})"
            )
        if name in {n for _, n, _ in names}:
            raise ConfigError(
                f"judges: {name} is judging already (the reward model, gold_judge, or listed twice)"
            )
        names.append((name, name, "judges"))
    return [(label, judge_by_name(name, config, option=option)) for label, name, option in names]


def check_judgeable(judges: Sequence[tuple[str, Judge]], prompts: Sequence[Prompt], dataset: str) -> None:
    """Every judge can score every prompt: else a ConfigError naming the option, the judge and the prompt row."""
    for label, judge in judges:
        try:
            judge.check(prompts)
        except PromptNotJudged as error:
            option = {GOLD: "gold_judge", RM: "reward_model_path"}.get(label, "judges")
            raise ConfigError(
                f"{option}: {judge.name} cannot judge {dataset}, {error}; choose another judge "
                "(gold_judge: null for the reward model alone) or other prompts"
            ) from None


def _reward_model_judge(config: EvalStageConfig) -> Judge:
    if not config.reward_model_path:
        raise ConfigError("reward_model_path: not set (give the run folder)")
    return RewardModelJudge(
        config.reward_model_path, batch_size=config.batch_size, trust_remote_code=config.trust_remote_code
    )


register_judge(REWARD_MODEL, _reward_model_judge)
