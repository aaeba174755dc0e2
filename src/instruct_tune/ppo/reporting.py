"""What a PPO step reports: its statistics (log history, trackers, progress bar) and sampled generations."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

from instruct_tune.models.sampling import Rollout, decode_responses
from instruct_tune.ppo import core
from instruct_tune.ppo.scoring import ScoredBatch

logger = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"

__all__ = ["SAMPLES_FILE", "fmt", "log_samples", "rollout_stats", "step_stats"]


def rollout_stats(
    batch: ScoredBatch, entropy: torch.Tensor, with_values: bool = True
) -> dict[str, torch.Tensor]:
    """This process's statistics of a scored rollout (means over its responses); `with_values`: the value
    model's too (an advantage estimator that reads no values leaves them meaningless)."""
    mask = batch.rollout.response_mask
    stats = {
        "objective/scores": batch.scores.mean(),
        "objective/kl": batch.kl.sum(1).mean(),
        "objective/non_score_reward": batch.non_score_reward.sum(1).mean(),
        "objective/rlhf_reward": (batch.scores + batch.non_score_reward.sum(1)).mean(),
        "objective/entropy": core.masked_mean(entropy, mask),
        "response/length": mask.sum(1).float().mean(),
        "response/eos_share": batch.rollout.has_eos.float().mean(),
    }
    if with_values:
        stats["val/mean"] = core.masked_mean(batch.values, mask)
        stats["val/returns"] = core.masked_mean(batch.returns, mask)
    return stats


def step_stats(
    accelerator: Accelerator,
    batch: ScoredBatch,
    entropy: torch.Tensor,
    train_stats: dict[str, float],
    timings: dict[str, float],
    ppo_epochs: int,
    with_values: bool = True,
) -> dict[str, float]:
    """A step's statistics: `rollout_stats` averaged over the processes, the update's `train_stats`, speeds
    and times (`timings`: seconds of "generate" and "train")."""
    mask = batch.rollout.response_mask
    local = rollout_stats(batch, entropy, with_values)
    keys = sorted(local)
    reduced = accelerator.reduce(torch.stack([local[k].float() for k in keys]), reduction="mean")
    stats = {k: float(v) for k, v in zip(keys, reduced.tolist(), strict=True)}
    stats.update(train_stats)
    world = accelerator.num_processes
    tokens = float(mask.sum() + batch.rollout.query_mask.sum()) * world
    stats["speed/generation_tokens_per_s"] = float(mask.sum()) * world / timings["generate"]
    stats["speed/train_tokens_per_s"] = tokens * ppo_epochs / timings["train"]
    stats["time/generate_s"] = timings["generate"]  # sampling the rollout
    # scoring it (reward, reference, values), the PPO epochs and the rollout backend's weight sync
    stats["time/train_s"] = timings["train"]
    return stats


def log_samples(
    tokenizer: PreTrainedTokenizerBase,
    rollout: Rollout,
    scores: torch.Tensor,
    step: int,
    n: int,
    output_dir: Path,
) -> None:
    """Append the first `n` prompts, responses and scores to `SAMPLES_FILE` and log them as a table."""
    prompts = tokenizer.batch_decode(rollout.query[:n], skip_special_tokens=True)
    responses = decode_responses(tokenizer, rollout.select(torch.arange(min(n, len(scores)))))
    rows = [
        {"step": step, "prompt": p.strip(), "response": r, "score": round(float(s), 4)}
        for p, r, s in zip(prompts, responses, scores[:n].tolist(), strict=False)
    ]
    output_dir.mkdir(parents=True, exist_ok=True)
    with (output_dir / SAMPLES_FILE).open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    table = ["| prompt | response | score |", "| --- | --- | --- |"]
    table += [f"| {r['prompt'][-60:]!r} | {r['response'][:60]!r} | {r['score']:.2f} |" for r in rows]
    logger.info("Samples at step %d:\n%s", step, "\n".join(table))


def fmt(stats: dict[str, Any]) -> str:
    """`key=value` pairs for the log, floats to 4 significant digits."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items())
