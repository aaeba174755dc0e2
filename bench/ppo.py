"""PPO episodes/s and peak RSS: our PPO stage against trl==1.12.0's `PPOTrainer`, same models and settings.

    python bench/ppo.py [--episodes 256] [--repeats 2]        (`make bench` runs it; it makes the trl venv)
    python bench/ppo.py --n_embd 1024 --n_layer 8 --episodes 64 --repeats 1 --sides ours,trl112 --name ppo_large

    python bench/ppo.py --response_length 128 --ppo_epochs 1 --episodes 128 --repeats 1 --sides ours,trl112 --name ppo_realistic

The third is the realistic-generation setting (InstructGPT's single PPO epoch, answers of 128 tokens), where
sampling is most of a step; `generation_share_*` is the share of our training time spent sampling rollouts.
The second (`make bench` runs it too) is a ~100M-parameter GPT-2, where four models' weights and optimizer state
outweigh what importing the stack holds (473 MB in our venv, 426 MB in trl 1.12's, session 8).

Both sides start from the same ~11M-parameter GPT-2 (random weights, the memory benchmark's tokenizer), sample
24-token answers at temperature 1 to the tiny task's prompts with rollout batch 64, 4 minibatches, 4 PPO epochs,
learning rate 1e-5, on CPU in fp32, each run in a fresh process, the sides alternating within each repeat.
Ours (`ours`): `recipes/ppo.py` with LoRA r16 policy and value on one shared frozen base that also carries
the reference and a LoRA reward model; `ours_full`: full fine-tuning of the same GPT-2 (policy, reference,
value and reward model separate). The peer, in its own venv (bench/.venv-trl112): TRL's
layout with four full models (policy, reference, reward and value), and the same with a LoRA r16 policy
(`peft_config`: the reference is the policy with its adapter off; reward and value stay full models).
Time is each side's own training time (our `train_runtime`, the peer's `trainer.train()`); peak RSS is the
process's. Writes bench/results/ppo.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, WORK, machine, parameters, run_timed, summary, write_result
from ppo_memory import build_folders

PEER_VENV = REPO / "bench" / ".venv-trl112"
PEER_PACKAGES = ["trl==1.12.0", "transformers==5.24.0", "peft==0.21.2", "accelerate==1.15.0", "datasets==5.2.0"]
PROMPTS = REPO / "data" / "tiny" / "prompts.jsonl"


def peer_python() -> Path:
    """The trl 1.12 venv's python, made on first use (torch from this machine's CPU wheel)."""
    python = PEER_VENV / "bin" / "python"
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    return python


def models(n_embd: int, n_layer: int) -> tuple[Path, Path, Path, int]:
    work = WORK / f"ppo-{n_embd}x{n_layer}"
    if not (work / "reward" / "reward_normalization.json").is_file():
        work.mkdir(parents=True, exist_ok=True)
        build_folders(work, n_embd, n_layer)
    return work / "base", work / "sft", work / "reward", parameters(work / "base")


def ours(sft: Path, reward: Path, a: argparse.Namespace, lora: bool) -> tuple[float, float, dict[str, list[float]]]:
    """Episodes/s, peak RSS (MB) and the per-step time split (`time/*` of our PPO log) of one run."""
    with tempfile.TemporaryDirectory() as out:
        _, rss = run_timed([
            sys.executable, str(REPO / "recipes/ppo.py"), "--model_name_or_path", str(sft),
            "--reward_model_path", str(reward), "--use_peft", str(lora).lower(), "--lora_r", "16", "--lora_alpha", "32",
            "--dataset_name", str(PROMPTS), "--eval_fraction", "0", "--output_dir", out,
            "--total_episodes", str(a.episodes), "--rollout_batch_size", str(a.batch),
            "--num_mini_batches", str(a.mini_batches), "--ppo_epochs", str(a.ppo_epochs),
            "--max_new_tokens", str(a.response_length), "--temperature", "1.0", "--learning_rate", "1e-5",
            "--eval_samples", "0", "--sample_steps", "0", "--save_steps", "0", "--report_to", "none",
            "--use_cpu", "true", "--disable_tqdm", "true", "--seed", "0",
        ])  # fmt: skip
        seconds = json.loads((Path(out) / "metrics.json").read_text())["train_runtime"]
        log = json.loads((Path(out) / "trainer_state.json").read_text())["log_history"]
    phases = {key: [r[key] for r in log if key in r] for key in ("time/generate_s", "time/train_s")}
    return a.episodes / seconds, rss, phases


def peer(python: Path, base: Path, a: argparse.Namespace, lora_r: int) -> tuple[float, float]:
    stdout, rss = run_timed([
        str(python), str(REPO / "bench/peers/trl112_ppo.py"), "--policy", str(base), "--reward", str(base),
        "--value", str(base), "--prompts", str(PROMPTS), "--episodes", str(a.episodes), "--batch", str(a.batch),
        "--mini_batches", str(a.mini_batches), "--ppo_epochs", str(a.ppo_epochs),
        "--response_length", str(a.response_length), "--lora_r", str(lora_r),
    ])  # fmt: skip
    result = json.loads(stdout.strip().splitlines()[-1])
    return result["episodes"] / result["seconds"], rss


def generation_share(phases: dict[str, list[float]], kind: str) -> float:
    """The share of our PPO steps' time (`kind`: lora or full runs) spent sampling the rollouts."""
    generate, train = sum(phases[f"{kind} time/generate_s"]), sum(phases[f"{kind} time/train_s"])
    return generate / (generate + train)


