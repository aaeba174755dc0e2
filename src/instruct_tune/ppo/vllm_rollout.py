"""PPO rollouts sampled by vLLM: one engine colocated with each training process (`rollout_backend: vllm`).

`VLLMRolloutBackend` implements `instruct_tune.ppo.rollout.RolloutBackend`. Each process holds its own engine on
its own GPU (vLLM's `external_launcher` executor over the launch's processes, tensor parallel 1), holding a copy
of the policy that `sync_weights` refreshes after every update:

- `vllm_weight_sync: merged` (default): the policy's weights with its LoRA adapter merged in, in the plain base
  model's names (`engine_weights`), loaded into the engine's model in place;
- `vllm_weight_sync: lora`: the engine keeps the base and serves the POLICY adapter through vLLM's LoRA support;
  each sync writes the adapter (`lora_request_tensors`) and the next `generate` asks for it by a new id. The
  engine loads the base from the folder the policy's base names, so this assumes the base in memory is that
  folder's (not an SFT adapter merged in at load time: use merged then).

The engine only samples: the responses' tokens come back (no text, no logprobs) and are laid out as the HF path
lays them (`rollout_from_outputs`); PPO's logprobs are always recomputed by the training model. vLLM is imported
inside the backend only; the parts that need no engine are `instruct_tune.ppo.engine_sync` (tested without it).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from instruct_tune.config.errors import ConfigError
from instruct_tune.models.sampling import Rollout, context_length
from instruct_tune.ppo.engine_sync import (
    check_whole,
    engine_weights,
    lora_engine_rank,
    lora_request_tensors,
    rollout_from_outputs,
    sampling_options,
    vllm_policy_problems,
)

logger = logging.getLogger(__name__)

__all__ = ["VLLMRolloutBackend"]

# --- the backend (vLLM imported here only) --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_environment() -> tuple[int, int, int]:
    """The process's rank, local rank and world size, set in the environment for `external_launcher`."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", rank if world == 1 else 0))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if world > 1:
            raise RuntimeError("rollout_backend: vllm over several processes needs MASTER_PORT (set by the launcher)")
        os.environ["MASTER_PORT"] = str(_free_port())
    return rank, local_rank, world


def _model_path(policy: nn.Module) -> str:
    model = policy.base_model.model if isinstance(policy, PeftModel) else policy
    path = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not path:
        raise ValueError("rollout_backend: vllm: the policy's base records no folder the engine could load")
    return str(path)


