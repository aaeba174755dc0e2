"""The trained reward model as the later stages use it: one loader, one scoring function, normalised.

    rm = load_reward_model("outputs/tiny/reward")
    rm.score(["Add 2 and 3."], ["5"])          # tensor([1.73]): normalised, SFT responses score 0 on average

A prompt and a response are rendered exactly as the reward stage trained on them (`reward_input_ids`, in
`instruct_tune.data.preference_groups`): the prompt messages plus one assistant turn through the tokenizer's
chat template, which ends the turn with EOS; the sequence-classification head reads the reward at that last
(EOS) token. The run folder's `reward_normalization.json` (`RewardNormalization`) holds the bias and scale
under which the reference responses (SFT-policy samples, as in InstructGPT) score mean 0 and std 1: the
units PPO trains on. `score` applies it, `raw_score` does not.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from instruct_tune.data.preference_groups import Prompt, reward_input_ids
from instruct_tune.data.reward_collator import pad_right
from instruct_tune.models.reward_normalization import NORMALIZATION_FILE, RewardNormalization

# `reward_input_ids` and `pad_right` live in the data layer (the reward stage tokenises and batches with
# them); re-exported here, where PPO and the scoring tests have always imported them.
__all__ = [
    "NORMALIZATION_FILE",
    "RewardModel",
    "RewardNormalization",
    "init_reward_head",
    "load_reward_model",
    "pad_right",
    "reward_head_modules",
    "reward_input_ids",
]

def reward_head_modules(model: nn.Module) -> list[nn.Linear]:
    """The `score` linear layer(s) of a sequence-classification model (LoRA: original and trained copy)."""
    return [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and "score" in name.split(".")]


@torch.no_grad()
def init_reward_head(model: nn.Module, seed: int = 0) -> float:
    """Initialise the new reward head N(0, 1/sqrt(d+1)) (InstructGPT / lm-human-preferences); returns the std.

    Every copy of the head (PEFT keeps the original beside the trained one) gets the same weights.
    """
    heads = reward_head_modules(model)
    if not heads:
        raise ValueError("model has no `score` head to initialise")
    d = heads[0].in_features
    std = 1.0 / math.sqrt(d + 1)
    generator = torch.Generator().manual_seed(seed)
    params = [p for head in heads for p in head.parameters()]
    with _whole(params):
        weight = torch.randn(heads[0].weight.shape, generator=generator) * std
        for head in heads:
            head.weight.copy_(weight.to(head.weight.dtype))
            if head.bias is not None:
                head.bias.zero_()
    return std


def _whole(params: list[nn.Parameter]) -> AbstractContextManager:
    """The parameters whole and writable: under DeepSpeed ZeRO-3 (a model loaded under a ZeRO-3 launch is
    partitioned as it loads: each process holds an empty tensor) gathered, then partitioned again with what
    the main process wrote; otherwise as they are. Without it the head's initialisation was written into empty
    tensors and lost, and the reward model trained from transformers' own initialisation."""
    if not any(hasattr(p, "ds_id") for p in params):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


class RewardModel:
    """A sequence-classification reward model with its tokenizer and normalisation.

    `score(prompts, responses)` = `normalization.apply(raw)` = (raw + bias) / scale, one float per pair, on
    the CPU: the units PPO trains on. Without a normalisation file it is the identity (raw scores).
    """

    def __init__(
        self,
        model: PreTrainedModel | nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        normalization: RewardNormalization | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.normalization = normalization if normalization is not None else RewardNormalization.identity()
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise ValueError(
                "the reward tokenizer needs a pad token distinct from EOS (the reward is read at EOS)"
            )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def raw_score_ids(self, input_ids: Sequence[Sequence[int]], batch_size: int = 64) -> torch.Tensor:
        """Unnormalised rewards of already tokenised inputs (see `reward_input_ids`)."""
        was_training = self.model.training
        self.model.eval()
        pad_id = self.tokenizer.pad_token_id
        scores = []
        try:
            for start in range(0, len(input_ids), batch_size):
                batch = pad_right(input_ids[start : start + batch_size], pad_id).to(self.device)
                logits = self.model(
                    input_ids=batch, attention_mask=(batch != pad_id).long(), use_cache=False
                ).logits
                scores.append(logits[:, 0].float().cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(scores) if scores else torch.zeros(0)

    def raw_score(
        self, prompts: Sequence[Prompt], responses: Sequence[str], batch_size: int = 64
    ) -> torch.Tensor:
        """Unnormalised rewards: what the head outputs at the EOS token."""
        return self.raw_score_ids(reward_input_ids(self.tokenizer, prompts, responses), batch_size)

    def score(
        self, prompts: Sequence[Prompt], responses: Sequence[str], batch_size: int = 64
    ) -> torch.Tensor:
        """Normalised rewards, (raw + bias) / scale: the normalisation's reference responses score mean 0,
        std 1."""
        return self.normalization.apply(self.raw_score(prompts, responses, batch_size))


def load_reward_model(
    path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
) -> RewardModel:
    """Load a reward stage's run folder (adapter or full model) ready to score, with its normalisation.

    An adapter folder is merged into its base, following the chain of run folders (the SFT adapter the
    reward model was trained on is merged first).
    """
    from instruct_tune.config import ModelArguments
    from instruct_tune.models.loading import load_model, load_tokenizer

    model_args = ModelArguments(model_name_or_path=str(path), dtype=dtype)
    tokenizer = load_tokenizer(model_args, trust_remote_code=trust_remote_code)
    model = load_model(model_args, tokenizer, head="reward", trust_remote_code=trust_remote_code)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    return RewardModel(model, tokenizer, normalization=RewardNormalization.load(path))
