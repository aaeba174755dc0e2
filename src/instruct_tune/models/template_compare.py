"""Compare two tokenizers' chat templates by what they render, not by their Jinja source.

Two templates that differ only by a Jinja comment or whitespace control render every chat alike and are the
same template to a model; two that render one probe chat differently are shown by that chat's renderings.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

__all__ = ["PROBE_CHATS", "chat_template_difference", "render_probe"]

# Chats covering what a template can branch on: a system turn, several turns, the generation prompt.
PROBE_CHATS: tuple[tuple[tuple[tuple[str, str], ...], bool], ...] = (
    ((("user", "Hi"), ("assistant", "Hello")), False),
    ((("user", "Hi"),), True),
    ((("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Add 2 and 3.")), True),
    (
        (
            ("system", "Be brief."),
            ("user", "Hi"),
            ("assistant", "Hello"),
            ("user", "Bye"),
            ("assistant", "Bye"),
        ),
        False,
    ),
)


def render_probe(tokenizer: PreTrainedTokenizerBase, index: int) -> str:
    """Probe chat `index` rendered by the tokenizer's template (an error it raises, as text)."""
    turns, generation_prompt = PROBE_CHATS[index]
    chat = [{"role": role, "content": content} for role, content in turns]
    try:
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as error:  # a template may refuse a role (e.g. no system turns): that is a rendering too
        return f"<error: {type(error).__name__}: {error}>"


def chat_template_difference(
    a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase
) -> tuple[str, str] | None:
    """None when both tokenizers render every probe chat alike; else the first differing pair of renderings."""
    if a.chat_template == b.chat_template:
        return None
    for index in range(len(PROBE_CHATS)):
        first, second = render_probe(a, index), render_probe(b, index)
        if first != second:
            return first, second
    return None
