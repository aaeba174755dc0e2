"""A reward model's forward pass over packed rows (`GroupedPreferenceCollator(share_prompt=True)`).

The prompt of K responses is computed once; a custom 4D attention mask keeps each response to its prompt
and itself, and the score head is read at every response's EOS token.
"""

from __future__ import annotations

import torch
from torch import nn

from instruct_tune.compat import attn_implementation
from instruct_tune.data.reward_collator import packed_attention_mask

# Attention implementations that take a custom 4D mask: boolean (sdpa) or additive (eager).
PACKED_ATTENTION = ("sdpa", "eager")


def attention_implementation(model: nn.Module) -> str | None:
    return attn_implementation(model)


def packed_rewards(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rewards of every response of packed rows: the score head's output at each response's EOS token.

    The sequence-classification head pools at one token per row; a hook on it (`score`) collects its
    output at every position instead, and `reward_index` picks the responses' last tokens.
    """
    allowed = packed_attention_mask(inputs["segment_ids"], inputs["group_ids"])
    if attention_implementation(model) == "eager":
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)
    else:
        mask = allowed
    name = _score_module_name(model)
    if name is None:
        raise ValueError("the reward model has no `score` head: train with `share_prompt: false`")
    head = model.get_submodule(name)
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _module, _args, output: captured.append(output))
    try:
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=mask,
            position_ids=inputs["position_ids"],
            use_cache=False,
        )
    finally:
        handle.remove()
    per_token = captured[-1][..., 0].reshape(-1)
    return per_token[inputs["reward_index"]].to(outputs.logits.dtype)


def _score_module_name(model: nn.Module) -> str | None:
    """Name of the outermost `score` module (PEFT wraps the head; the wrapper's output is the trained one)."""
    names = [name for name, _ in model.named_modules() if name.split(".")[-1] == "score"]
    return min(names, key=len) if names else None


def can_share_prompt(model: nn.Module) -> bool:
    """Whether packed rows work for this model: a `score` head and an attention taking custom 4D masks."""
    return _score_module_name(model) is not None and attention_implementation(model) in PACKED_ATTENTION
