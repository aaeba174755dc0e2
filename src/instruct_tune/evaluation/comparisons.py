"""A reward model on held-out comparisons: pairwise accuracy, mean margin and calibration.

    diffs, tasks = pair_differences(rm, tokenized_eval_groups)      # r(better) - r(worse) per comparison
    comparison_metrics(diffs, tasks, tags=["add", "sort"])           # eval_accuracy, eval_margin, per tag
    calibration_markdown(calibration_table(diffs, buckets=5))

The calibration table buckets comparisons by |r_a - r_b| and sets each bucket's accuracy beside the
Bradley-Terry prediction sigmoid(|r_a - r_b|).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from datasets import Dataset

if TYPE_CHECKING:
    from instruct_tune.models.reward import RewardModel


@torch.no_grad()
def pair_differences(
    rm: RewardModel, groups: Dataset, batch_size: int = 64
) -> tuple[torch.Tensor, list[Any]]:
    """r(better) - r(worse) of every comparison of tokenised `groups`, with each comparison's task tag."""
    rows = groups.to_dict()
    rewards = rm.raw_score_ids([ids for row in rows["input_ids"] for ids in row], batch_size=batch_size)
    better, worse, tasks = [], [], []
    offset = 0
    for i, responses in enumerate(rows["input_ids"]):
        better.extend(offset + b for b in rows["better"][i])
        worse.extend(offset + w for w in rows["worse"][i])
        tasks.extend([rows["task"][i] if "task" in rows else None] * len(rows["better"][i]))
        offset += len(responses)
    return rewards[better] - rewards[worse], tasks


def _accuracy(diffs: torch.Tensor) -> float:
    """Share of comparisons ordered right; an exact tie counts half."""
    return ((diffs > 0).float() + 0.5 * (diffs == 0).float()).mean().item()


def comparison_metrics(
    diffs: torch.Tensor, tasks: Sequence[Any], tags: Sequence[str], prefix: str = "eval"
) -> dict[str, float]:
    """`<prefix>_accuracy`, `<prefix>_margin`, and the same over the comparisons of each of `tags`.

    `tasks` is each comparison's tag; which tags to report is the caller's (`stages.data_sources.task_tags`).
    """
    metrics = {f"{prefix}_accuracy": _accuracy(diffs), f"{prefix}_margin": diffs.mean().item()}
    for name in tags:
        mask = torch.tensor([t == name for t in tasks])
        metrics[f"{prefix}_{name}_accuracy"] = _accuracy(diffs[mask])
        metrics[f"{prefix}_{name}_margin"] = diffs[mask].mean().item()
    return metrics


def calibration_table(diffs: torch.Tensor, buckets: int = 5) -> list[dict[str, float]]:
    """Accuracy by equal-count bucket of |r_a - r_b|, beside the predicted P = mean sigmoid(|r_a - r_b|).

    A calibrated reward model (Bradley-Terry) has accuracy close to the prediction in every bucket.
    """
    gaps = diffs.abs()
    order = torch.argsort(gaps)
    rows = []
    n = len(diffs)
    for b in range(min(buckets, n)):
        idx = order[b * n // buckets : (b + 1) * n // buckets]
        if len(idx) == 0:
            continue
        rows.append(
            {
                "min_gap": gaps[idx].min().item(),
                "max_gap": gaps[idx].max().item(),
                "n": len(idx),
                "accuracy": _accuracy(diffs[idx]),
                "predicted": torch.sigmoid(gaps[idx]).mean().item(),
            }
        )
    return rows


def calibration_markdown(table: Sequence[Mapping[str, float]]) -> str:
    """The calibration table as Markdown (the run folder's `calibration.md` and the model card)."""
    lines = [
        "| abs(r_a - r_b) | comparisons | accuracy | predicted sigmoid(abs(r_a - r_b)) |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['min_gap']:.3g} - {r['max_gap']:.3g} | {r['n']} | {r['accuracy']:.3f} | {r['predicted']:.3f} |"
        for r in table
    ]
    return "\n".join(lines)
