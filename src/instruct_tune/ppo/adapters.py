"""The LoRA adapters of PPO's shared base: their names, switching between them, loading the reward adapter.

One frozen base can carry the policy (`default`), the reward and the value adapters; the reference is the
base with every adapter off.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch import nn

from instruct_tune.compat import adapter_switch_state, set_adapter_switch
from instruct_tune.models.loading import adapter_base, adapter_chain

POLICY, VALUE, REWARD = "default", "value", "reward"


def _tuner_layers(model: nn.Module) -> Iterator[BaseTunerLayer]:
    return (m for m in model.modules() if isinstance(m, BaseTunerLayer))


@contextmanager
def active_adapter(model: nn.Module, name: str | None) -> Iterator[None]:
    """Run with only adapter `name` active (None: every adapter off), leaving `requires_grad` untouched.

    PEFT's `set_adapter` / `disable_adapter` also freeze the adapters they switch off, which would stop the
    policy and value adapters of one base from training together.
    """
    layers = list(_tuner_layers(model))
    saved = [adapter_switch_state(layer) for layer in layers]
    try:
        for layer in layers:
            set_adapter_switch(layer, None if name is None else [name], disabled=name is None)
        yield
    finally:
        for layer, (active, disabled) in zip(layers, saved, strict=True):
            set_adapter_switch(layer, active, disabled)


def _same_path(a: str, b: str) -> bool:
    return Path(a).resolve() == Path(b).resolve() if Path(a).exists() and Path(b).exists() else a == b


def reward_shares_policy_base(policy_path: str, reward_path: str) -> bool:
    """Whether the reward model is a LoRA adapter trained on exactly the policy's starting model."""
    _, reward_adapters = adapter_chain(reward_path)
    if not reward_adapters or not _same_path(reward_adapters[-1], reward_path):
        return False
    reward_parent = adapter_base(reward_path)
    return reward_parent is not None and _same_path(reward_parent, policy_path)


def load_reward_adapter(model: PeftModel, reward_path: str, names: tuple[str, ...]) -> nn.Linear:
    """Load the reward adapter's LoRA weights under each of `names`; returns its score head."""
    config = PeftConfig.from_pretrained(reward_path)
    weights = load_file(str(Path(reward_path) / "adapter_model.safetensors"))
    head_weights = {k.rsplit(".", 1)[-1]: v for k, v in weights.items() if ".score." in k}
    lora_weights = {k: v for k, v in weights.items() if ".score." not in k}
    if "weight" not in head_weights:
        raise ValueError(f"{reward_path}: the adapter holds no `score` head weights")
    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        target_modules=config.target_modules,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        lora_dropout=0.0,
        bias="none",
    )
    for name in names:
        model.add_adapter(name, lora)
        result = set_peft_model_state_dict(model, lora_weights, adapter_name=name)
        missing = [k for k in result.unexpected_keys if "lora" in k]
        if missing:
            raise ValueError(f"{reward_path}: adapter weights {missing[:3]} do not fit the policy's base")
    head = nn.Linear(head_weights["weight"].shape[1], 1, bias="bias" in head_weights)
    with torch.no_grad():
        head.weight.copy_(head_weights["weight"][:1])
        if "bias" in head_weights:
            head.bias.copy_(head_weights["bias"][:1])
    return head
