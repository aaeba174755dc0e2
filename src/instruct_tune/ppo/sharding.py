"""PPO with sharded parameters (FSDP2 `fully_shard`, DeepSpeed ZeRO-3): whole weights for the rollout phase, a whole state dict
for the run folder.

Under FSDP2 each process holds a shard of every parameter, and each FSDP unit gathers its weights in its own
forward. Sampling runs one forward per token, and transformers' `generate` keeps every process forwarding
until the longest sample is done (`synced_gpus`, so that the gathers match): one all-gather per unit per token.
The rollout phase (sampling, then the policy, reference, value and reward forwards of scoring) runs inside
`gathered_weights` instead: every unit gathers once, no forward inside gathers or frees, and the shards come
back after (`tests/test_ppo_sharding.py` counts the all-gathers). LoRA is merged into the gathered weights while
sampling (`instruct_tune.ppo.rollout.sampling_policy`) and unmerged before the shards come back; the shards are
never written to.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["full_state_dict", "gathered_weights", "is_sharded", "tie_gathered", "transformer_layer_names"]


def _units(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _zero3_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of `model` that DeepSpeed ZeRO-3 partitioned (none when it did not)."""
    return [p for p in model.parameters() if hasattr(p, "ds_id")]


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` (or a module in it) is sharded: FSDP2 units or ZeRO-3 partitioned parameters."""
    return bool(_units(model)) or bool(_zero3_parameters(model))


@contextmanager
def gathered_weights(model: nn.Module) -> Iterator[nn.Module]:
    """`model` with the whole weights of every FSDP2 unit (or every ZeRO-3 parameter) gathered once (collective:
    every process enters together) and kept through any number of forwards, on any module of it; resharded
    after (FSDP2: each unit's own reshard-after-forward setting back). Not sharded: `model` as it is."""
    if zero3 := _zero3_parameters(model):
        # ZeRO-3 (`model` the DeepSpeed engine): one gather of every partitioned parameter, the engine's
        # per-module hooks off so that no forward inside releases or gathers again; partitioned at the end.
        import deepspeed

        from instruct_tune.compat import zero3_hooks_removed

        with deepspeed.zero.GatheredParameters(zero3), zero3_hooks_removed(model):
            yield model
        return
    units = _units(model)
    if not units:
        yield model
        return
    # torch 2.13 keeps no public getter of the setting, which accelerate chooses per unit (the root and the
    # final norm/LM head keep their weights after forward): saved from the unit's state, set back after.
    # The outermost unit initialises as the root (it then owns the others' setup), as its first forward would:
    # a unit gathered first would initialise as a root of its own, and the real root's forward then fails.
    units[0]._get_fsdp_state()._lazy_init()
    settings = [_reshard_setting(unit) for unit in units]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        for unit in units:
            unit.unshard()
        yield model
    finally:
        for unit, setting in zip(units, settings, strict=True):
            unit.reshard()
            _restore_reshard_setting(unit, setting)


def _reshard_setting(unit: nn.Module) -> tuple[Any, list[Any]]:
    state = unit._get_fsdp_state()
    return state._auto_reshard_after_forward, [g.post_forward_mesh_info for g in state._fsdp_param_groups]


def _restore_reshard_setting(unit: nn.Module, setting: tuple[Any, list[Any]]) -> None:
    state = unit._get_fsdp_state()
    state._auto_reshard_after_forward = setting[0]
    for group, mesh_info in zip(state._fsdp_param_groups, setting[1], strict=True):
        group.post_forward_mesh_info = mesh_info


def full_state_dict(accelerator: Any, model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of `model` on the main process (collective under FSDP: every process calls it)."""
    return accelerator.get_state_dict(model)


def tie_gathered(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` with tied weights (GPT-2's `lm_head` and `wte`), gathered as two copies, one tensor again:
    `save_pretrained` then keeps one of them, as it does in one process."""
    for target, source in getattr(model, "all_tied_weights_keys", {}).items():
        if target in state_dict and source in state_dict:
            state_dict[target] = state_dict[source]
    return state_dict


def transformer_layer_names(model: nn.Module) -> list[str]:
    """The class names FSDP wraps one unit each: the `_no_split_modules` of the transformers models in `model`
    (GPT-2's `GPT2Block`, Llama's `LlamaDecoderLayer`)."""
    names: list[str] = []
    for module in model.modules():
        for name in getattr(module, "_no_split_modules", None) or ():
            if name not in names:
                names.append(name)
    return names
