"""The four models of PPO (policy, reference, reward, value) with as few copies of the weights as possible.

- **Policy** (trainable): a LoRA adapter over the SFT model (`use_peft`), or the full SFT model.
- **Reference**: the same base with its adapters switched off; a frozen copy only when the policy is full.
- **Reward**: the reward stage's model, frozen, read at the last response token; its normalisation travels
  with it (`PPOModels.normalization`).
- **Value** (trainable): initialised from the reward model (InstructGPT): a LoRA adapter over the reward
  model with a copy of its score head, or a full copy when the policy is full.

When the reward model is itself a LoRA adapter over the policy's base (a reward stage trained with
`use_peft` from the SFT run folder), one frozen base serves all four: adapters `default` (policy),
`reward` and `value`, and the two heads (`instruct_tune.ppo.adapters`). `shared_base: false` loads four
separate models instead (what the peers do; kept for comparison and for bases that cannot be shared).
"""

from __future__ import annotations

import copy
import logging

import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from instruct_tune.config import ModelArguments
from instruct_tune.models.forward import backbone, last_hidden, lm_logits
from instruct_tune.models.loading import load_model, lora_config
from instruct_tune.models.packed_forward import Packing
from instruct_tune.models.reward_normalization import RewardNormalization
from instruct_tune.ppo.adapters import (
    POLICY,
    REWARD,
    VALUE,
    active_adapter,
    load_reward_adapter,
    reward_shares_policy_base,
)
from instruct_tune.ppo.sharding import transformer_layer_names

logger = logging.getLogger(__name__)

__all__ = ["POLICY", "PPOModels", "PolicyAndValue", "build_ppo_models", "score_head", "value_head_from"]


def score_head(model: PreTrainedModel) -> nn.Linear:
    """The reward head (`score`) of a sequence-classification model."""
    head = getattr(model, "score", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__} has no `score` linear head to read rewards from")
    return head


def value_head_from(head: nn.Linear, bias: float) -> nn.Linear:
    """A trainable copy of the reward head (float32), shifted by the normalisation bias so that the value
    model starts out predicting the shift-only score, raw + bias.

    The bias only, not the scale: this is the initialisation PPO has always had, also under `scale_scores`
    (where the value loss then pulls the values to the scaled returns); dividing by the scale here would change
    every run's numbers.
    """
    copied = nn.Linear(head.in_features, 1, bias=True)
    with torch.no_grad():
        copied.weight.copy_(head.weight[:1].float())
        copied.bias.fill_(bias + (float(head.bias[0]) if head.bias is not None else 0.0))
    return copied.to(head.weight.device).requires_grad_(True)


# --- the trainable module -------------------------------------------------------------------------------


class PolicyAndValue(nn.Module):
    """Policy logits and values in one forward call, so distributed training sees one forward per backward.

    `value_body` may be the policy's own base (adapter `value`) or a separate model.
    """

    def __init__(
        self,
        policy: nn.Module,
        value_model: nn.Module,
        value_head: nn.Linear,
        *,
        value_adapter: str | None,
        packed: bool = False,
    ) -> None:
        super().__init__()
        self.packed = packed
        # What FSDP shards one unit each (accelerate reads a model's `_no_split_modules`): the blocks inside.
        self._no_split_modules = transformer_layer_names(policy)
        self.policy = policy
        self.value_head = value_head
        self.value_adapter = value_adapter
        # The value model may be the policy's module: registered once, reached through a plain attribute.
        self._value_model = [value_model]
        if value_model is not policy:
            self.value_model = value_model

    @property
    def policy_adapter(self) -> str | None:
        return POLICY if isinstance(self.policy, PeftModel) else None

    def values(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, packed: bool | Packing | None = None
    ) -> torch.Tensor:
        """Value of every position, `[batch, length]`; `packed` (a layout of `attention_mask`, or whether to
        pack) overrides the module's `packed`."""
        model = self._value_model[0]
        packed = self.packed if packed is None else packed
        if self.value_adapter is None:
            hidden = last_hidden(backbone(model), input_ids, attention_mask, packed)
        else:
            with active_adapter(model, self.value_adapter):
                hidden = last_hidden(backbone(model), input_ids, attention_mask, packed)
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)

    def logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_length: int | None = None,
        packed: bool | Packing | None = None,
    ) -> torch.Tensor:
        """Policy logits `[batch, length, vocab]` (only those predicting the last `response_length` tokens);
        `packed` as in `values`."""
        packed = self.packed if packed is None else packed
        if self.policy_adapter is None:
            return lm_logits(self.policy, input_ids, attention_mask, response_length, packed)
        with active_adapter(self.policy, POLICY):
            return lm_logits(self.policy, input_ids, attention_mask, response_length, packed)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy logits and values; with `response_length` R both cover only the positions predicting the
        last R tokens."""
        # One layout for both bodies (False: this batch is not worth packing).
        packed = (Packing.of(attention_mask) or False) if self.packed else False
        values = self.values(input_ids, attention_mask, packed)
        if response_length:
            values = values[:, -response_length - 1 : -1]
        return self.logits(input_ids, attention_mask, response_length, packed), values


class PPOModels:
    """Policy and value (`trainable`, the module to optimise), reference and reward (frozen), and the reward's
    normalisation (applied by the trainer: `scale_scores` chooses all of it or its shift only)."""

    def __init__(
        self,
        trainable: PolicyAndValue,
        *,
        ref_model: nn.Module | None,
        reward_model: nn.Module,
        reward_head: nn.Linear,
        reward_adapter: str | None,
        normalization: RewardNormalization,
        layout: str,
    ) -> None:
        self.trainable = trainable
        self.ref_model = ref_model  # None: the policy's base with adapters off
        self.reward_model = reward_model
        self.reward_head = reward_head
        self.reward_adapter = reward_adapter
        self.normalization = normalization
        self.layout = layout

    def frozen_modules(self) -> list[nn.Module]:
        """Models outside `trainable` (to move to the device and keep in eval mode)."""
        modules = [self.reward_head]
        if self.ref_model is not None:
            modules.append(self.ref_model)
        if not _is_part_of(self.reward_model, self.trainable):
            modules.append(self.reward_model)
        return modules

    @torch.no_grad()
    def ref_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int | None = None
    ) -> torch.Tensor:
        """Reference-policy (SFT) logits, as `PolicyAndValue.logits`."""
        packed = self.trainable.packed
        if self.ref_model is not None:
            return lm_logits(self.ref_model, input_ids, attention_mask, response_length, packed)
        with active_adapter(self.trainable.policy, None):
            return lm_logits(self.trainable.policy, input_ids, attention_mask, response_length, packed)

    @torch.no_grad()
    def raw_scores(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, last_index: torch.Tensor
    ) -> torch.Tensor:
        """The reward head's output for each sequence, read at `last_index` (its last response token), float32."""
        model = self.reward_model
        if self.reward_adapter is not None:
            with active_adapter(model, None if self.reward_adapter == "off" else self.reward_adapter):
                hidden = last_hidden(backbone(model), input_ids, attention_mask, self.trainable.packed)
        else:
            hidden = last_hidden(backbone(model), input_ids, attention_mask, self.trainable.packed)
        rows = torch.arange(len(input_ids), device=input_ids.device)
        picked = hidden[rows, last_index].to(self.reward_head.weight.dtype)
        return self.reward_head(picked)[:, 0].float()

    def scores(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, last_index: torch.Tensor
    ) -> torch.Tensor:
        """Normalised rewards, `normalization.apply(raw)`: what `RewardModel.score` gives for the same tokens."""
        return self.normalization.apply(self.raw_scores(input_ids, attention_mask, last_index))


