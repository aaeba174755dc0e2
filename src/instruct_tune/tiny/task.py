"""The built-in tiny instruction task: four verifiable families, a gold judge and a noisy demonstrator.

The gold judge (:func:`gold_score`) plays the human labeller: it ranks responses for the reward model's
training data and scores held-out prompts at eval time. The :class:`NoisyDemonstrator` writes SFT
demonstrations that are right most of the time but make the systematic mistakes people make (and sometimes
chat after the answer), so an SFT model copies them and PPO has headroom to improve on SFT.

Pure standard library, deterministic given a ``random.Random``. The task lives in three modules, all
re-exported here: `families` (`Task`, prompts, splits), `gold` (the judge), `demonstrator`.
"""

from __future__ import annotations

from instruct_tune.tiny.demonstrator import CHATTER, NoisyDemonstrator, expected_imperfect_share
from instruct_tune.tiny.families import FAMILIES, SPLITS, WORDS, Task, is_heldout, parse_prompt, sample_task
from instruct_tune.tiny.gold import gold_compare, gold_score

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
