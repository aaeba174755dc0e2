"""Packed rows that keep chats apart: best-fit packing without TRL's single flat row.

TRL packs with best-fit decreasing (`packing_strategy="bfd"`) and then trains padding-free: the whole batch
becomes one row of batch x max_length tokens. With flash attention's variable-length kernel that costs
nothing; with SDPA or eager attention (every CPU, GPUs without flash-attn) transformers builds a block mask
over that one long row and attention runs over (batch x max_length)^2 positions. `RowPackedCollator` keeps
the packed rows as a `[batch, longest row]` batch, restarts the position ids at every chat and passes no 2D
attention mask, so transformers builds a block-diagonal causal mask per row: no token attends across chats
(unlike `packing_strategy="wrapped"`) and attention costs what it costs a wrapped batch of the same width.

Without packing (`repack_batches`), the same collator first lays the chats of each padded batch side by side in
rows as wide as its longest chat (`repack_batch`): every step sees the chats and the loss it sees padded, and the
model runs over little more than their real tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Key of the collated batch holding the number of real (non-padding) tokens; the trainer pops it before the
# model sees the batch (see `instruct_tune.stages.sft.RowPackedSFTTrainer`).
REAL_TOKENS = "num_real_tokens"


def first_fit_decreasing(lengths: Sequence[int], width: int) -> list[tuple[int, int]]:
    """`(row, offset)` of each sequence packed into rows of at most `width` tokens, longest first, each into
    the first row with room."""
    free: list[int] = []
    place: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        row = next((r for r, room in enumerate(free) if room >= n), None)
        if row is None:
            free.append(width)
            row = len(free) - 1
        place[i] = (row, width - free[row])
        free[row] -= n
    return place


def repack_batch(examples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The chats of one batch laid side by side in rows as wide as its longest chat (`seq_lengths` per row):
    the same chats and loss as the padded batch, on fewer positions."""
    width = max(len(e["input_ids"]) for e in examples)
    place = first_fit_decreasing([len(e["input_ids"]) for e in examples], width)
    rows: list[dict[str, Any]] = [
        {"input_ids": [], "labels": [], "seq_lengths": []} for _ in range(1 + max(r for r, _ in place))
    ]
    for example, (r, _) in sorted(zip(examples, place, strict=True), key=lambda item: item[1]):
        ids = list(example["input_ids"])
        rows[r]["input_ids"] += ids
        rows[r]["labels"] += list(example.get("labels", ids))
        rows[r]["seq_lengths"].append(len(ids))
    return rows


def row_position_ids(seq_lengths: Sequence[int], width: int) -> torch.Tensor:
    """Positions 0..n-1 for every chat of a packed row, then 0..k-1 over the row's padding (its own block)."""
    parts = [torch.arange(n) for n in seq_lengths]
    used = sum(seq_lengths)
    if used > width:
        raise ValueError(f"packed row of {used} tokens does not fit the batch width {width}")
    if used < width:
        parts.append(torch.arange(width - used))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


@dataclass
class RowPackedCollator:
    """Collate TRL-packed rows (`input_ids`, `labels`, `seq_lengths`) into a block-diagonal batch.

    Returns `input_ids` and `labels` right-padded to the longest row (`labels` -100 on padding and on the first
    token of every chat, which the previous chat's last token must not learn to predict), `position_ids`
    restarting at each chat, and `REAL_TOKENS`. Rows without `seq_lengths` are one chat each.
    """

    pad_token_id: int
    # Unpacked chats (`repack_batches`): each batch's chats are first laid side by side (`repack_batch`).
    repack: bool = False

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if self.repack:
            examples = repack_batch(examples)
        width = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full_like(input_ids, -100)
        position_ids = torch.zeros_like(input_ids)
        real = 0
        for i, example in enumerate(examples):
            ids = torch.as_tensor(example["input_ids"], dtype=torch.long)
            n = len(ids)
            input_ids[i, :n] = ids
            labels[i, :n] = torch.as_tensor(example.get("labels", example["input_ids"]), dtype=torch.long)
            position_ids[i] = row_position_ids(example.get("seq_lengths") or [n], width)
            real += n
        labels[position_ids == 0] = -100
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            REAL_TOKENS: torch.tensor(real),
        }
