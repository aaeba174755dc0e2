"""PPO sanity stops: a NaN/inf quantity, a policy far from the SFT policy, or one that no longer ends its answers.

`check_finite` stops a run on the first NaN/inf loss, score or statistic. A finite but broken policy (one
update at a huge learning rate: KL 206 nats, no response ending in EOS) would otherwise be saved and marked
finished. `PolicyGuard.check` runs on the start eval, on every rollout's statistics and on the end eval (or,
without eval prompts, on one more batch of training prompts after the last update), with the bounds `max_kl`
and `min_eos_share` of `PPOStageConfig` (null turns either off).

`min_eos_share` is enforced once the policy has reached it (start eval or a rollout), on figures of at least
`EOS_MIN_RESPONSES` responses: a policy that never ended its answers within `max_new_tokens` (an untrained
one, or too few new tokens) is warned about, not stopped, since PPO did not cause it; the share of a handful
of responses is too noisy to judge.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

# The fewest responses whose EOS share `min_eos_share` judges (the tiny default: 256 a rollout, 400 evaluated).
EOS_MIN_RESPONSES = 64


class NonFiniteError(RuntimeError):
    """A loss, score or statistic became NaN/inf: training stops before anything broken is written."""


def check_finite(step: int, **quantities: torch.Tensor | float) -> None:
    """Raise `NonFiniteError` naming the step and the first quantity that is NaN or infinite."""
    for name, value in quantities.items():
        tensor = torch.as_tensor(value)
        if not torch.isfinite(tensor).all():
            raise NonFiniteError(
                f"PPO step {step}: {name} is not finite ({tensor.flatten()[:4].tolist()}...); stopping "
                "without saving. Lower the learning rate, clip rewards (reward_clip) or check the reward model."
            )


class PolicySanityError(RuntimeError):
    """The policy left the bounds `max_kl` / `min_eos_share`: training stops before anything is written."""


class PolicyGuard:
    """Checks a policy's KL to the SFT policy and its EOS share against `args.max_kl` / `args.min_eos_share`."""

    def __init__(self, args: Any) -> None:
        self.args = args
        self.eos_armed = False  # the EOS share has reached min_eos_share once
        self._warned = False

    def check(self, step: int, where: str, kl: float, eos_share: float, responses: int) -> None:
        """Raise `PolicySanityError` naming the step, the figure and the option when a bound is crossed.

        `kl` and `eos_share` are means over `responses` sampled responses.
        """
        args = self.args
        if args.max_kl is not None and kl > args.max_kl:
            raise PolicySanityError(
                f"PPO step {step}: {where} KL to the SFT policy is {kl:.4g} nats per response, above max_kl "
                f"{args.max_kl:g}; stopping without marking the run finished. Lower learning_rate (now "
                f"{args.learning_rate:g}), raise kl_coef or lower target_kl, or raise max_kl (null: off)."
            )
        if not args.min_eos_share or responses < EOS_MIN_RESPONSES:
            return
        if eos_share >= args.min_eos_share:
            self.eos_armed = True
        elif self.eos_armed:
            raise PolicySanityError(
                f"PPO step {step}: {where} EOS share is {eos_share:.3f} (responses ending in EOS within "
                f"max_new_tokens {args.max_new_tokens}), below min_eos_share {args.min_eos_share:g}; stopping "
                "without marking the run finished. Lower learning_rate, raise missing_eos_penalty or "
                "max_new_tokens, or lower min_eos_share (null: off)."
            )
        elif not self._warned:
            self._warned = True
            logger.warning(
                "PPO step %d: only %.1f%% of the %s responses end in EOS within max_new_tokens %d; min_eos_share "
                "%g is enforced once the policy reaches it",
                step,
                100 * eos_share,
                where,
                args.max_new_tokens,
                args.min_eos_share,
            )