class VLLMRolloutBackend:
    """Samples PPO's rollouts with a vLLM engine colocated with this training process (see the module)."""

    def __init__(
        self,
        policy: nn.Module,
        tokenizer: Any,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_prompt_length: int = 256,
        gpu_memory_utilization: float = 0.3,
        enable_sleep_mode: bool = False,
        weight_sync: str = "merged",
        seed: int = 0,
        dtype: str | None = None,
        trust_remote_code: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        from instruct_tune.config.ppo import vllm_rollout_problems

        problems = vllm_rollout_problems() + vllm_policy_problems(policy, weight_sync)
        if problems:
            raise ConfigError("rollout_backend: vllm needs " + "; and ".join(problems))
        check_whole(policy)
        from vllm import LLM

        self.policy = policy
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.enable_sleep_mode = enable_sleep_mode
        self.weight_sync = weight_sync
        self.device = device
        rank, local_rank, _ = _launch_environment()
        max_model_len = max_prompt_length + max_new_tokens
        context = context_length(policy.base_model.model if isinstance(policy, PeftModel) else policy)
        if context is not None:
            max_model_len = min(max_model_len, context)
        if dtype is None:
            dtype = str(next(policy.parameters()).dtype).removeprefix("torch.")
        lora: dict[str, Any] = {}
        self._lora_dir: tempfile.TemporaryDirectory | None = None
        self._lora_version = 0
        if weight_sync == "lora":
            _, config = lora_request_tensors(policy)
            lora = {"enable_lora": True, "max_loras": 1, "max_lora_rank": lora_engine_rank(config)}
            self._lora_dir = tempfile.TemporaryDirectory(prefix="vllm-lora-")
        self.llm = LLM(
            model=_model_path(policy),
            dtype=dtype,
            tensor_parallel_size=1,
            distributed_executor_backend="external_launcher",
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=enable_sleep_mode,
            max_model_len=max_model_len,
            seed=seed + rank,  # the processes sample different rollouts
            skip_tokenizer_init=True,  # token ids in and out
            trust_remote_code=trust_remote_code,
            **lora,
        )
        logger.info("vLLM rollouts on cuda:%d (%s sync, max_model_len %d)", local_rank, weight_sync, max_model_len)
        # Sleep level 2 drops the weights (merged pushes them again); level 1 keeps them in CPU memory (the LoRA
        # path keeps the base the engine loaded).
        self._sleep_level = 2 if weight_sync == "merged" else 1
        self._weights_current = False
        if self.enable_sleep_mode and self._sleep_level == 2:
            self._sleep()  # the weights are pushed before the first rollout
        else:
            self.sync_weights()  # the policy may differ from the folder the engine loaded (a trained adapter)
            self._sleep()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every engine ready before training starts

    @classmethod
    def from_args(cls, policy: nn.Module, tokenizer: Any, args: Any, **overrides: Any) -> VLLMRolloutBackend:
        """The backend with the options of a `PPOStageConfig` (`overrides` win)."""
        dtype = "bfloat16" if args.bf16 else "float16" if args.fp16 else None
        options = {
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "max_prompt_length": args.max_prompt_length,
            "gpu_memory_utilization": args.vllm_gpu_memory_utilization,
            "enable_sleep_mode": args.vllm_enable_sleep_mode,
            "weight_sync": args.vllm_weight_sync,
            "seed": args.seed,
            "dtype": dtype,
            "trust_remote_code": args.trust_remote_code,
        }
        return cls(policy, tokenizer, **{**options, **overrides})

    # --- engine memory ---

    def _sleep(self) -> None:
        if self.enable_sleep_mode:
            self.llm.sleep(level=self._sleep_level)
            if self._sleep_level == 2:
                self._weights_current = False

    def _wake(self, tags: list[str]) -> None:
        if self.enable_sleep_mode:
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=tags)

    def _engine_model(self) -> nn.Module:
        return self.llm.llm_engine.model_executor.driver_worker.model_runner.model

    # --- the protocol ---

    def sync_weights(self) -> None:
        """Give the engine the policy's current weights (merged: pushed in place; lora: a new adapter version)."""
        if self.weight_sync == "lora":
            self._write_lora()
            self._weights_current = True
            return
        self._wake(["weights"])
        model = self._engine_model()
        for name, tensor in engine_weights(self.policy):
            model.load_weights([(name, tensor)])
        self.llm.reset_prefix_cache()  # cached prompt keys were computed with the old weights
        self._weights_current = True

    def _write_lora(self) -> None:
        from safetensors.torch import save_file

        assert self._lora_dir is not None
        self._lora_version += 1
        folder = Path(self._lora_dir.name) / f"v{self._lora_version}"
        folder.mkdir(parents=True)
        tensors, config = lora_request_tensors(self.policy)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(config, default=str))
        previous = Path(self._lora_dir.name) / f"v{self._lora_version - 1}"
        if previous.is_dir():
            for file in previous.iterdir():
                file.unlink()
            previous.rmdir()

    def _lora_request(self) -> Any:
        if self.weight_sync != "lora":
            return None
        from vllm.lora.request import LoRARequest

        folder = Path(self._lora_dir.name) / f"v{self._lora_version}"
        return LoRARequest(f"policy-v{self._lora_version}", self._lora_version, str(folder))

    def generate(self, prompts: Sequence[Sequence[int]], *, seed: int | None = None) -> Rollout:
        """One response per prompt from the engine (see `RolloutBackend.generate`); tensors on CPU.

        With `seed`, row i is sampled with the seed `seed + i` (reproducible, the engine's RNG untouched).
        """
        from vllm import SamplingParams

        if not self._weights_current:  # dropped by sleep level 2
            self.sync_weights()
        eos = self.tokenizer.eos_token_id
        options = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p}
        params = [
            SamplingParams(**sampling_options(eos_token_id=eos, seed=None if seed is None else seed + i, **options))
            for i in range(len(prompts))
        ]
        self._wake(["kv_cache"] if self._sleep_level == 2 else ["weights", "kv_cache"])
        try:  # the trainer samples under its mixed-precision autocast: vLLM runs in its own dtype
            with torch.autocast("cuda", enabled=False):
                outputs = self.llm.generate(
                    [{"prompt_token_ids": list(ids)} for ids in prompts],
                    sampling_params=params,
                    lora_request=self._lora_request(),
                    use_tqdm=False,
                )
        finally:
            self._sleep()
        responses = [list(output.outputs[0].token_ids) for output in outputs]
        return rollout_from_outputs(prompts, responses, eos, self.tokenizer.pad_token_id, self.max_new_tokens)
