"""`instruct-tune` console script: one entry point for the stages and tools.

    instruct-tune sft --config recipes/configs/tiny/sft.yaml [--key value ...]
    instruct-tune reward --config recipes/configs/tiny/reward.yaml [--key value ...]
    instruct-tune ppo --config recipes/configs/tiny/ppo.yaml [--key value ...]
    instruct-tune eval --config recipes/configs/tiny/eval.yaml [--key value ...]
    instruct-tune score outputs/tiny/reward --prompt "Add 2 and 3." --response "5"
    instruct-tune data check data/tiny/sft.jsonl --kind sft
    instruct-tune build-tiny [--out models/tiny-gpt2]

Heavy libraries are imported only by the command that needs them, so `--help` answers at once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

USAGE = """usage: instruct-tune <command> [options]

commands:
  sft          supervised fine-tuning (same options as recipes/sft.py)
  reward       reward model on comparisons (same options as recipes/reward.py)
  ppo          PPO against the reward model (same options as recipes/ppo.py)
  eval         policies vs SFT on held-out prompts: win rates, reward, KL, plots (same options as recipes/eval.py)
  score        print the normalised reward of responses to a prompt: score RUN_FOLDER --prompt P --response R
  data check   detect the format of a dataset and list every problem row
  build-tiny   build the tiny pretrained model of the built-in default from data/tiny

Run `instruct-tune <command> --help` for the options of one command.
"""


def _sft(argv: Sequence[str]) -> int:
    from instruct_tune.config import DataArguments, ModelArguments, SFTStageConfig, parse_args
    from instruct_tune.stages.sft import run_sft

    run_sft(*parse_args(SFTStageConfig, DataArguments, ModelArguments, args=argv))
    return 0


def _reward(argv: Sequence[str]) -> int:
    from instruct_tune.config import DataArguments, ModelArguments, RewardStageConfig, parse_args
    from instruct_tune.stages.reward import run_reward

    run_reward(*parse_args(RewardStageConfig, DataArguments, ModelArguments, args=argv))
    return 0


def _ppo(argv: Sequence[str]) -> int:
    from instruct_tune.config import DataArguments, ModelArguments, PPOStageConfig, parse_args
    from instruct_tune.stages.ppo import run_ppo

    run_ppo(*parse_args(PPOStageConfig, DataArguments, ModelArguments, args=argv))
    return 0


def _eval(argv: Sequence[str]) -> int:
    from instruct_tune.config import EvalStageConfig, parse_args
    from instruct_tune.stages.eval import run_eval

    run_eval(*parse_args(EvalStageConfig, args=argv))
    return 0


def _score(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="instruct-tune score",
        description="Print the reward of each response to the prompt (normalised: SFT responses average 0).",
    )
    parser.add_argument("run_folder", help="reward stage run folder")
    parser.add_argument("--prompt", required=True, help="the user turn")
    parser.add_argument("--response", required=True, action="append", help="a response (repeat for several)")
    parser.add_argument("--raw", action="store_true", help="print the reward without the normalisation bias")
    args = parser.parse_args(list(argv))
    from instruct_tune.models.reward import load_reward_model

    rm = load_reward_model(args.run_folder)
    prompts = [args.prompt] * len(args.response)
    scores = rm.raw_score(prompts, args.response) if args.raw else rm.score(prompts, args.response)
    for value in scores.tolist():
        print(f"{value:.4f}")
    return 0


def _data(argv: Sequence[str]) -> int:
    if not argv or argv[0] != "check":
        print("usage: instruct-tune data check PATH [--kind sft|preference|prompts|text]", file=sys.stderr)
        return 2
    from instruct_tune.data.check import main as check_main

    return check_main(list(argv[1:]))


def _build_tiny(argv: Sequence[str]) -> int:
    from instruct_tune.tiny.build_model import main as build_main

    return build_main(list(argv))


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "sft": _sft,
    "reward": _reward,
    "ppo": _ppo,
    "eval": _eval,
    "score": _score,
    "data": _data,
    "build-tiny": _build_tiny,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch `instruct-tune <command> ...` to the command's own parser."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"instruct-tune: unknown command '{argv[0]}'\n\n{USAGE}", file=sys.stderr)
        return 2
    return command(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
