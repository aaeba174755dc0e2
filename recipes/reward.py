"""Reward model on comparisons (InstructGPT step 2): pairs or K-way rankings, each prompt one batch element.

    accelerate launch recipes/reward.py --config recipes/configs/tiny/reward.yaml
    accelerate launch recipes/reward.py --config recipes/configs/tiny/reward.yaml --output_dir /tmp/rm-run
    python recipes/reward.py --config recipes/configs/gpt2-alpaca/reward.yaml
"""

from instruct_tune.config import DataArguments, ModelArguments, RewardStageConfig, parse_args
from instruct_tune.stages.run_folder import RunFolderArguments


def main(
    training_args: RewardStageConfig,
    data_args: DataArguments,
    model_args: ModelArguments,
    run_options: RunFolderArguments = RunFolderArguments(),  # noqa: B008 (a frozen-in-use default)
) -> None:
    from instruct_tune.stages.reward import run_reward

    run_reward(training_args, data_args, model_args, run_options)


if __name__ == "__main__":
    main(*parse_args(RewardStageConfig, DataArguments, ModelArguments, RunFolderArguments))
