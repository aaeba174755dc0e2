"""`instruct-tune` console script: one entry point for the stages and tools.

    instruct-tune sft --config recipes/configs/tiny/sft.yaml [--key value ...]
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
  data check   detect the format of a dataset and list every problem row
  build-tiny   build the tiny pretrained model of the built-in default from data/tiny

Run `instruct-tune <command> --help` for the options of one command.
"""


def _sft(argv: Sequence[str]) -> int:
    from instruct_tune.config import DataArguments, ModelArguments, SFTStageConfig, parse_args
    from instruct_tune.stages.sft import run_sft

    run_sft(*parse_args(SFTStageConfig, DataArguments, ModelArguments, args=argv))
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


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {"sft": _sft, "data": _data, "build-tiny": _build_tiny}


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
