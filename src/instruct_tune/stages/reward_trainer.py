"""`trl.RewardTrainer` over one row per prompt, with InstructGPT's grouped ranking loss.

    loss = 1/G * sum_g [ -1/P_g * sum_{(w,l) in g} log sigmoid(r(x_g, y_w) - r(x_g, y_l) - m_wl) ]

over the G prompts of the batch, P_g = C(K,2) pairs of prompt g (1 for a plain chosen/rejected pair): each
prompt counts once and its pairs are averaged, so a 9-way ranking weighs as much as a single pair. `m_wl` is
the optional margin (`use_margin`: the data's `margin` column, or score differences of rankings given by
`scores`, times `margin_scale`); off by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from trl import RewardTrainer

from instruct_tune.compat import (
    DatasetHooks,
    add_trained_tokens,
    log_trainer_metric,
    prepare_inputs,
    record_token_count,
)
from instruct_tune.data.preference_groups import group_comparisons, tokenize_groups
from instruct_tune.models.reward_forward import packed_rewards
from instruct_tune.stages.guards import NonFiniteGuard


def group_ranking_loss(
    rewards: torch.Tensor,
    better: torch.Tensor,
    worse: torch.Tensor,
    pair_weight: torch.Tensor,
    margin: torch.Tensor | None = None,
) -> torch.Tensor:
    """InstructGPT's RM loss: -1/C(K,2) * sum of log sigmoid(r_w - r_l - m) per prompt, averaged over prompts.

    `pair_weight` is 1/P_g for each pair of prompt g, so it sums to the number of prompts.
    """
    diff = rewards[better] - rewards[worse]
    if margin is not None:
        diff = diff - margin
    return -(pair_weight * F.logsigmoid(diff)).sum() / pair_weight.sum()


class GroupedRewardTrainer(NonFiniteGuard, DatasetHooks, RewardTrainer):
    """`trl.RewardTrainer` over one row per prompt: own tokenisation, collator and loss; the rest is TRL's.

    A NaN/inf loss or logged figure stops training (`instruct_tune.stages.guards`). TRL's private dataset hooks
    are answered through `instruct_tune.compat.DatasetHooks`.
    """

    guard_stage = "reward"
    signature_columns = ("input_ids", "better", "worse", "margin", "length")

    def prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "input_ids" in dataset.column_names:
            return dataset
        if "responses" not in dataset.column_names:
            dataset = group_comparisons(dataset)
        return tokenize_groups(dataset, processing_class, args.max_length, dataset_name)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        better, worse = inputs.pop("better"), inputs.pop("worse")
        pair_weight, margin = inputs.pop("pair_weight"), inputs.pop("margin", None)
        if "segment_ids" in inputs:
            rewards = packed_rewards(model, inputs)
            real_tokens = (inputs["segment_ids"] >= 0).sum()
        else:
            rewards = model(**inputs, use_cache=False).logits.squeeze(-1)
            real_tokens = inputs["attention_mask"].sum()
        loss = group_ranking_loss(rewards, better, worse, pair_weight, margin)
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * torch.mean(rewards**2)
        outputs = {"rewards": rewards}

        if mode == "train":
            add_trained_tokens(self, self.accelerator.gather_for_metrics(real_tokens).sum().item())
        record_token_count(self, mode)
        with torch.no_grad():
            diff = rewards[better] - rewards[worse]
            stats = {
                "mean_reward": rewards.mean(),
                "accuracy": (diff > 0).float().mean(),
                "margin": diff.mean(),
            }
            for key, value in stats.items():
                log_trainer_metric(self, mode, key, self.accelerator.gather_for_metrics(value).mean().item())
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Evaluation during training reports the loss and the logged accuracy/margin; the rewards of a batch
        # vary in number between processes, so they are not gathered (the final eval scores every pair).
        inputs = prepare_inputs(self, inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
