"""Plain-text rows (`text` format) as token ids: PPO-ptx's pretraining text and eval's held-out text."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from .mixture import load_source


def text_rows(path: str) -> list[str]:
    """The `text` rows of `path` (any plain-text format `load_source` reads), in file order."""
    ds, _ = load_source(path, "text")
    return list(ds["text"])


def token_rows(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text (no special tokens), ending in EOS and cut to `max_length`; empty texts dropped."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [(row + [tokenizer.eos_token_id])[:max_length] for row in ids if row]


def text_token_rows(
    tokenizer: PreTrainedTokenizerBase, path: str, max_length: int, rows: slice = slice(None)
) -> list[list[int]]:
    """Token ids of the `text` rows of `path` picked by `rows`, each ending in EOS and cut to `max_length`.

    Held-out text is the file's last rows (`slice(-n, None)`); the training text, the others.
    """
    return token_rows(tokenizer, text_rows(path)[rows], max_length)