IMPORTS = "import torch, transformers, peft, trl, accelerate, datasets"
SIDES = ("ours", "ours_full", "trl112", "trl112_lora")


def import_floor(python: Path | str) -> float:
    """Peak RSS (MB) of a process that only imports the stack both sides run on: the least either side can use."""
    return run_timed([str(python), "-c", IMPORTS])[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("episodes", 256), ("batch", 64), ("mini_batches", 4), ("ppo_epochs", 4),
                          ("response_length", 24), ("repeats", 2), ("n_embd", 384), ("n_layer", 6)):  # fmt: skip
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated; ours and trl112 always run")
    parser.add_argument("--name", default="ppo", help="result file bench/results/NAME.json")
    a = parser.parse_args()
    sides = tuple(dict.fromkeys(["ours", "trl112", *a.sides.split(",")]))
    unknown = set(sides) - set(SIDES)
    if unknown:
        parser.error(f"--sides: unknown {sorted(unknown)}; choose from {', '.join(SIDES)}")
    python = peer_python()
    base, sft, reward, n_params = models(a.n_embd, a.n_layer)
    speed: dict[str, list[float]] = {side: [] for side in sides}
    rss: dict[str, list[float]] = {side: [] for side in sides}
    phases: dict[str, list[float]] = {}  # our per-step time split, for the profile line
    for _ in range(a.repeats):  # alternate the sides within each repeat
        for side in sides:
            if side.startswith("ours"):
                eps, peak, steps = ours(base if side == "ours_full" else sft, reward, a, lora=side == "ours")
                for key, values in steps.items():
                    phases.setdefault(f"{'lora' if side == 'ours' else 'full'} {key}", []).extend(values)
            else:
                eps, peak = peer(python, base, a, 16 if side == "trl112_lora" else 0)
            speed[side].append(eps)
            rss[side].append(peak)
            print(f"{side:12s} {eps:7.2f} episodes/s  peak RSS {peak:7.0f} MB", flush=True)
    table = {side: summary(values) for side, values in speed.items()}
    floor = {"ours": import_floor(sys.executable), "trl112": import_floor(python)}
    result = {
        **{f"episodes_per_s_{side}": table[side]["median"] for side in sides},
        **{f"peak_rss_mb_{side}": max(rss[side]) for side in sides},
        "our_step_seconds": {key: summary(values) for key, values in phases.items()},
        **{f"generation_share_{kind}": generation_share(phases, kind) for kind in ("lora", "full") if f"{kind} time/train_s" in phases},
        **{f"ratio_vs_{side}": table["ours"]["median"] / table[side]["median"] for side in sides if side.startswith("trl")},
        **{f"rss_ratio_vs_{side}": max(rss["ours"]) / max(rss[side]) for side in sides if side.startswith("trl")},
        # What importing torch, transformers, peft, trl, accelerate and datasets alone holds, in each venv.
        "peak_rss_mb_import_floor": floor,
        "import_floor_share_of_trl112": floor["ours"] / max(rss["trl112"]),
        "episodes_per_s": table,
        "runs": speed,
        "peak_rss_mb_runs": rss,
        "settings": {"model_parameters": n_params, **vars(a)},
        "machine": machine(),
    }
    for side, s in table.items():
        print(f"{side:12s} episodes/s min {s['min']:6.2f} median {s['median']:6.2f} max {s['max']:6.2f}  "
              f"peak RSS {max(rss[side]):6.0f} MB  ours/this x{table['ours']['median'] / s['median']:.2f}")  # fmt: skip
    for kind in ("lora", "full"):
        if f"generation_share_{kind}" in result:
            print(f"ours ({kind}): {result[f'generation_share_{kind}']:.0%} of each step sampling the rollout")
    print(f"importing the stack alone: ours {floor['ours']:.0f} MB, trl 1.12 venv {floor['trl112']:.0f} MB "
          f"({result['import_floor_share_of_trl112']:.2f}x trl 1.12's peak)")  # fmt: skip
    write_result(a.name, result)


if __name__ == "__main__":
    main()
