"""The tiny task's gold judge as an eval judge, registered as `tiny_gold` (`gold_judge: tiny_gold`).

Importing this module registers it; the eval stage does, so configs can name it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from instruct_tune.evaluation.judges import JudgeBase, Prompt, PromptNotJudged, register_judge
from instruct_tune.tiny.task import gold_score, parse_prompt

if TYPE_CHECKING:
    from instruct_tune.config import EvalStageConfig

TINY_GOLD = "tiny_gold"


class TinyGoldJudge(JudgeBase):
    """`gold_score` of each response: 1 for the exact answer ending in EOS, partial credit otherwise."""

    name = TINY_GOLD
    description = "the gold judge of the tiny task"
    tie_tolerance = 1e-9  # as `gold_compare`

    def check(self, prompts: Sequence[Prompt]) -> None:
        for prompt in prompts:
            try:
                parse_prompt(prompt.text)
            except ValueError:
                raise PromptNotJudged(
                    prompt, "not a tiny-task prompt (only those have a gold answer)"
                ) from None

    def score(
        self, prompts: Sequence[Prompt], responses: Sequence[str], ended: Sequence[bool]
    ) -> list[float]:
        return [gold_score(p.text, r, e) for p, r, e in zip(prompts, responses, ended, strict=True)]

    def references(self, prompts: Sequence[Prompt]) -> list[str]:
        return [parse_prompt(p.text).answer for p in prompts]


def _tiny_gold(config: EvalStageConfig) -> TinyGoldJudge:
    return TinyGoldJudge()


register_judge(TINY_GOLD, _tiny_gold)
