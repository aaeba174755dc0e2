"""The PPO update: its optimizer and schedule, and the losses of one micro-batch (clipped policy loss, clipped
value loss, PPO-ptx LM loss)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import get_scheduler

from instruct_tune.models.reward import pad_right
from instruct_tune.ppo import core
from instruct_tune.ppo.scoring import ScoredBatch, response_slice

__all__ = ["micro_batch_loss", "optimizer_and_scheduler", "ptx_lm_loss", "with_text_rows"]


def optimizer_and_scheduler(
    trainable: nn.Module, args: Any, updates: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the trainable parameters and the `lr_scheduler_type` schedule over `updates` optimizer
    steps, from the options of a `PPOStageConfig`."""
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
    )
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.get_warmup_steps(updates),
        num_training_steps=updates,
    )
    return optimizer, scheduler


def ptx_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the real tokens of a right-padded text batch."""
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def with_text_rows(
    ids: torch.Tensor, mask: torch.Tensor, rows: Sequence[Sequence[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ids`/`mask` with the token id lists `rows` appended below, everything right padded to one width."""
    text = pad_right(rows, pad_token_id).to(ids.device)
    lengths = torch.as_tensor([len(r) for r in rows], device=ids.device)
    text_mask = (torch.arange(text.shape[1], device=ids.device)[None, :] < lengths[:, None]).long()
    width = max(ids.shape[1], text.shape[1])

    def widen(t: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(t, (0, width - t.shape[1]), value=value)

    return (
        torch.cat([widen(ids, pad_token_id), widen(text, pad_token_id)]),
        torch.cat([widen(mask, 0), widen(text_mask, 0)]),
    )


def micro_batch_loss(
    model: nn.Module,
    batch: ScoredBatch,
    rows: torch.Tensor,
    ptx: Sequence[Sequence[int]],
    args: Any,
    *,
    pad_token_id: int,
    needs_values: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of rollout rows `rows` (plus `args.ptx_coef` x the LM loss of the `ptx` token id lists) and its
    statistics. `model` is the (distributed) `PolicyAndValue`; `args` a `PPOStageConfig`. Without
    `needs_values` the value loss is left out."""
    part = batch.rollout.select(rows)
    ids, mask = part.input_ids, part.attention_mask
    n_ppo = len(rows)
    if ptx:  # the LM loss needs every position's logits
        ids, mask = with_text_rows(ids, mask, ptx, pad_token_id)
        logits, values = model(ids, mask)
        response_logits, vpred = response_slice(logits[:n_ppo], part), response_slice(values[:n_ppo], part)
    else:
        response_logits, vpred = model(ids, mask, part.response.shape[1])
    logprobs = core.logprobs_from_logits(response_logits, part.response, args.temperature)
    vpred = vpred.float()
    rmask = part.response_mask
    pg_loss, pg_stats = core.policy_loss(
        logprobs, batch.logprobs[rows], batch.advantages[rows], rmask, args.cliprange
    )
    stats = {"loss/policy": pg_loss.detach()}
    if needs_values:
        vf_loss, vf_stats = core.value_loss(
            vpred, batch.values[rows], batch.returns[rows], rmask, args.cliprange_value
        )
        loss = pg_loss + args.vf_coef * vf_loss
        stats["loss/value"] = vf_loss.detach()
    else:
        # No value loss, but the values stay in the graph: distributed training expects a gradient (here zero)
        # for every trainable parameter.
        loss = pg_loss + 0.0 * vpred.sum()
    stats.update(
        {
            "policy/clipfrac": pg_stats["clipfrac"],
            "policy/approxkl": pg_stats["approxkl"],
            "policy/ratio": pg_stats["ratio"],
        }
    )
    if needs_values:
        stats["val/clipfrac"] = vf_stats["clipfrac"]
    if ptx:
        lm = ptx_lm_loss(logits[n_ppo:], ids[n_ppo:], mask[n_ppo:])
        loss = loss + args.ptx_coef * lm
        stats["loss/ptx"] = lm.detach()
    return loss, stats
