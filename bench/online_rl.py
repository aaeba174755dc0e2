"""Episodes/s and peak RSS of the online RL methods: TRL's GRPO and RLOO (our stages) against our PPO.

    python bench/online_rl.py [--episodes 256] [--repeats 2]        (`make bench` runs it)

All sides start from the PPO benchmark's models (bench/ppo.py: a ~11M-parameter GPT-2, its LoRA SFT adapter
and LoRA reward model), train a LoRA r16 policy on the tiny task's prompts on CPU in fp32, each run in a fresh
process, the sides alternating within each repeat. Equal footing: the same number of completions (`episodes`),
`batch` completions of up to `response_length` tokens sampled at a time at temperature 1, trained on in
`mini_batches` minibatches for `ppo_epochs` passes (PPO's ppo_epochs; TRL's num_iterations), learning rate
1e-5, KL coefficient 0.05 (PPO's default kl_coef, in its reward; GRPO's beta in the loss, RLOO's in the
reward), the reward model's scores shifted as PPO's default reads them, missing_eos_penalty 1. GRPO and RLOO sample `generations` completions
per prompt (batch / generations prompts a batch); PPO one per prompt and also trains a value head. Time is
each run's own `train_runtime`; peak RSS is the process's. Writes bench/results/online_rl.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import REPO, machine, run_timed, summary, write_result
from ppo import PROMPTS, models
from ppo import ours as ours_ppo

SIDES = ("ppo", "grpo", "rloo")


def trl_side(method: str, sft: Path, reward: Path, a: argparse.Namespace) -> float:
    """Run recipes/{grpo,rloo}.py at the benchmark's settings; returns episodes/s (peak RSS: the caller's)."""
    per_step = a.batch // a.mini_batches  # completions per optimizer step, as PPO's minibatch
    with tempfile.TemporaryDirectory() as out:
        _, rss = run_timed([
            sys.executable, str(REPO / f"recipes/{method}.py"), "--model_name_or_path", str(sft),
            "--reward_model_path", str(reward), "--reward", "reward_model", "--use_peft", "true",
            "--lora_r", "16", "--lora_alpha", "32", "--dataset_name", str(PROMPTS), "--output_dir", out,
            "--max_steps", str(a.episodes // per_step), "--per_device_train_batch_size", str(per_step),
            "--steps_per_generation", str(a.mini_batches), "--num_iterations", str(a.ppo_epochs),
            "--num_generations", str(a.generations), "--max_completion_length", str(a.response_length),
            "--temperature", "1.0", "--learning_rate", "1e-5", "--beta", "0.05", "--missing_eos_penalty", "1.0",
            "--scale_scores", "false", "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "4",
            "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true", "--seed", "0",
        ])  # fmt: skip
        metrics = json.loads((Path(out) / "metrics.json").read_text())
    return metrics["episodes"] / metrics["train_runtime"], rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("episodes", 256), ("batch", 64), ("mini_batches", 4), ("ppo_epochs", 4),
                          ("response_length", 24), ("generations", 4), ("repeats", 2),
                          ("n_embd", 384), ("n_layer", 6)):  # fmt: skip
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {', '.join(SIDES)}")
    parser.add_argument("--name", default="online_rl", help="result file bench/results/NAME.json")
    a = parser.parse_args()
    sides = tuple(dict.fromkeys(a.sides.split(",")))
    unknown = set(sides) - set(SIDES)
    if unknown:
        parser.error(f"--sides: unknown {sorted(unknown)}; choose from {', '.join(SIDES)}")
    if a.batch % a.mini_batches or a.batch % a.generations or a.episodes % (a.batch // a.mini_batches):
        parser.error("--batch must divide by --mini_batches and --generations, --episodes by a minibatch")
    base, sft, reward, n_params = models(a.n_embd, a.n_layer)
    speed: dict[str, list[float]] = {side: [] for side in sides}
    rss: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(a.repeats):  # alternate the sides within each repeat
        for side in sides:
            if side == "ppo":
                eps, peak, _ = ours_ppo(sft, reward, a, lora=True)
            else:
                eps, peak = trl_side(side, sft, reward, a)
            speed[side].append(eps)
            rss[side].append(peak)
            print(f"{side:6s} {eps:7.2f} episodes/s  peak RSS {peak:7.0f} MB", flush=True)
    table = {side: summary(values) for side, values in speed.items()}
    result = {
        **{f"episodes_per_s_{side}": table[side]["median"] for side in sides},
        **{f"peak_rss_mb_{side}": max(rss[side]) for side in sides},
        "episodes_per_s": table,
        "runs": speed,
        "peak_rss_mb_runs": rss,
        "settings": {"model_parameters": n_params, **vars(a)},
        "machine": machine(),
    }
    first = sides[0]
    for side, s in table.items():
        print(f"{side:6s} episodes/s min {s['min']:6.2f} median {s['median']:6.2f} max {s['max']:6.2f}  "
              f"peak RSS {max(rss[side]):6.0f} MB  this/{first} x{s['median'] / table[first]['median']:.2f}")  # fmt: skip
    write_result(a.name, result)


if __name__ == "__main__":
    main()
