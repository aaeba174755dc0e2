"""Peak memory of PPO with one shared base against the same run with four separate models (CPU).

    python bench/ppo_memory.py [--n-embd 512 --n-layer 8] [--repeats 2]

Builds a GPT-2-style model (random weights; memory does not depend on them), an SFT LoRA adapter over it and a
LoRA reward model over the SFT folder, then runs the same PPO steps twice per repeat, alternating
`shared_base: true` (one frozen base carries policy, reference, reward and value adapters) and `false`
(policy, reference, reward and value each a model of their own), each in a fresh process. Prints the peak
resident memory (ru_maxrss) of each side, min/median/max over repeats, and the ratio; writes
bench/results/ppo_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "ppo_memory.json"


def build_folders(work: Path, n_embd: int, n_layer: int) -> tuple[Path, Path, Path, int]:
    """Base model, SFT adapter folder, reward adapter folder; returns them and the base's parameter count."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from instruct_tune.config import ModelArguments
    from instruct_tune.models import load_model, load_tokenizer
    from instruct_tune.models.reward_normalization import RewardNormalization
    from instruct_tune.tiny.build_model import train_tokenizer

    texts = (json.loads(line)["text"] for line in (REPO / "data/tiny/pretrain.jsonl").open())
    tokenizer = train_tokenizer(texts, 2048, 256, split_digits=False)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=256,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=8,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        activation_function="gelu_pytorch_tanh",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    base_model = GPT2LMHeadModel(config)
    base = work / "base"
    base_model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    n_params = sum(p.numel() for p in base_model.parameters())

    sft = work / "sft"
    sft_args = ModelArguments(model_name_or_path=str(base), use_peft=True, lora_r=16, lora_alpha=32)
    sft_tokenizer = load_tokenizer(sft_args)
    load_model(sft_args, sft_tokenizer).save_pretrained(sft)
    sft_tokenizer.save_pretrained(sft)

    reward = work / "reward"
    rm_args = ModelArguments(model_name_or_path=str(sft), use_peft=True, lora_r=16, lora_alpha=32)
    rm = load_model(rm_args, sft_tokenizer, head="reward")
    rm.peft_config["default"].base_model_name_or_path = str(sft)
    rm.save_pretrained(reward)
    sft_tokenizer.save_pretrained(reward)
    # An untrained head: raw scores are the rewards (the file also marks the reward folder finished).
    RewardNormalization(std=1.0, source="benchmark").write(reward)
    return base, sft, reward, n_params


def child(work: Path, shared: bool, episodes: int) -> None:
    """One PPO run in this process; prints its peak RSS and time as JSON."""
    from instruct_tune.config import DataArguments, ModelArguments, PPOStageConfig
    from instruct_tune.stages.ppo import run_ppo

    args = PPOStageConfig(
        output_dir=str(work / ("ppo-shared" if shared else "ppo-separate")),
        reward_model_path=str(work / "reward"),
        shared_base=shared,
        total_episodes=episodes,
        rollout_batch_size=16,
        num_mini_batches=2,
        ppo_epochs=2,
        max_new_tokens=24,
        eval_samples=0,
        sample_steps=0,
        save_steps=0,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    data_args = DataArguments(dataset_name=str(REPO / "data/tiny/prompts.jsonl"), eval_fraction=0.0)
    model_args = ModelArguments(model_name_or_path=str(work / "sft"), use_peft=True, lora_r=16, lora_alpha=32)
    start = time.perf_counter()
    out = run_ppo(args, data_args, model_args)
    elapsed = time.perf_counter() - start
    layout = json.loads((out / "metrics.json").read_text())["model_layout"]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"peak_rss_mb": peak_mb, "seconds": elapsed, "layout": layout}))


def measure(work: Path, shared: bool, episodes: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        __file__,
        "--child",
        "shared" if shared else "separate",
        "--work",
        str(work),
        "--episodes",
        str(episodes),
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"PPO run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-embd", type=int, default=512)
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=["shared", "separate"])
    parser.add_argument("--work")
    opts = parser.parse_args()
    if opts.child:
        child(Path(opts.work), opts.child == "shared", opts.episodes)
        return

    with tempfile.TemporaryDirectory(prefix="bench-ppo-memory-") as tmp:
        work = Path(tmp)
        *_, n_params = build_folders(work, opts.n_embd, opts.n_layer)
        runs: dict[str, list[dict]] = {"shared": [], "separate": []}
        for _ in range(opts.repeats):
            for side in ("shared", "separate"):  # alternate, so drift hits both sides alike
                runs[side].append(measure(work, side == "shared", opts.episodes))
                print(
                    f"{side:9s} peak RSS {runs[side][-1]['peak_rss_mb']:8.1f} MB  ({runs[side][-1]['layout']})"
                )

    def summary(side: str) -> dict:
        values = [r["peak_rss_mb"] for r in runs[side]]
        return {"min": min(values), "median": statistics.median(values), "max": max(values)}

    shared, separate = summary("shared"), summary("separate")
    ratio = shared["median"] / separate["median"]
    print(
        f"\nmodel: GPT-2 n_embd {opts.n_embd}, {opts.n_layer} layers, {n_params / 1e6:.1f}M parameters (fp32)"
    )
    print(f"{'':22s}{'min':>10s}{'median':>10s}{'max':>10s}")
    for name, s in (("shared base (ours)", shared), ("four models", separate)):
        print(f"{name:22s}{s['min']:10.1f}{s['median']:10.1f}{s['max']:10.1f}  MB peak RSS")
    print(f"ratio shared / four models: {ratio:.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "model_parameters": n_params,
                "peak_rss_mb_shared": shared,
                "peak_rss_mb_four_models": separate,
                "ratio_shared_to_four_models": ratio,
                "layouts": {side: runs[side][0]["layout"] for side in runs},
                "episodes": opts.episodes,
                "repeats": opts.repeats,
                "machine": f"{os.cpu_count()} CPU cores",
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
