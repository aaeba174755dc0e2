"""The `AdvantageEstimator` seam: from a scored rollout to the advantages and returns PPO's losses read.

The trainer hands an estimator the pieces of a scored rollout (`AdvantageInputs`: final scores, policy and
reference logprobs, values, mask, the KL coefficient) and trains on what it returns (`Advantages`). An
estimator says whether it reads the value model (`needs_values`); without it the trainer leaves the value
loss out. Today's estimator is InstructGPT's: the KL penalty folded into per-token rewards, then GAE with the
value model (`KLPenalizedGAE`; the arithmetic is `instruct_tune.ppo.core`'s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from instruct_tune.ppo import core

__all__ = ["AdvantageEstimator", "AdvantageInputs", "Advantages", "KLPenalizedGAE"]


@dataclass
class AdvantageInputs:
    """A scored rollout; per-token tensors are `[batch, response_length]`, aligned on the response tokens."""

    scores: torch.Tensor  # [batch]: normalised, EOS-penalised, clipped
    logprobs: torch.Tensor  # the policy's at sampling time (not masked)
    ref_logprobs: torch.Tensor  # the reference's (not masked)
    values: torch.Tensor  # the value model's, zero on padding
    mask: torch.Tensor  # 1 on the tokens each response has
    kl_coef: float  # beta of the per-token KL penalty now


@dataclass
class Advantages:
    """What an estimator returns; per-token tensors zero on padding."""

    advantages: torch.Tensor
    returns: torch.Tensor  # the value targets (unused when the estimator does not need values)
    rewards: torch.Tensor  # the per-token rewards the advantages come from
    kl: torch.Tensor  # logp - logp_ref per token (logged, and read by the adaptive KL controller)
    non_score_reward: torch.Tensor  # the KL part of `rewards`


@runtime_checkable
class AdvantageEstimator(Protocol):
    """Turns a scored rollout into advantages and returns."""

    needs_values: bool  # whether `estimate` reads `AdvantageInputs.values` (and the value model trains)

    def estimate(self, inputs: AdvantageInputs) -> Advantages:
        """Advantages and returns of the rollout in `inputs`."""
        ...


class KLPenalizedGAE:
    """InstructGPT / lm-human-preferences: reward = score at the last token - beta x KL on every token, then
    GAE(`gamma`, `lam`) over the value model's estimates; optionally whitened rewards and advantages."""

    needs_values = True

    def __init__(
        self,
        gamma: float = 1.0,
        lam: float = 0.95,
        *,
        whiten_rewards: bool = False,
        whiten_advantages: bool = True,
    ) -> None:
        self.gamma, self.lam = gamma, lam
        self.whiten_rewards, self.whiten_advantages = whiten_rewards, whiten_advantages

    @classmethod
    def from_args(cls, args: Any) -> KLPenalizedGAE:
        """The estimator of a `PPOStageConfig` (`gamma`, `lam`, `whiten_rewards`, `whiten_advantages`)."""
        return cls(
            args.gamma, args.lam, whiten_rewards=args.whiten_rewards, whiten_advantages=args.whiten_advantages
        )

    def estimate(self, inputs: AdvantageInputs) -> Advantages:
        mask = inputs.mask
        rewards, kl, non_score = core.kl_penalized_rewards(
            inputs.scores, inputs.logprobs, inputs.ref_logprobs, mask, inputs.kl_coef
        )
        if self.whiten_rewards:
            rewards = core.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = core.gae_advantages(rewards, inputs.values, mask, self.gamma, self.lam)
        if self.whiten_advantages:
            advantages = core.masked_whiten(advantages, mask)
        return Advantages(advantages, returns, rewards, kl, non_score)