def _is_part_of(module: nn.Module, parent: nn.Module) -> bool:
    return any(m is module for m in parent.modules())


# --- building -------------------------------------------------------------------------------------------


def build_ppo_models(
    model_args: ModelArguments,
    tokenizer: PreTrainedTokenizerBase,
    reward_path: str,
    *,
    shared_base: bool = True,
    packed: bool = False,
    trust_remote_code: bool = False,
) -> PPOModels:
    """Load policy, reference, reward and value for PPO from the SFT and reward run folders.

    `packed`: every forward over a rollout runs padding-free (`instruct_tune.models.packed_forward`).
    """
    policy_path = model_args.model_name_or_path
    normalization = RewardNormalization.load(reward_path)
    bias = normalization.bias
    reward_args = ModelArguments(
        model_name_or_path=reward_path,
        dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation,
    )

    if model_args.use_peft and model_args.lora_dropout:
        # Dropout makes the logprobs of one rollout differ between passes, which PPO's ratio reads as change.
        logger.info(
            "PPO sets lora_dropout %s to 0: dropout is off in every PPO model", model_args.lora_dropout
        )
        model_args.lora_dropout = 0.0  # on the caller's arguments: the run folder's config.yaml says what ran
    policy = load_model(model_args, tokenizer, head="causal", trust_remote_code=trust_remote_code)
    ref: nn.Module | None = None  # the policy's base with adapters off, unless a reference copy is loaded
    if model_args.use_peft and shared_base and reward_shares_policy_base(policy_path, reward_path):
        reward_head = load_reward_adapter(policy, reward_path, (REWARD, VALUE))
        for name, param in policy.named_parameters():
            param.requires_grad_(f".{POLICY}." in name or f".{VALUE}." in name)
        value_head = value_head_from(reward_head, bias)
        reward = value = policy
        value_adapter, reward_adapter = VALUE, REWARD
        layout = "one shared base: policy, reference, reward and value adapters"
    else:
        reward = load_model(reward_args, tokenizer, head="reward", trust_remote_code=trust_remote_code)
        reward.requires_grad_(False).eval()
        reward_head = score_head(reward)
        value_head = value_head_from(reward_head, bias)
        if model_args.use_peft and shared_base:
            # The reward model's own base carries the value adapter; the reward reads it with the adapter off.
            value_lora = lora_config(model_args, reward.config.model_type, "causal")
            value_lora.task_type = None
            value_lora.modules_to_save = None
            reward = value = get_peft_model(reward, value_lora, adapter_name=VALUE)
            value_adapter, reward_adapter = VALUE, "off"
            layout = "two bases: policy/reference (SFT) and value/reward (reward model)"
        else:
            # Separate models: a frozen reference copy of the SFT model and a full trainable copy of the reward.
            ref_args = copy.copy(model_args)
            ref_args.use_peft = False
            ref_args.load_in_4bit = False
            ref = load_model(ref_args, tokenizer, head="causal", trust_remote_code=trust_remote_code)
            ref.requires_grad_(False).eval()
            value = copy.deepcopy(reward).requires_grad_(True)
            value.score = None  # the value head lives in `value_head`
            value_adapter = reward_adapter = None
            layout = "four models: policy, reference, reward, value"
    trainable = PolicyAndValue(policy, value, value_head, value_adapter=value_adapter, packed=packed)
    return PPOModels(
        trainable,
        ref_model=ref,
        reward_model=reward,
        reward_head=reward_head.requires_grad_(False),  # already frozen unless it is the shared base's adapter
        reward_adapter=reward_adapter,
        normalization=normalization,
        layout=layout,
    )
