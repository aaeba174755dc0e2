"""Preference data as the (prompt, chosen, rejected) rows of `trl.DPOTrainer`.

    groups = group_comparisons(pairs)       # one row per prompt: responses, better, worse
    rows = dpo_rows(groups, "all")          # prompt / chosen / rejected, conversational

Every preference format the data layer reads (chosen/rejected pairs, HH-RLHF, ShareGPT preference, K-way
rankings) arrives as one row per prompt with its distinct responses and the (better, worse) index pairs among
them (`instruct_tune.data.preference_groups`). A ranking of K responses becomes DPO pairs by `dpo_pairs`:

- `all` (default): every (better, worse) pair of the prompt, C(K,2) of them (6 for K=4): (1st, 2nd),
  (1st, 3rd), ..., (2nd, 3rd), ..., each once.
- `best`: the top-ranked response against each of the others, K-1 pairs (3 for K=4). The top-ranked response
  is the one that wins the most pairs of its prompt (a strict ranking's first; the first listed of equals).

A plain chosen/rejected row is one pair under either rule. Prompts stay conversational (lists of messages) so
that TRL renders them with the policy's own chat template; each response becomes one assistant turn.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from datasets import Dataset

from instruct_tune.data.preference_groups import as_messages

PAIR_RULES = ("all", "best")


def group_pairs(better: Sequence[int], worse: Sequence[int], rule: str) -> list[tuple[int, int]]:
    """The (chosen, rejected) response indices of one prompt under `rule` (`all` or `best`, see the module)."""
    pairs = list(zip(better, worse, strict=True))
    if rule == "all":
        return pairs
    if rule != "best":
        raise ValueError(f"dpo_pairs: {rule!r} is not one of {', '.join(PAIR_RULES)}")
    if not pairs:
        return []
    wins = Counter(better)
    top = max(wins, key=lambda i: (wins[i], -i))
    return [(win, lose) for win, lose in pairs if win == top]


def dpo_rows(groups: Dataset, rule: str = "all") -> Dataset:
    """One DPO row per pair chosen by `rule` from grouped preference data (`group_comparisons`' output).

    Rows: `prompt` (messages), `chosen` and `rejected` (one assistant turn each), and the prompt's `task` and
    `group_id` where the groups have them.
    """
    columns = groups.to_dict()
    extras = [name for name in ("task", "group_id") if name in columns]
    rows: list[dict[str, Any]] = []
    for i, (prompt, responses, better, worse) in enumerate(
        zip(columns["prompt"], columns["responses"], columns["better"], columns["worse"], strict=True)
    ):
        messages = as_messages(prompt)
        for win, lose in group_pairs(better, worse, rule):
            row = {"prompt": messages, "chosen": _turn(responses[win]), "rejected": _turn(responses[lose])}
            rows.append(row | {name: columns[name][i] for name in extras})
    return Dataset.from_list(rows)


def _turn(text: str) -> list[Mapping[str, str]]:
    return [{"role": "assistant", "content": text}]
