"""LoRA target modules per architecture: every linear layer of attention and MLP (as QLoRA recommends)."""

from __future__ import annotations

_ATTN_MLP_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

LORA_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "llama": _ATTN_MLP_LLAMA,
    "mistral": _ATTN_MLP_LLAMA,
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": _ATTN_MLP_LLAMA,
    "qwen3": _ATTN_MLP_LLAMA,
    "gemma": _ATTN_MLP_LLAMA,
    "gemma2": _ATTN_MLP_LLAMA,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}


def lora_target_modules(model_type: str) -> list[str] | str:
    """Module names to adapt for `model_type`; PEFT's `"all-linear"` for architectures not listed."""
    return list(LORA_TARGETS[model_type]) if model_type in LORA_TARGETS else "all-linear"
