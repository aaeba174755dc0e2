"""PPO against the reward model (InstructGPT step 3), with per-token KL to the SFT policy and optional PPO-ptx.

accelerate launch recipes/ppo.py --config recipes/configs/tiny/ppo.yaml
accelerate launch recipes/ppo.py --config recipes/configs/tiny/ppo.yaml --output_dir /tmp/ppo-run
accelerate launch --multi_gpu --num_processes 2 recipes/ppo.py --config recipes/configs/tiny/ppo.yaml
"""

from instruct_tune.config import DataArguments, ModelArguments, PPOStageConfig, parse_args
from instruct_tune.stages.run_folder import RunFolderArguments


def main(
    args: PPOStageConfig,
    data_args: DataArguments,
    model_args: ModelArguments,
    run_options: RunFolderArguments = RunFolderArguments(),  # noqa: B008 (a frozen-in-use default)
) -> None:
    from instruct_tune.stages.ppo import run_ppo

    run_ppo(args, data_args, model_args, run_options)


if __name__ == "__main__":
    main(*parse_args(PPOStageConfig, DataArguments, ModelArguments, RunFolderArguments))
