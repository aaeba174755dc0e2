"""Which prompts and PPO-ptx rows each process reads at each step: pure functions of the step, so a resumed
run reads what the interrupted one would have. `args` is a `PPOStageConfig`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["prompt_batch", "ptx_batch"]


def prompt_batch(
    prompts: Sequence[Sequence[int]], step: int, args: Any, world: int = 1, rank: int = 0
) -> list[Sequence[int]]:
    """Process `rank`'s `rollout_batch_size` prompts of `step`: episodes in a fresh seeded permutation per
    pass over the prompts."""
    batch = args.rollout_batch_size
    start = (step * world + rank) * batch
    rows = []
    for episode in range(start, start + batch):
        epoch, index = divmod(episode, len(prompts))
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed + epoch))
        rows.append(prompts[order[index]])
    return rows


def ptx_batch(
    rows: Sequence[Sequence[int]],
    step: int,
    epoch: int,
    minibatch: int,
    args: Any,
    world: int = 1,
    rank: int = 0,
) -> list[Sequence[int]]:
    """Process `rank`'s `ptx_batch_size` PPO-ptx rows of one minibatch, read in order, cycling (none: [])."""
    if not rows:
        return []
    n = args.ptx_batch_size
    per_step = args.ppo_epochs * args.num_mini_batches * n
    start = (step * world + rank) * per_step
    start += (epoch * args.num_mini_batches + minibatch) * n
    return [rows[(start + i) % len(rows)] for i in range(n)]
