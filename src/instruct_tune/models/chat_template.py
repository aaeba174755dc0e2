"""The chat template given to checkpoints that ship none.

Each assistant turn ends with the tokenizer's own EOS token, so a fine-tuned model learns to stop; the
`{% generation %}` markers let TRL mask everything but assistant turns (`assistant_only_loss`), and the prompt
rendered with `add_generation_prompt` is a token prefix of prompt + completion.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>\n{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Give the tokenizer the default template when it has none; returns True when one was added."""
    if tokenizer.chat_template:
        return False
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True
