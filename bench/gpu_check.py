"""The CUDA, bf16 and 4-bit paths on a GPU machine: the whole `make rlhf` chain plus QLoRA SFT and PPO.

    python bench/gpu_check.py [--smoke]          (needs `nvidia-smi`; `--smoke` runs a few steps of each, on CPU too)

Runs, timing each step and stopping at none of them: the tiny model's build; `make rlhf RUN=gpu` with the
tiny default (bf16 is on by default where CUDA supports it; the Makefile gives a GPU machine no CPU-thread
setting); SFT with a LoRA adapter on the 4-bit NF4 base (QLoRA); `instruct-tune merge` of that adapter; PPO
with LoRA adapters on a 4-bit shared base starting from the merged SFT model and the chain's reward model; `instruct-tune generate` from the PPO
policy; then PPO's rollout backends compared (`rollout_backends`: the same PPO run sampled by `generate` and
by a colocated vLLM engine, same model, settings and seed: episodes/s of each, their ratio, each policy's gold
win rate against SFT in one eval; skipped, saying why, without CUDA or the `vllm` package). Prints one line per
step and writes bench/results/gpu_check.json (the device, the versions, each
step's seconds and exit status, the eval table's figures, what each trained model ran on).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, write_result

RUN = REPO / "outputs" / "gpu"


def environment_report() -> dict:
    import torch

    report = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        report.update(device=torch.cuda.get_device_name(0), bf16_supported=torch.cuda.is_bf16_supported())
    for name in ("transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            report[name] = __import__(name).__version__
        except Exception as error:  # a missing package is a finding, not a crash
            report[name] = f"unavailable: {error}"
    return report


def shim_venv() -> Path:
    """A folder the Makefile can use as VENV: python, accelerate and instruct-tune of this interpreter."""
    venv = Path("/tmp/gpu-check-venv")
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    link = venv / "bin" / "python"
    link.unlink(missing_ok=True)
    link.symlink_to(sys.executable)
    for name, module in (("accelerate", "accelerate.commands.accelerate_cli"), ("instruct-tune", "instruct_tune.cli")):
        script = venv / "bin" / name
        script.unlink(missing_ok=True)  # never write through an old link
        script.write_text(f'#!/bin/sh\nexec {sys.executable} -m {module} "$@"\n')
        script.chmod(0o755)
    return venv


def smoke_configs() -> Path:
    """The tiny default's configs cut to a few steps (for trying this script without a GPU)."""
    import yaml

    folder = Path("/tmp/gpu-check-configs")
    folder.mkdir(exist_ok=True)
    cuts = {
        "sft": {"max_steps": 10, "max_eval_samples": 16},
        "reward": {"max_steps": 10, "normalization_samples": 16},
        "ppo": {"total_episodes": 64, "rollout_batch_size": 32, "eval_samples": 16},
        "eval": {"max_samples": 16, "ptx_eval_rows": 16},
    }
    for stage, cut in cuts.items():
        config = yaml.safe_load((REPO / "recipes/configs/tiny" / f"{stage}.yaml").read_text())
        (folder / f"{stage}.yaml").write_text(yaml.safe_dump({**config, **cut}))
    return folder


def step(name: str, command: list[str], log_dir: Path, timeout: int, env: dict) -> dict:
    start = time.perf_counter()
    with open(log_dir / f"{name}.log", "w") as log:
        # Own process group, so a timeout stops make's children too (they would run on into the next step).
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            rc = "timeout"
    seconds = round(time.perf_counter() - start, 1)
    tail = (log_dir / f"{name}.log").read_text().strip().splitlines()[-3:]
    print(f"[{name}] exit {rc} in {seconds} s | " + " || ".join(line[-200:] for line in tail), flush=True)
    return {"exit": rc, "seconds": seconds}


