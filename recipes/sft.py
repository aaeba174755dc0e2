"""Supervised fine-tuning on demonstrations (InstructGPT step 1).

    accelerate launch recipes/sft.py --config recipes/configs/tiny/sft.yaml
    accelerate launch recipes/sft.py --config recipes/configs/tiny/sft.yaml --learning_rate 1e-3 --output_dir /tmp/sft
    python recipes/sft.py --config recipes/configs/gpt2-alpaca/sft.yaml
"""

from instruct_tune.config import DataArguments, ModelArguments, SFTStageConfig, parse_args
from instruct_tune.stages.run_folder import RunFolderArguments


def main(
    training_args: SFTStageConfig,
    data_args: DataArguments,
    model_args: ModelArguments,
    run_options: RunFolderArguments = RunFolderArguments(),  # noqa: B008 (a frozen-in-use default)
) -> None:
    from instruct_tune.stages.sft import run_sft

    run_sft(training_args, data_args, model_args, run_options)


if __name__ == "__main__":
    main(*parse_args(SFTStageConfig, DataArguments, ModelArguments, RunFolderArguments))
