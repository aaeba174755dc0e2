"""RLOO against the reward model from the SFT policy, on TRL's RLOOTrainer (an alternative to PPO; `reward: tiny_gold`
trains on the tiny task's gold judge instead, a verifiable reward).

    accelerate launch recipes/rloo.py --config recipes/configs/tiny/rloo.yaml
    accelerate launch recipes/rloo.py --config recipes/configs/tiny/rloo.yaml --reward tiny_gold --output_dir /tmp/rloo-gold
    python recipes/rloo.py --config recipes/configs/smollm2/rloo.yaml
"""

from instruct_tune.config import DataArguments, ModelArguments, parse_args
from instruct_tune.config.online_rl import RLOOStageConfig
from instruct_tune.stages.run_folder import RunFolderArguments


def main(
    training_args: RLOOStageConfig,
    data_args: DataArguments,
    model_args: ModelArguments,
    run_options: RunFolderArguments = RunFolderArguments(),  # noqa: B008 (a frozen-in-use default)
) -> None:
    from instruct_tune.stages.online_rl import run_rloo

    run_rloo(training_args, data_args, model_args, run_options)


if __name__ == "__main__":
    main(*parse_args(RLOOStageConfig, DataArguments, ModelArguments, RunFolderArguments))