def trained_on(folder: Path) -> dict:
    """What a run folder's training says about its device and precision (from the files it wrote)."""
    found: dict = {}
    for name in ("metrics.json", "train_results.json", "all_results.json"):
        if (folder / name).is_file():
            found.update(json.loads((folder / name).read_text()))
    config = folder / "adapter_config.json"
    if config.is_file():
        found["adapter_base"] = json.loads(config.read_text()).get("base_model_name_or_path")
    return found


def vllm_skip_reason() -> str | None:
    """Why the rollout backends cannot be compared here (None: they can)."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is false)"
    if importlib.util.find_spec("vllm") is None:
        return "the vllm package is not installed (pip install 'instruct-tune[vllm]')"
    return None


def gold_win_rates(eval_metrics: dict) -> dict:
    """Every overall gold win rate against SFT in an eval's metrics.json, under its path of keys."""
    found: dict = {}

    def walk(value: object, path: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}/{key}" if path else str(key))
        elif path.rsplit("/", 1)[-1] == "win_rate_vs_sft_gold":
            found[path] = value

    walk(eval_metrics, "")
    return found


def rollout_backends(config: Path, smoke: bool, log_dir: Path, env: dict, steps: dict) -> dict:
    """PPO with `rollout_backend: hf` and `vllm` from the chain's SFT and reward models: speed and quality."""
    reason = vllm_skip_reason()
    if reason is None and not ((RUN / "sft").is_dir() and (RUN / "reward").is_dir()):
        reason = "the make_rlhf step left no SFT or reward model"
    if reason is not None:
        print(f"[rollout_backends] skipped: {reason}", flush=True)
        return {"skipped": reason}
    episodes = 64 if smoke else 2048
    result: dict = {"episodes": episodes}
    for backend in ("hf", "vllm"):
        name = f"ppo_rollout_{backend}"
        steps[name] = step(name, [
            sys.executable, "recipes/ppo.py", "--config", f"{config}/ppo.yaml", "--model_name_or_path", str(RUN / "sft"),
            "--reward_model_path", str(RUN / "reward"), "--output_dir", str(RUN / f"ppo-{backend}"),
            "--total_episodes", str(episodes), "--eval_samples", "64", "--save_steps", "0", "--seed", "42",
            "--rollout_backend", backend,
        ], log_dir, 600, env)  # fmt: skip
        metrics = trained_on(RUN / f"ppo-{backend}")
        runtime = metrics.get("train_runtime")
        result[backend] = {
            "exit": steps[name]["exit"],
            "train_runtime": runtime,
            "episodes_per_second": round(episodes / runtime, 2) if runtime else None,
        }
    # The trainer samples through the backend the factory builds: a log without the engine's line means
    # `rollout_backend` was not wired in and both runs sampled with generate.
    result["vllm"]["engine_used"] = "vLLM rollouts on cuda" in (log_dir / "ppo_rollout_vllm.log").read_text()
    hf_rate, vllm_rate = result["hf"]["episodes_per_second"], result["vllm"]["episodes_per_second"]
    result["speedup_vllm_over_hf"] = round(vllm_rate / hf_rate, 2) if hf_rate and vllm_rate else None
    steps["eval_rollout_backends"] = step("eval_rollout_backends", [
        sys.executable, "recipes/eval.py", "--config", f"{config}/eval.yaml", "--output_dir", str(RUN / "eval-backends"),
        "--sft_path", str(RUN / "sft"), "--policy_paths", str(RUN / "ppo-hf"), str(RUN / "ppo-vllm"),
        "--policy_names", "ppo_hf", "ppo_vllm", "--reward_model_path", str(RUN / "reward"),
    ], log_dir, 300, env)  # fmt: skip
    eval_metrics = RUN / "eval-backends" / "metrics.json"
    if eval_metrics.is_file():
        result["gold_win_rate_vs_sft"] = gold_win_rates(json.loads(eval_metrics.read_text()))
    print(f"[rollout_backends] {json.dumps(result)}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps of each stage")
    parser.add_argument("--log_dir", default=os.environ.get("OUT", "/tmp/gpu-check-logs"))
    args = parser.parse_args()
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(REPO / "src")]))
    report = {"environment": environment_report(), "steps": {}}
    print(json.dumps(report["environment"]), flush=True)
    venv = shim_venv()
    python = [sys.executable]
    config = smoke_configs() if args.smoke else REPO / "recipes/configs/tiny"
    cut = ["--max_steps", "10"] if args.smoke else ["--max_steps", "300"]
    steps = report["steps"]
    shutil.rmtree(RUN, ignore_errors=True)
    steps["build_tiny"] = step(
        "build_tiny", [str(venv / "bin/instruct-tune"), "build-tiny", "--data", "data/tiny", "--out", "models/tiny-gpt2"],
        log_dir, 300, env,
    )  # fmt: skip
    if shutil.which("make"):
        chain = ["make", "rlhf", f"VENV={venv}", "NO_INSTALL=1", "RUN=gpu", f"OUT={RUN}", f"CONFIG={config}"]
    else:  # the Makefile's four stage commands, for a machine without make
        chain = ["sh", "-c", " && ".join([
            f"{sys.executable} recipes/sft.py --config {config}/sft.yaml --output_dir {RUN}/sft",
            f"{sys.executable} recipes/reward.py --config {config}/reward.yaml --output_dir {RUN}/reward"
            f" --model_name_or_path {RUN}/sft --policy_path {RUN}/sft",
            f"{sys.executable} recipes/ppo.py --config {config}/ppo.yaml --model_name_or_path {RUN}/sft"
            f" --reward_model_path {RUN}/reward --output_dir {RUN}/ppo",
            f"{sys.executable} recipes/eval.py --config {config}/eval.yaml --output_dir {RUN}/eval --sft_path {RUN}/sft"
            f" --policy_paths {RUN}/ppo --reward_model_path {RUN}/reward",
        ])]  # fmt: skip
    steps["make_rlhf"] = step("make_rlhf", chain, log_dir, 420, env)
    steps["sft_qlora"] = step("sft_qlora", [
        *python, "recipes/sft.py", "--config", f"{config}/sft.yaml", "--output_dir", str(RUN / "sft-qlora"),
        "--use_peft", "true", "--load_in_4bit", "true", "--lora_r", "16", "--lora_alpha", "32", *cut,
        "--learning_rate", "2e-3", "--save_strategy", "no",
    ], log_dir, 90, env)  # fmt: skip
    steps["merge"] = step("merge", [
        str(venv / "bin/instruct-tune"), "merge", str(RUN / "sft-qlora"), "--output", str(RUN / "sft-qlora-merged"),
    ], log_dir, 60, env)  # fmt: skip
    steps["ppo_qlora"] = step("ppo_qlora", [
        *python, "recipes/ppo.py", "--config", f"{config}/ppo.yaml", "--model_name_or_path", str(RUN / "sft-qlora-merged"),
        "--reward_model_path", str(RUN / "reward"), "--output_dir", str(RUN / "ppo-qlora"),
        "--use_peft", "true", "--load_in_4bit", "true", "--total_episodes", "64" if args.smoke else "1024",
        "--eval_samples", "16", "--save_steps", "0",
    ], log_dir, 120, env)  # fmt: skip
    prompts = log_dir / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Add 12 and 30.", "Reverse: a b c"]))
    steps["generate"] = step("generate", [
        str(venv / "bin/instruct-tune"), "generate", str(RUN / "ppo"), "--input", str(prompts),
        "--output", str(log_dir / "generated.jsonl"),
    ], log_dir, 60, env)  # fmt: skip
    report["rollout_backends"] = rollout_backends(config, args.smoke, log_dir, env, steps)
    for stage in ("sft", "reward", "ppo", "sft-qlora", "ppo-qlora"):
        report[stage] = trained_on(RUN / stage)
    metrics = RUN / "eval" / "metrics.json"
    if metrics.is_file():
        report["eval"] = json.loads(metrics.read_text())
        shutil.copy(RUN / "eval" / "results.md", log_dir / "results.md")
    path = write_result("gpu_check", report)
    shutil.copy(path, log_dir / "gpu_check.json")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
