"""Padding-free forwards over padded batches: the real tokens packed into rows, the outputs put back.

A PPO batch is left-padded prompts followed by right-padded responses; on the tiny default only 21 of its 43
columns are real tokens on average. `Packing` lays the real tokens of several sequences side by side in rows
no wider than the padded batch (first-fit decreasing), with position ids restarting at every sequence and no
2D attention mask, so transformers builds a block-diagonal causal mask per row (as for
`instruct_tune.data.row_packing`): no token attends across sequences and each sequence sees the positions it
sees alone. The body runs over about half the positions; `Packing.gather` puts the outputs back in the padded
layout (zeros at padding), so everything after it (heads, logprobs, GAE) is unchanged.
"""

from __future__ import annotations

import torch

from instruct_tune.data.row_packing import first_fit_decreasing

__all__ = ["Packing", "has_plain_lm_head"]


class Packing:
    """Where each real token of a padded `[batch, length]` batch goes in a packed `[rows, length]` batch.

    Every row of `attention_mask` must hold its real tokens in one contiguous run (left-padded prompt, then
    right-padded response); `Packing.of` returns None when one does not, or when packing would save nothing.
    """

    def __init__(self, starts: torch.Tensor, lengths: torch.Tensor, width: int) -> None:
        batch = len(lengths)
        self.batch, self.length = batch, width
        place = first_fit_decreasing(lengths.tolist(), width)
        self.rows = 1 + max((r for r, _ in place), default=0)
        device = lengths.device
        rows = torch.tensor([r for r, _ in place], device=device, dtype=torch.long)
        offsets = torch.tensor([o for _, o in place], device=device, dtype=torch.long)
        seq = torch.repeat_interleave(torch.arange(batch, device=device), lengths)
        # Position of each real token inside its own sequence: 0, 1, ... from the sequence's first real token.
        within = torch.arange(len(seq), device=device) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
        self.source = seq * width + starts[seq] + within  # flat index in the padded batch
        self.target = rows[seq] * width + offsets[seq] + within  # flat index in the packed batch
        # Padding at the end of a row counts 0, 1, ... as one more sequence of its own.
        position_ids = torch.arange(self.rows * width, device=device) % width
        row_used = torch.zeros(self.rows, dtype=torch.long, device=device).index_add_(
            0, rows, lengths.to(torch.long)
        )
        position_ids = position_ids - row_used.repeat_interleave(width)
        position_ids[self.target] = within
        self.position_ids = position_ids.view(self.rows, width)
        # Packed flat index of every padded position (-1: padding).
        lookup = torch.full((batch * width,), -1, dtype=torch.long, device=device)
        lookup[self.source] = self.target
        self.lookup = lookup.view(batch, width)

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> Packing | None:
        """The packing of a padded batch, or None when its real tokens are not contiguous or fill one row each."""
        mask = attention_mask.bool()
        lengths = mask.sum(dim=1)
        width = mask.shape[1]
        if len(lengths) < 2 or bool((lengths == 0).any()):
            return None
        starts = mask.int().argmax(dim=1)
        columns = torch.arange(width, device=mask.device)
        contiguous = (columns >= starts[:, None]) & (columns < (starts + lengths)[:, None])
        if not torch.equal(contiguous, mask):
            return None
        packing = cls(starts, lengths, width)
        return packing if packing.rows < packing.batch else None

    def pack(self, input_ids: torch.Tensor, pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """`(packed input ids, position ids)`, both `[rows, length]`."""
        packed = torch.full((self.rows * self.length,), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
        packed[self.target] = input_ids.reshape(-1)[self.source]
        return packed.view(self.rows, self.length), self.position_ids

    def gather(self, packed: torch.Tensor, columns: slice = slice(None)) -> torch.Tensor:
        """Outputs `[rows, length, ...]` of the packed batch at the padded batch's `columns`: `[batch, cols, ...]`,
        zeros at padding (differentiable)."""
        index = self.lookup[:, columns]
        flat = packed.reshape(self.rows * self.length, *packed.shape[2:])
        picked = flat.index_select(0, index.clamp(min=0).reshape(-1))
        keep = (index >= 0).reshape(-1, *([1] * (packed.dim() - 2))).to(picked.dtype)
        return (picked * keep).view(*index.shape, *packed.shape[2:])


def has_plain_lm_head(model: torch.nn.Module) -> bool:
    """Whether a causal LM's logits are its output embedding applied to the body's last hidden state (no
    soft-capping or scaling in its forward), so a packed forward can apply the head itself."""
    config = getattr(model, "config", None)
    if config is None or model.get_output_embeddings() is None:
        return False
    text = getattr(config, "get_text_config", lambda: config)()
    altered = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
    return all(getattr(text, name, None) in (None, 1, 1.0) for name in altered)
