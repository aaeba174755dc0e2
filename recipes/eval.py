"""Evaluate policies against their SFT start on held-out prompts: win rates (reward model and gold judge),
reward, gold score per task family, KL to SFT, length, EOS share and held-out perplexity; a table and plots.

python recipes/eval.py --config recipes/configs/tiny/eval.yaml
python recipes/eval.py --config recipes/configs/tiny/eval.yaml --policy_paths outputs/tiny/ppo outputs/tiny/ppo-ptx
accelerate launch recipes/eval.py --config recipes/configs/tiny/eval.yaml   # one process evaluates
"""

from instruct_tune.config import EvalStageConfig, parse_args


def main(args: EvalStageConfig) -> None:
    from instruct_tune.stages.eval import run_eval

    run_eval(args)


if __name__ == "__main__":
    main(*parse_args(EvalStageConfig))
