"""Chat prompts to token ids where text typed into a message stays text.

Tokenizing a rendered chat parses every special-token string in it, so a user who types `<|endoftext|>` or
`<|assistant|>` would hand the model a real EOS or role marker. Here each special-token string inside a
message's content is rendered as a placeholder, and tokenized as plain text (`split_special_tokens`) in its
place; the template's own special tokens stay special. Chats without such strings take the plain path and
get exactly the ids `apply_chat_template` gives.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

__all__ = ["encode_chats", "special_strings"]

# Private-use characters around a placeholder's number: kept as is by templates (no whitespace to trim).
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


def special_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The tokenizer's special-token strings, longest first (so `<|a|>` inside `<|a|>x` matches whole)."""
    found = set(tokenizer.all_special_tokens)
    found |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    return sorted((s for s in found if s), key=len, reverse=True)


def _contents(chat: Sequence[dict]) -> list[str]:
    return [m["content"] for m in chat if isinstance(m.get("content"), str)]


def encode_chats(
    tokenizer: PreTrainedTokenizerBase, chats: Sequence[Sequence[dict]], *, add_generation_prompt: bool = True
) -> list[list[int]]:
    """Token ids of each chat (its template, with the generation prompt by default), special-token strings
    typed into message contents tokenized as text."""
    specials = special_strings(tokenizer)
    literal = [any(s in text for text in _contents(chat) for s in specials) for chat in chats]
    plain = [list(chat) for chat, has in zip(chats, literal, strict=True) if not has]
    plain_ids = iter(
        tokenizer.apply_chat_template(
            plain, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
        )["input_ids"]
        if plain
        else []
    )
    return [
        _encode_escaped(tokenizer, chat, specials, add_generation_prompt) if has else list(next(plain_ids))
        for chat, has in zip(chats, literal, strict=True)
    ]


def _encode_escaped(
    tokenizer: PreTrainedTokenizerBase, chat: Sequence[dict], specials: list[str], add_generation_prompt: bool
) -> list[int]:
    pattern = re.compile("|".join(re.escape(s) for s in specials))
    index = {s: i for i, s in enumerate(specials)}

    def escape(message: dict) -> dict:
        content = message.get("content")
        if not isinstance(content, str):
            return dict(message)
        # A placeholder look-alike typed by the user is stripped of its markers' meaning first.
        content = content.replace(_OPEN, " ").replace(_CLOSE, " ")
        return {**message, "content": pattern.sub(lambda m: f"{_OPEN}{index[m.group(0)]}{_CLOSE}", content)}

    text = tokenizer.apply_chat_template(
        [escape(m) for m in chat], add_generation_prompt=add_generation_prompt, tokenize=False
    )
    ids: list[int] = []
    # Special tokens split the text before any merge, so tokenizing the pieces apart changes nothing else.
    for i, piece in enumerate(_PLACEHOLDER.split(text)):
        if i % 2:
            ids += tokenizer(specials[int(piece)], add_special_tokens=False, split_special_tokens=True)[
                "input_ids"
            ]
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids
