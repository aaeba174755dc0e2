"""What an inference engine needs from PPO's policy, without the engine: sampling options equal to the HF path's,
the policy's weights with its LoRA merged in (in the plain base model's names) or its adapter alone, and the
engine's output tokens laid out as the HF path lays a rollout. `instruct_tune.ppo.vllm_rollout` builds on them;
everything here runs (and is tested) without vLLM.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from peft import PeftModel, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn

from instruct_tune.config.errors import ConfigError
from instruct_tune.models.sampling import Rollout, left_pad
from instruct_tune.ppo.adapters import POLICY

__all__ = [
    "check_whole",
    "engine_weights",
    "lora_engine_rank",
    "lora_request_tensors",
    "rollout_from_outputs",
    "sampling_options",
    "vllm_policy_problems",
]

# Parameter names of LoRA's own weights (never in the base model's state dict).
_LORA_PARTS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector.")


def sampling_options(
    args: Any = None,
    *,
    eos_token_id: int | Sequence[int],
    seed: int | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` that sample as `sample_responses` (the HF path) does.

    The options come from `args` (a `PPOStageConfig`: `max_new_tokens`, `temperature`, `top_p`), explicit values
    winning. One response per prompt (`n=1`) of at most `max_new_tokens` tokens, stopped at EOS; temperature,
    then nucleus `top_p`, and no top-k, min-p or penalties (the HF path passes `top_k=0`). Temperature 0 is
    greedy (vLLM's greedy below 1e-5), where `top_p` plays no part, as in HF `generate` without `do_sample`.
    `seed` (evaluation): this request's own seed, reproducible whatever else the engine samples; None: the
    engine's RNG.

    Only token ids come back: no text (`detokenize=False`) and no logprobs, because the training model always
    recomputes PPO's logprobs itself (vLLM's kernels and precision differ from training's, and its logprobs
    would not be those the ratio needs).
    """

    def pick(name: str, value: Any) -> Any:
        if value is not None:
            return value
        if args is None or getattr(args, name, None) is None:
            raise ValueError(f"sampling_options: `{name}` is neither given nor an attribute of args")
        return getattr(args, name)

    max_new_tokens = int(pick("max_new_tokens", max_new_tokens))
    temperature = float(pick("temperature", temperature))
    top_p = float(pick("top_p", top_p))
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: {max_new_tokens} must be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature: {temperature} must be >= 0 (0: greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: {top_p} is not in (0, 1]")
    greedy = temperature == 0
    eos_ids = [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(i) for i in eos_token_id]
    options: dict[str, Any] = {
        "n": 1,
        "max_tokens": max_new_tokens,
        "temperature": 0.0 if greedy else temperature,
        "top_p": 1.0 if greedy else top_p,
        "top_k": -1,  # off: the HF path samples with top_k=0
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "stop_token_ids": eos_ids,
        "ignore_eos": False,
        "detokenize": False,
        "logprobs": None,
        "prompt_logprobs": None,
    }
    if seed is not None:
        options["seed"] = int(seed)
    return options


def rollout_from_outputs(
    prompts: Sequence[Sequence[int]],
    response_token_ids: Sequence[Sequence[int]],
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    max_new_tokens: int,
) -> Rollout:
    """The `Rollout` of prompts and their sampled tokens, laid out exactly as `sample_responses` lays it out.

    Prompts left padded; responses right padded to the longest one (each cut to `max_new_tokens`, then after its
    first EOS, which stays), `response_mask` 1 up to and including that EOS, `has_eos` whether there was one.
    An empty response is all padding (mask 0, no EOS); the response width is at least 1 column.
    """
    if len(prompts) != len(response_token_ids):
        raise ValueError(f"{len(prompts)} prompts but {len(response_token_ids)} responses")
    query, query_mask = left_pad(prompts, pad_token_id)
    eos_ids = {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(i) for i in eos_token_id}
    cut = []
    for tokens in response_token_ids:
        tokens = [int(t) for t in list(tokens)[:max_new_tokens]]
        end = next((i + 1 for i, t in enumerate(tokens) if t in eos_ids), len(tokens))
        cut.append(tokens[:end])
    # HF generate stops once every row has ended: the batch is as wide as its longest response. The mask and
    # has_eos come from the cut lists themselves, not from the padded tensor, where a pad token that is the EOS
    # token (GPT-2's) would pass for an EOS after a response the engine ended short of max_new_tokens.
    width = max([1, *(len(tokens) for tokens in cut)])
    response = torch.full((len(cut), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(cut), width), dtype=torch.long)
    for row, tokens in enumerate(cut):
        if tokens:
            response[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
    has_eos = torch.tensor([bool(tokens) and tokens[-1] in eos_ids for tokens in cut], dtype=torch.bool)
    return Rollout(query, query_mask, response, mask, has_eos)


def _policy_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def check_whole(policy: nn.Module) -> None:
    """Refuse sharded weights (FSDP2 DTensors, DeepSpeed ZeRO-3 partitions): not gathered here yet."""
    for name, param in policy.named_parameters():
        if hasattr(param, "ds_id") or type(param.data).__name__ == "DTensor" or type(param).__name__ == "DTensor":
            raise ConfigError(
                f"rollout_backend: vllm does not gather sharded weights yet ({name} is sharded by FSDP2 or "
                "DeepSpeed ZeRO-3); use DDP or one process"
            )


@torch.no_grad()
def engine_weights(policy: nn.Module, adapter: str = POLICY) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights as `(name, tensor)` in the plain base model's state-dict names, its LoRA merged in.

    What the HF-architecture model's `load_weights` expects (`model.layers.0.self_attn.q_proj.weight`,
    `lm_head.weight`): no `base_model.model.` prefix, no `base_layer`, no LoRA weights, nothing of other adapters
    (PPO's `reward` and `value` on the same base) and of their `modules_to_save`. A LoRA layer of `adapter`
    yields `W + scale * B @ A` (PEFT's `get_delta_weight`), computed aside: the training weights are not touched.
    A full (non-PEFT) policy yields its own state dict.
    """
    check_whole(policy)
    if not isinstance(policy, PeftModel):
        for name, tensor in policy.state_dict().items():
            yield name, tensor.detach()
        return
    model = policy.base_model.model  # the HF model with the LoRA layers injected
    layers = _policy_layers(model)
    for layer_name, layer in layers.items():
        if adapter in getattr(layer, "use_dora", {}) and layer.use_dora[adapter]:
            raise ConfigError(f"rollout_backend: vllm cannot merge DoRA adapters ({layer_name})")
        others = [name for name in getattr(layer, "merged_adapters", []) if name != adapter]
        if others:
            raise ValueError(f"{layer_name}: adapters {others} are merged into the base; unmerge them first")
    saved_modules = {
        name: module for name, module in model.named_modules() if type(module).__name__ == "ModulesToSaveWrapper"
    }
    for key, tensor in model.state_dict().items():
        if any(part in key for part in _LORA_PARTS):
            continue
        name = key
        wrapper = next((w for w in saved_modules if key.startswith(w + ".")), None)
        if wrapper is not None:  # a module PEFT trains whole: the policy's copy, else the original
            own = adapter in saved_modules[wrapper].modules_to_save
            rest = key[len(wrapper) + 1 :]
            if rest.startswith(f"modules_to_save.{adapter}.") and own:
                name = f"{wrapper}.{rest[len(f'modules_to_save.{adapter}.') :]}"
            elif rest.startswith("original_module.") and not own:
                name = f"{wrapper}.{rest[len('original_module.') :]}"
            else:
                continue
        if ".base_layer." in name:
            layer_name, param = name.split(".base_layer.", 1)
            name = f"{layer_name}.{param}"
            layer = layers.get(layer_name)
            if (
                param == "weight"
                and layer is not None
                and adapter in _adapter_names(layer)
                and adapter not in getattr(layer, "merged_adapters", [])
            ):
                tensor = tensor + layer.get_delta_weight(adapter).to(tensor.dtype)
        yield name, tensor.detach()


def _adapter_names(layer: LoraLayer) -> set[str]:
    return set(layer.lora_A) | set(getattr(layer, "lora_embedding_A", {}))


def lora_request_tensors(policy: nn.Module, adapter: str = POLICY) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The `adapter`'s LoRA weights and its PEFT config, as a saved PEFT adapter holds them (what vLLM loads).

    Tensor names as `adapter_model.safetensors` has them (`base_model.model.<module>.lora_A.weight`, no adapter
    name), on CPU and contiguous; the config is `adapter_config.json`'s dict (`r`, `lora_alpha`,
    `target_modules`...). vLLM's LoRA serving does not take DoRA or `modules_to_save`: both refused.
    """
    if not isinstance(policy, PeftModel) or adapter not in policy.peft_config:
        raise ConfigError("vllm_weight_sync: lora needs a LoRA policy (use_peft: true); use merged for a full one")
    check_whole(policy)
    config = policy.peft_config[adapter]
    if getattr(config, "use_dora", False):
        raise ConfigError("vllm_weight_sync: lora: vLLM does not serve DoRA adapters; use merged")
    if getattr(config, "modules_to_save", None):
        raise ConfigError(
            f"vllm_weight_sync: lora: vLLM does not serve modules_to_save ({config.modules_to_save}); use merged"
        )
    with torch.no_grad():
        weights = get_peft_model_state_dict(policy, adapter_name=adapter)
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in weights.items()}
    config_dict = config.to_dict()
    for key, value in list(config_dict.items()):
        if isinstance(value, set):
            config_dict[key] = sorted(value)
    return tensors, config_dict


# The `max_lora_rank` values vLLM's LoRA config accepts.
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_engine_rank(config: dict[str, Any]) -> int:
    """The engine's `max_lora_rank` for an adapter config: its largest rank, rounded up to one vLLM accepts."""
    rank = max(int(r) for r in [config.get("r", 8), *(config.get("rank_pattern") or {}).values()])
    fitting = [allowed for allowed in _VLLM_LORA_RANKS if allowed >= rank]
    if not fitting:
        raise ConfigError(f"vllm_weight_sync: lora: vLLM serves LoRA ranks up to {_VLLM_LORA_RANKS[-1]}, not {rank}")
    return fitting[0]


def vllm_policy_problems(policy: nn.Module, weight_sync: str) -> list[str]:
    """Why this loaded policy cannot be sampled by vLLM (empty: it can): quantised bases, a LoRA sync without LoRA."""
    problems = []
    if getattr(policy, "is_loaded_in_4bit", False) or getattr(policy, "is_loaded_in_8bit", False):
        problems.append("a base that is not quantised (load_in_4bit/load_in_8bit: vLLM would need the 16-bit weights)")
    elif any(type(m).__name__ in ("Linear4bit", "Linear8bitLt", "Params4bit") for m in policy.modules()):
        problems.append("a base that is not quantised (its layers are bitsandbytes 4/8-bit)")
    if weight_sync == "lora" and not isinstance(policy, PeftModel):
        problems.append("a LoRA policy (use_peft: true) for vllm_weight_sync: lora; use merged for a full policy")
    return problems


