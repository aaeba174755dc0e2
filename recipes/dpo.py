"""Direct preference optimisation from the SFT policy (an alternative to reward model + PPO).

    accelerate launch recipes/dpo.py --config recipes/configs/tiny/dpo.yaml
    accelerate launch recipes/dpo.py --config recipes/configs/tiny/dpo.yaml --dpo_pairs best --output_dir /tmp/dpo
    python recipes/dpo.py --config recipes/configs/smollm2/dpo.yaml
"""

from instruct_tune.config.arguments import DataArguments, ModelArguments
from instruct_tune.config.dpo import DPOStageConfig
from instruct_tune.config.parsing import parse_args
from instruct_tune.stages.run_folder import RunFolderArguments


def main(
    training_args: DPOStageConfig,
    data_args: DataArguments,
    model_args: ModelArguments,
    run_options: RunFolderArguments = RunFolderArguments(),  # noqa: B008 (a frozen-in-use default)
) -> None:
    from instruct_tune.stages.dpo import run_dpo

    run_dpo(training_args, data_args, model_args, run_options)


if __name__ == "__main__":
    main(*parse_args(DPOStageConfig, DataArguments, ModelArguments, RunFolderArguments))
