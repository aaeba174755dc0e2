"""The trained reward model as the later stages use it: one loader, one scoring function, normalised.

    rm = load_reward_model("outputs/tiny/reward")
    rm.score(["Add 2 and 3."], ["5"])          # tensor([1.73]): normalised, SFT responses score 0 on average

A prompt and a response are rendered exactly as the reward stage trained on them (`reward_input_ids`): the
prompt messages plus one assistant turn through the tokenizer's chat template, which ends the turn with EOS;
the sequence-classification head reads the reward at that last (EOS) token. The run folder's
`reward_normalization.json` holds the bias that makes the reference responses (SFT-policy samples, as in
InstructGPT) score mean 0; `score` adds it, `raw_score` does not.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

NORMALIZATION_FILE = "reward_normalization.json"

Message = Mapping[str, str]
Prompt = str | Sequence[Message]


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    """A prompt as chat messages: a string is one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(message) for message in prompt]


def reward_input_ids(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], responses: Sequence[str]
) -> list[list[int]]:
    """Token ids the reward model reads for each (prompt, response): prompt + assistant turn, chat template.

    The one tokenisation of reward-model inputs, used in training, evaluation and scoring alike: what
    `trl.RewardTrainer` does for conversational data (`apply_chat_template(prompt + completion)`), cut after
    the turn's EOS. Templates that write text after EOS (ChatML's `<|im_end|>` then a newline) would put the
    reward on that text, while PPO reads it at the EOS its policy samples end with.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        return []
    conversations = [
        as_messages(prompt) + [{"role": "assistant", "content": response}]
        for prompt, response in zip(prompts, responses, strict=True)
    ]
    encoded = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True)
    return [through_last_eos(list(ids), tokenizer.eos_token_id) for ids in encoded["input_ids"]]


def through_last_eos(ids: list[int], eos_token_id: int | None) -> list[int]:
    """`ids` up to and including its last EOS (all of it when it has none)."""
    if eos_token_id is not None:
        for end in range(len(ids) - 1, -1, -1):
            if ids[end] == eos_token_id:
                return ids[: end + 1]
    return ids


def pad_right(
    sequences: Sequence[Sequence[int]], pad_token_id: int, multiple_of: int | None = None
) -> torch.Tensor:
    """Right-pad token id lists into one tensor (the reward is read at the last non-pad token)."""
    length = max(len(ids) for ids in sequences)
    if multiple_of:
        length = -(-length // multiple_of) * multiple_of
    batch = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    for row, ids in enumerate(sequences):
        batch[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    return batch


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
    weight = torch.randn(heads[0].weight.shape, generator=generator) * std
    for head in heads:
        head.weight.copy_(weight.to(head.weight.dtype))
        if head.bias is not None:
            head.bias.zero_()
    return std


def read_normalization(path: str | Path) -> dict[str, Any] | None:
    """The run folder's reward normalisation, or None when it has none."""
    file = Path(path) / NORMALIZATION_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def write_normalization(path: str | Path, normalization: Mapping[str, Any]) -> Path:
    """Write `reward_normalization.json` ({"bias", "mean", "std", "n", "source"}) into the run folder,
    atomically: the reward stage writes it last, and make reads it as the sign of a finished folder."""
    from instruct_tune.checkpoints import write_atomic

    return write_atomic(Path(path) / NORMALIZATION_FILE, json.dumps(dict(normalization), indent=2) + "\n")


class RewardModel:
    """A sequence-classification reward model with its tokenizer and normalisation bias.

    `score(prompts, responses)` = raw reward + bias, one float per pair, on the CPU.
    """

    def __init__(
        self,
        model: PreTrainedModel | nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        bias: float = 0.0,
        std: float | None = None,
        normalization: Mapping[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.bias = float(bias)
        self.std = std
        self.normalization = dict(normalization) if normalization else None
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
        """Normalised rewards (raw + bias): the reference responses of the normalisation average 0."""
        return self.raw_score(prompts, responses, batch_size) + self.bias


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
    normalization = read_normalization(path)
    if normalization is None:
        logger.warning("%s has no %s: scores are not normalised", path, NORMALIZATION_FILE)
        return RewardModel(model, tokenizer)
    return RewardModel(
        model,
        tokenizer,
        bias=normalization["bias"],
        std=normalization.get("std"),
        normalization=normalization,
    )
