"""One round of InstructGPT's human-feedback loop: sample, label, retrain the reward model and PPO, compare.

    make round                          # the tiny default, labelled by the gold judge: outputs/tiny/round2
    make round LABELLER=human           # serve the app and wait until people have labelled every item
    instruct-tune label round --config recipes/configs/tiny/round.yaml --run_dir outputs/tiny
    python -m instruct_tune.label.round --run_dir outputs/tiny --num_prompts 200 -k 4

Steps, each the command a user would type (the stages through `accelerate launch`, as the Makefile runs them),
each timed, their output shown and kept in ROUND/logs/<step>.log:

1. sample: `label new-project` (run in this process, which loads torch once for it and the report): K
   responses of `policy` (default RUN/ppo) per prompt of a slice of the PPO prompt file (prompts also in the
   eval config's prompt file are dropped) into ROUND/labels.sqlite;
2. label: `label serve` in the background; with `labeller: scripted`, `label add-labeler` and the scripted
   labeller (`label.scripted`, the tiny gold judge) ranks every item through the HTTP API; with `human`,
   the round prints the address and polls the project's stats until every item is labelled;
3. export: `label export` to ROUND/rankings.jsonl, split by prompt into rankings_train.jsonl and a held-out
   share rankings_heldout.jsonl;
4. reward: the reward recipe on the reward config's comparisons plus rankings_train.jsonl -> ROUND/reward;
5. ppo: the PPO recipe from RUN/sft against ROUND/reward -> ROUND/ppo;
6. eval: the eval recipe on both rounds' policies against RUN/sft -> ROUND/eval;
7. report: both reward models' accuracy on the held-out rankings (`evaluation.comparisons`, as the reward
   stage measures its own), then ROUND/round.md (printed) and ROUND/round.json.

A finished step is skipped when the round runs again (a stopped training stage resumes from its checkpoint);
`force`, other settings, or a round-1 folder finished after the round started, start it over, the old round
folder kept as ROUND.previous. Options come from `--config` (YAML, the keys of OPTIONS) and flags (which win).
The labelling steps live in `label.round_label`, the figures and round.md in `label.round_report`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from instruct_tune.config.parsing import read_yaml_config
from instruct_tune.label.db import ProjectError
from instruct_tune.label.round_label import (
    command_line,
    fully_labelled,
    label,
    label_cmd,
    project_counts,
    run_here,
    run_logged,
    slice_prompts,
    split_rankings,
)

# The stage recipes: the working directory's (make runs from the repository root), else this checkout's.
RECIPES = next(
    (
        p
        for p in (Path("recipes"), Path(__file__).resolve().parents[3] / "recipes")
        if (p / "reward.py").is_file()
    ),
    Path("recipes"),
)
OPTIONS: dict[str, tuple[Any, str]] = {
    "run_dir": ("outputs/tiny", "round 1's run folder: its sft, reward and (default policy) ppo folders"),
    "config_dir": ("recipes/configs/tiny", "the stage configs (reward.yaml, ppo.yaml, eval.yaml) to reuse"),
    "policy": (None, "the policy to sample from (default RUN_DIR/ppo)"),
    "round_dir": (None, "where the round writes (default RUN_DIR/round2)"),
    "prompts": ("data/tiny/prompts.jsonl", "prompt file to take the round's prompts from"),
    "first_prompt": (0, "first row of the prompt file to use (0-based)"),
    "num_prompts": (200, "prompts to sample responses for"),
    "k": (4, "responses sampled per prompt (2..9)"),
    "max_new_tokens": (32, "longest response sampled"),
    "temperature": (1.0, "sampling temperature"),
    "batch_size": (256, "prompts per generate call"),
    "overlap": (0.0, "share of prompts given to 2 labellers (agreement; human labelling)"),
    "heldout_fraction": (0.1, "share of the new prompts held out to measure both reward models"),
    "new_weight": (1.0, "weight of the new rankings in the reward model's mixture (> 1 repeats them)"),
    "labeller": (
        "scripted",
        "scripted: the tiny gold judge over HTTP; human: wait until people have labelled",
    ),
    "host": ("127.0.0.1", "address the labelling app binds"),
    "port": (0, "port of the labelling app (0: a free one)"),
    "poll_seconds": (30.0, "with labeller human: seconds between looks at the project's stats"),
    "seed": (None, "seed of the sampling and split, passed to every stage as --seed (default: the configs')"),
    "launch": (None, "the launcher of the stages (default: accelerate launch as the Makefile runs it)"),
    "force": (False, "start the round over (the old folder kept as ROUND_DIR.previous)"),
}
# Options that do not change the round's results; another value of any other one starts the round over.
RUNTIME = ("round_dir", "labeller", "host", "port", "poll_seconds", "launch", "force")
STEPS = ("sample", "label", "export", "reward", "ppo", "eval", "report")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--config", help="YAML file of these options (e.g. recipes/configs/tiny/round.yaml)")
    for key, (default, help) in OPTIONS.items():
        text = help if default is None or isinstance(default, bool) else f"{help} (default {default})"
        if isinstance(default, bool):
            p.add_argument(f"--{key}", action="store_true", default=None, help=text)
        else:
            kind = int if key == "seed" else str if default is None else type(default)
            p.add_argument(f"--{key}", *(["-k"] if key == "k" else []), type=kind, default=None, help=text)
    return p


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """The options: defaults, then the --config file, then the flags given."""
    file = read_yaml_config(args.config) if args.config else {}
    unknown = sorted(set(file) - set(OPTIONS))
    if unknown:
        raise ProjectError(f"{args.config}: unknown round options {unknown} (known: {', '.join(OPTIONS)})")
    flags = {k: v for k, v in vars(args).items() if k in OPTIONS and v is not None}
    o = {**{k: d for k, (d, _) in OPTIONS.items()}, **file, **flags}
    o["policy"] = o["policy"] or str(Path(o["run_dir"]) / "ppo")
    o["round_dir"] = o["round_dir"] or str(Path(o["run_dir"]) / "round2")
    if o["labeller"] not in ("scripted", "human"):
        raise ProjectError(f"labeller: {o['labeller']!r} is not 'scripted' or 'human'")
    if not 0.0 < o["heldout_fraction"] < 1.0:
        raise ProjectError(f"heldout_fraction: {o['heldout_fraction']} is not between 0 and 1")
    if o["launch"] is None:  # as the Makefile's LAUNCH: every core to the one process on a CPU-only machine
        cpu = (
            [] if shutil.which("nvidia-smi") else ["--num_cpu_threads_per_process", str(os.cpu_count() or 1)]
        )
        accelerate = Path(sys.executable).with_name("accelerate")
        config = RECIPES / "accelerate" / "single_device.yaml"
        o["launch"] = shlex.join([str(accelerate), "launch", "--config_file", str(config), *cpu])
    return o


def stage_commands(o: dict[str, Any], rd: Path) -> dict[str, list[str]]:
    """The round's reward, ppo and eval commands: the Makefile's, with the round's data and folders."""
    launch, conf, sft = shlex.split(o["launch"]), Path(o["config_dir"]), str(Path(o["run_dir"]) / "sft")
    reward = read_yaml_config(conf / "reward.yaml")
    old = reward.get("dataset_mixture") or [
        {"path": reward["dataset_name"], "split": reward.get("dataset_split", "train")}
    ]
    mixture = [*old, {"path": str(rd / "rankings_train.jsonl"), "weight": o["new_weight"]}]
    return {
        "reward": command_line(
            *launch,
            RECIPES / "reward.py",
            config=conf / "reward.yaml",
            output_dir=rd / "reward",
            model_name_or_path=sft,
            policy_path=sft,
            dataset_mixture=json.dumps(mixture),
            eval_dataset_name=reward.get("eval_dataset_name"),
            seed=o["seed"],
        ),
        "ppo": command_line(
            *launch,
            RECIPES / "ppo.py",
            config=conf / "ppo.yaml",
            model_name_or_path=sft,
            reward_model_path=rd / "reward",
            output_dir=rd / "ppo",
            seed=o["seed"],
        ),
        "eval": command_line(
            *launch,
            RECIPES / "eval.py",
            config=conf / "eval.yaml",
            output_dir=rd / "eval",
            sft_path=sft,
            policy_paths=[o["policy"], rd / "ppo"],
            policy_names=["round1", "round2"],
            reward_model_path=rd / "reward",
            seed=o["seed"],
        ),
    }


