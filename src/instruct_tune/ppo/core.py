"""The arithmetic of PPO for language models, as pure functions on tensors.

Layout: per-token tensors are `[batch, response_length]`, aligned on the response tokens (prompts are left
padded, so every response starts at the same column); `mask` is 1 on the tokens a response really has
(up to and including its first EOS) and 0 on padding after it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from instruct_tune.models.sampling import first_eos_mask, penalize_missing_eos, truncate_after_eos

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "entropy_from_logits",
    "first_eos_mask",
    "gae_advantages",
    "kl_penalized_rewards",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "penalize_missing_eos",
    "policy_loss",
    "truncate_after_eos",
    "value_loss",
]


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over all elements, or along `dim`)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` where `mask` is 1 (Bessel-corrected by default)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            return torch.zeros((), dtype=values.dtype, device=values.device)
        var = var * n / (n - 1)
    return var


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Scale `values` to unit variance over `mask` (and zero mean when `shift_mean`); padding is left at 0."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def logprobs_from_logits(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probability of each token under `logits / temperature` (the distribution it was sampled from)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return torch.gather(logp, 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of the sampling distribution at every position."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token rewards: `-beta * (logp - logp_ref)` on every token, plus the score at the last token.

    Returns `(rewards, kl, non_score_reward)`, each `[batch, length]` and zero on padding.
    """
    mask_f = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * mask_f
    non_score = -beta * kl
    last = (mask.sum(dim=1) - 1).clamp(min=0)
    rewards = non_score.clone()
    rewards[torch.arange(len(scores), device=scores.device), last] += scores.to(rewards.dtype)
    return rewards * mask_f, kl, non_score


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each response; returns `(advantages, returns)`.

    `delta_t = r_t + gamma * V_{t+1} - V_t` with `V` = 0 after the last token of a response;
    `A_t = delta_t + gamma * lam * A_{t+1}`; returns = A + V. Zero on padding.
    """
    mask_f = mask.to(values.dtype)
    values = values * mask_f
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask_f[:, t]
        advantages[:, t] = next_advantage
    returns = advantages + values
    return advantages * mask_f, returns * mask_f


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss `mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))` over `mask`.

    Stats: `clipfrac` (share of tokens where the clipped term won), `approxkl` (0.5 * mean log-ratio^2),
    `ratio` (mean ratio).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).float(), mask).detach(),
        "approxkl": (0.5 * masked_mean(log_ratio**2, mask)).detach(),
        "ratio": masked_mean(ratio, mask).detach(),
    }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss `0.5 * mean(max((V - R)^2, (V_old + clip(V - V_old, +-eps) - R)^2))` over `mask`."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    stats = {"clipfrac": masked_mean((clipped_err > unclipped_err).float(), mask).detach()}
    return loss, stats


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, beta: float) -> None:
        self.value = float(beta)

    def update(self, kl: float, n_episodes: int) -> None:  # noqa: ARG002 - same interface as the adaptive one
        """Nothing to adapt."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """lm-human-preferences' controller: `beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon`."""

    def __init__(self, beta: float, target: float, horizon: float) -> None:
        super().__init__(beta)
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target} and {horizon}")
        self.target, self.horizon = float(target), float(horizon)

    def update(self, kl: float, n_episodes: int) -> None:
        """Move beta towards the value that keeps the mean KL per response at `target`."""
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_episodes / self.horizon
