"""Our PPO for RLHF (TRL has none since 1.13): arithmetic, models, rollouts and the training loop.

- `core`: the arithmetic (logprobs, KL penalty, GAE, clipped losses, KL controllers), pure tensor functions.
- `adapters`, `models`: the four models on as few bases as possible (`build_ppo_models`).
- `rollout`: the `RolloutBackend` seam and `HFRolloutBackend` (`generate` on the training policy).
- `advantages`: the `AdvantageEstimator` seam and `KLPenalizedGAE` (KL in the reward, GAE).
- `scoring`, `update`, `schedule`: a rollout's forwards and `ScoredBatch`, the update's losses and optimizer,
  which prompts and PPO-ptx rows each step reads.
- `sanity`, `reporting`, `checkpointing`: the stops (NaN/inf, KL, EOS share), logged statistics and samples,
  checkpoints.
- `trainer`: `PPOTrainer`, the loop that ties them together.
"""
