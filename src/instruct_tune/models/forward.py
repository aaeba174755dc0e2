"""Forward passes over left-padded batches: final hidden states and causal-LM logits, padded or packed.

Positions count from each row's first real token, so a left-padded prompt reads as it would alone. PPO reads
the policy, reference, reward and value through these; evaluation reads the policy's logprobs.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from torch import nn

from instruct_tune.models.packed_forward import Packing, has_plain_lm_head

__all__ = ["backbone", "last_hidden", "lm_logits", "mask_positions"]


def backbone(model: nn.Module) -> nn.Module:
    """The transformer body of a causal-LM or sequence-classification model (PEFT wrapper or not)."""
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    return inner.base_model


def _packing(packed: bool | Packing, attention_mask: torch.Tensor) -> Packing | None:
    if isinstance(packed, Packing):
        return packed
    return Packing.of(attention_mask) if packed else None


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted from each row's first real token (left padding), as `generate` numbers them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_hidden(
    body: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, packed: bool | Packing = False
) -> torch.Tensor:
    """Final hidden states of the transformer body; positions count from each row's first real token.

    `packed`: run the body over the real tokens only (`Packing`, or the layout given), zeros at padding.
    """
    packing = _packing(packed, attention_mask)
    if packing is not None:
        ids, position_ids = packing.pack(input_ids)
        out = body(input_ids=ids, position_ids=position_ids, use_cache=False)
        return packing.gather(out.last_hidden_state)
    position_ids = mask_positions(attention_mask)
    out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def lm_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_length: int | None = None,
    packed: bool | Packing = False,
) -> torch.Tensor:
    """Causal-LM logits with positions counted from each row's first real token (left padding).

    With `response_length` R, only the logits that predict the last R tokens are computed (`[batch, R, vocab]`):
    the vocabulary projection of the prompt positions is skipped. `packed`: the body runs over the real tokens
    only (`Packing`, or the layout given; models whose head is a plain projection), logits are zero at padding.
    """
    packing = _packing(packed, attention_mask) if has_plain_lm_head(model) else None
    if packing is not None:
        ids, position_ids = packing.pack(input_ids)
        hidden = backbone(model)(input_ids=ids, position_ids=position_ids, use_cache=False).last_hidden_state
        columns = slice(-response_length - 1, -1) if response_length else slice(None)
        return model.get_output_embeddings()(packing.gather(hidden, columns))
    position_ids = mask_positions(attention_mask)
    keep = {"logits_to_keep": response_length + 1} if response_length else {}
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **keep
    ).logits
    return logits[:, :-1] if response_length else logits