def start_state(o: dict[str, Any], rd: Path) -> dict[str, Any]:
    """ROUND/round.json, started over (the old folder kept) when forced, with other settings, or when a
    round-1 folder finished after the round started; fails while round 1 is unfinished."""
    run, policy = Path(o["run_dir"]), Path(o["policy"])
    inputs = [run / "sft" / "metrics.json", run / "reward" / "reward_normalization.json"]
    inputs += [policy / "metrics.json"] if policy.exists() or policy == run / "ppo" else []  # else a Hub id
    missing = [str(p) for p in inputs if not p.is_file()]
    if missing:
        raise ProjectError(f"round 1 is unfinished: no {', '.join(missing)} (`make ppo` finishes it)")
    settings = {k: v for k, v in o.items() if k not in RUNTIME}
    state = json.loads((rd / "round.json").read_text()) if (rd / "round.json").is_file() else None
    why = "no round.json" if state is None and rd.exists() else None
    if state is not None:
        newer = [str(p) for p in inputs if p.stat().st_mtime > state["started"]]
        why = (
            "force"
            if o["force"]
            else "other settings"
            if state["settings"] != settings
            else newer and f"{newer[0]} is newer"
        )
    if why:
        shutil.rmtree(f"{rd}.previous", ignore_errors=True)
        rd.rename(f"{rd}.previous")
        print(f"{why}: starting the round over, the old round folder kept as {rd}.previous", flush=True)
        state = None
    state = state or {"settings": settings, "started": time.time(), "steps": {}}
    rd.mkdir(parents=True, exist_ok=True)
    (rd / "round.json").write_text(json.dumps(state, indent=2) + "\n")
    return state


