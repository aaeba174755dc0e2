"""Tokenizer and model loading for every stage."""

from instruct_tune.models.chat_template import DEFAULT_CHAT_TEMPLATE, ensure_chat_template
from instruct_tune.models.loading import (
    adapter_base,
    adapter_chain,
    ensure_pad_token,
    load_model,
    load_tokenizer,
    lora_config,
)

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "adapter_base",
    "adapter_chain",
    "ensure_chat_template",
    "ensure_pad_token",
    "load_model",
    "load_tokenizer",
    "lora_config",
]
