"""The language-modelling loss of `trl.SFTTrainer` through the model's own LM head, where TRL's fused head is slow.

`trl.SFTTrainer` patches every model with a fused LM head (`trl.trainer.utils.add_fused_lm_head`): per-token
log-probabilities, entropy and top-1 flags computed in vocabulary tiles without the full logits. On CUDA that is
a Triton kernel; elsewhere it is a chain of element-wise torch ops over each tile. Measured on CPU (2 threads,
the 1M-parameter tiny GPT-2, 32 x 128 tokens a step): that fallback took 0.37 s of a 0.76 s pretraining step,
where `log_softmax` over the projected valid positions takes a few hundredths.

`select_lm_head` swaps only that computation: TRL's `compute_loss` still calls `model(..., fused_lm_head=True)`
and gets the same fields back (loss, per-token log-probs, entropy, top-1 flags, label mask), so its metrics, token
counts and loss scaling across processes are untouched.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from instruct_tune.compat import fused_lm_output
from instruct_tune.models.packed_forward import has_plain_lm_head


# Logits of at most this many elements at a time (64 MB in float32): a longer batch of a large vocabulary is
# projected chunk by chunk, each chunk recomputed in the backward, so memory stays near TRL's tiled head.
CHUNK_ELEMENTS = 2**24


def _chunk_outputs(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = head(hidden).float()
    log_softmax = torch.log_softmax(logits, dim=-1)
    log_probs = log_softmax.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(log_softmax.exp() * log_softmax).sum(-1)
        top1 = logits.argmax(-1) == targets
    return log_probs, entropy, top1


def head_outputs(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probability of each target (with gradient), entropy and top-1 flag (without) of `head(hidden)`,
    for (N, H) hidden states and N targets; over `CHUNK_ELEMENTS` logits, in checkpointed chunks."""
    rows = max(1, CHUNK_ELEMENTS // vocab_size)
    if hidden.shape[0] <= rows:
        return _chunk_outputs(head, hidden, targets)
    parts = [
        checkpoint(_chunk_outputs, head, h, t, use_reentrant=False)
        for h, t in zip(hidden.split(rows), targets.split(rows), strict=True)
    ]
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))


def select_lm_head(model: torch.nn.Module, device: torch.device, fused: bool | None = None) -> bool:
    """Keep TRL's fused LM head (`fused`, or by default on CUDA, where it is a Triton kernel) or answer its
    `fused_lm_head=True` calls with the model's own head and `log_softmax`; returns whether the plain head is on.

    `model` is the trainer's model after `trl.SFTTrainer` patched it (a PEFT model is unwrapped to the base that
    TRL patched). Models whose logits are not the head applied to the last hidden state (soft-capping, logit
    scaling) and MoE models keep TRL's head.
    """
    if fused or (fused is None and device.type == "cuda"):
        return False
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    text_config = model.config.get_text_config()
    if not has_plain_lm_head(model) or getattr(text_config, "output_router_logits", False):
        return False
    trl_forward = model.forward

    def forward(
        self: torch.nn.Module,
        *args: Any,
        fused_lm_head: bool = False,
        labels: torch.Tensor | None = None,
        shift_labels: torch.Tensor | None = None,
        num_items_in_batch: Any = None,
        **kwargs: Any,
    ) -> Any:
        if not fused_lm_head or shift_labels is not None:
            return trl_forward(
                *args,
                fused_lm_head=fused_lm_head,
                labels=labels,
                shift_labels=shift_labels,
                num_items_in_batch=num_items_in_batch,
                **kwargs,
            )
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:]
        mask = labels != -100
        # Only the positions with a label are projected: a completion-only batch skips its prompts.
        valid_log_probs, valid_entropy, valid_top1 = head_outputs(
            self.get_output_embeddings(), hidden[mask], labels[mask], text_config.vocab_size
        )
        # masked_scatter keeps an all-ignored batch connected to the graph (a zero loss with a gradient).
        log_probs = hidden.new_zeros(mask.shape, dtype=valid_log_probs.dtype).masked_scatter(mask, valid_log_probs)
        entropy = torch.zeros_like(log_probs).masked_scatter(mask, valid_entropy)
        is_top1 = torch.zeros_like(mask).masked_scatter(mask, valid_top1)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return fused_lm_output(
            loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy, is_top1=is_top1, label_mask=mask
        )

    model.forward = types.MethodType(forward, model)
    return True