def run_round(o: dict[str, Any]) -> Path:
    """Run (or continue) the round of options `o`; returns the path of its round.md."""
    from instruct_tune.label.round_report import reward_accuracy, write_report

    rd, run = Path(o["round_dir"]), Path(o["run_dir"])
    state, db, seed, commands = (
        start_state(o, rd),
        rd / "labels.sqlite",
        o["seed"] or 0,
        stage_commands(o, rd),
    )
    done = {
        "sample": lambda: db.is_file() and project_counts(db)["items"] > 0,
        "label": lambda: fully_labelled(db),
        "export": (rd / "rankings_train.jsonl").is_file,
        "reward": (rd / "reward" / "reward_normalization.json").is_file,
        "ppo": (rd / "ppo" / "metrics.json").is_file,
        "eval": (rd / "eval" / "results.md").is_file,
        "report": lambda: "accuracy" in state,
    }
    for step in STEPS:
        if done[step]():
            print(f"==> round step {step}: done earlier, skipped", flush=True)
            continue
        start, log = time.time(), rd / "logs" / f"{step}.log"
        state.pop("accuracy", None)  # measured again after any step runs again
        if step == "sample":
            for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):  # what a stopped sampling left
                path.unlink(missing_ok=True)
            state["prompts_sampled"] = slice_prompts(o, rd / "prompts.jsonl")
            options = {k: o[k] for k in ("max_new_tokens", "temperature", "batch_size", "overlap")}
            cmd = label_cmd(
                "new-project",
                f"{run.name}-round2",
                "-k",
                o["k"],
                db=db,
                prompts=rd / "prompts.jsonl",
                policy=o["policy"],
                seed=seed,
                **options,
            )
            run_here(cmd, log, step)
        elif step == "label":
            label(o, rd, db)
        elif step == "export":
            out = run_logged(label_cmd("export", db, out=rd / "rankings.jsonl"), log, step)
            # the export's summary line, not what libraries print on import (bitsandbytes' kernel notice)
            summary = [line for line in out.splitlines() if line.startswith(str(rd / "rankings.jsonl"))]
            state["export"] = summary[-1] if summary else out.strip()
            files = [rd / f"rankings{part}.jsonl" for part in ("", "_train", "_heldout")]
            state["train_prompts"], state["heldout_prompts"] = split_rankings(
                *files, o["heldout_fraction"], seed
            )
        elif step in commands:
            run_logged(commands[step], log, step)
        else:
            max_length = read_yaml_config(Path(o["config_dir"]) / "reward.yaml").get("max_length")
            state["accuracy"] = {
                name: reward_accuracy(path, rd / "rankings_heldout.jsonl", max_length)
                for name, path in (("round1", run / "reward"), ("round2", rd / "reward"))
            }
        state["steps"][step] = round(time.time() - start, 1)
        (rd / "round.json").write_text(json.dumps(state, indent=2) + "\n")
    return write_report(o, state, rd)


def run_from_args(args: argparse.Namespace) -> int:
    """Run the round of parsed arguments; prints round.md, or one error line (exit status 2)."""
    try:
        path = run_round(resolve(args))
    except (ProjectError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path.read_text(), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m instruct_tune.label.round", description=__doc__.split("\n")[0]
    )
    return run_from_args(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
