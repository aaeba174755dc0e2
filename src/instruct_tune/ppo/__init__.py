"""Our PPO for RLHF (TRL has none since 1.13): arithmetic, models, rollouts and the training loop."""
