"""`make rlhf` end to end on a smaller tiny setting: sft -> reward -> ppo + ppo-ptx -> eval, through the Makefile.

One chain, four runs of make: a broken PPO config stops the chain at the ppo stage, naming it, with the SFT
and reward folders finished and untouched; the fixed config continues from there (SFT and reward skipped)
and prints the table; a third run redoes nothing; FORCE=1 redoes a finished stage. The metrics file's keys and
value ranges are checked.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, TINY_DATA, head_of

pytestmark = pytest.mark.slow


def write_configs(folder: Path, data: Path, tiny_model_dir: Path, sft_file: Path, *, mini_batches: int) -> None:
    """The four stage configs of the tiny default, cut down to a few seconds of training each."""
    common = {"report_to": "none", "use_cpu": True, "disable_tqdm": True, "seed": 0}
    configs = {
        "sft": {
            "model_name_or_path": str(tiny_model_dir),
            "dataset_name": str(sft_file),
            "use_peft": False,
            "num_train_epochs": 1,
            "per_device_train_batch_size": 32,
            "learning_rate": 3e-3,
            "max_length": 128,
            "packing": False,
            "eval_strategy": "no",
            "save_strategy": "no",
            "logging_steps": 5,
            **common,
        },
        "reward": {
            "dataset_name": str(head_of(TINY_DATA / "comparisons.jsonl", data / "comparisons.jsonl", 48)),
            "eval_dataset_name": str(head_of(TINY_DATA / "comparisons_eval.jsonl", data / "cmp_eval.jsonl", 16)),
            "use_peft": False,
            "num_train_epochs": 1,
            "per_device_train_batch_size": 8,
            "learning_rate": 3e-3,
            "max_length": 128,
            "eval_strategy": "no",
            "save_strategy": "no",
            "normalization_samples": 32,
            "normalization_max_new_tokens": 12,
            **common,
        },
        "ppo": {
            "dataset_name": str(head_of(TINY_DATA / "prompts.jsonl", data / "prompts.jsonl", 64)),
            "use_peft": False,
            "total_episodes": 32,
            "rollout_batch_size": 16,
            "num_mini_batches": mini_batches,
            "ppo_epochs": 2,
            "max_new_tokens": 12,
            "learning_rate": 1e-3,
            "scale_scores": True,
            "eval_samples": 0,
            "logging_steps": 1,
            "save_steps": 0,
            "ptx_dataset": str(head_of(TINY_DATA / "pretrain.jsonl", data / "pretrain.jsonl", 80)),
            "ptx_heldout_rows": 20,
            "ptx_batch_size": 4,
            **common,
        },
        "eval": {
            "dataset_name": str(head_of(TINY_DATA / "heldout_prompts.jsonl", data / "heldout.jsonl", 24)),
            "ptx_eval_dataset": str(data / "pretrain.jsonl"),
            "ptx_eval_rows": 20,
            "max_new_tokens": 12,
            "batch_size": 24,
            "seed": 0,
        },
    }
    for name, values in configs.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(values))


def make(target: str, config: Path, out: Path, **variables: str) -> subprocess.CompletedProcess:
    venv = Path(sys.prefix)
    args = [f"VENV={venv}", "NO_INSTALL=1", f"CONFIG={config}", f"OUT={out}"]
    args += [f"{key}={value}" for key, value in variables.items()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        ["make", "--no-print-directory", target, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def stages_run(result: subprocess.CompletedProcess) -> list[str]:
    return [line.split()[2] for line in result.stdout.splitlines() if line.startswith("==> stage ")]


def test_make_rlhf_chain_stops_names_the_stage_continues_and_skips(
    tiny_model_dir: Path, tiny_sft_file: Path, tmp_path: Path
) -> None:
    config, data, out = tmp_path / "config", tmp_path / "data", tmp_path / "run"
    config.mkdir()
    data.mkdir()
    # 16 rollouts do not split into 3 minibatches: the ppo stage fails on its config.
    write_configs(config, data, tiny_model_dir, tiny_sft_file, mini_batches=3)

    broken = make("rlhf", config, out, PTX="1")
    assert broken.returncode != 0
    assert stages_run(broken) == ["sft", "reward", "ppo"]
    assert "make: stage 'ppo' failed" in broken.stderr
    assert "rollout_batch_size 16 must divide into num_mini_batches 3" in broken.stderr
    finished = [out / "sft" / "metrics.json", out / "reward" / "reward_normalization.json"]
    assert all(path.is_file() for path in finished)
    assert not (out / "ppo" / "metrics.json").exists() and not (out / "eval").exists()
    before = {path: path.stat().st_mtime_ns for path in finished}

    write_configs(config, data, tiny_model_dir, tiny_sft_file, mini_batches=2)
    fixed = make("rlhf", config, out, PTX="1")
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert stages_run(fixed) == ["ppo", "ppo-ptx", "eval"]  # the finished SFT and reward folders are kept
    assert {path: path.stat().st_mtime_ns for path in finished} == before
    table = (out / "eval" / "results.md").read_text()
    assert table.strip() and table.strip() in fixed.stdout  # the chain ends by printing the table
    assert "| ppo |" in table and "| ppo-ptx |" in table

    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    for key in ("win_rate_vs_sft_gold", "win_rate_vs_sft_rm", "ppo-ptx/win_rate_vs_sft_gold"):
        assert 0.0 <= metrics[key] <= 1.0, key
    for key in ("mean_reward_sft", "mean_reward_ppo", "kl_ppo_vs_sft", "ppo-ptx/kl_vs_sft"):
        assert math.isfinite(metrics[key]), key
    # KL of 32 episodes of PPO from its start: a positive average of sampled log-ratios, and small.
    assert -0.05 < metrics["kl_ppo_vs_sft"] < 20
    assert metrics["eval_prompts"] == 24 and metrics["gold_judge"] is True
    ppo_log = json.loads((out / "ppo-ptx" / "trainer_state.json").read_text())["log_history"]
    assert any("loss/ptx" in entry for entry in ppo_log)  # PTX=1 trained with the pretraining loss

    again = make("rlhf", config, out, PTX="1")
    assert again.returncode == 0 and stages_run(again) == []
    assert table.strip() in again.stdout

    # FORCE=1 redoes the stage asked for (here only SFT), keeping the previous folder beside it.
    old_sft = (out / "sft" / "model.safetensors").read_bytes()
    forced = make("sft", config, out, FORCE="1", SEED="1")
    assert forced.returncode == 0 and stages_run(forced) == ["sft"]
    assert (out / "sft.previous" / "model.safetensors").read_bytes() == old_sft
    assert (out / "sft" / "model.safetensors").read_bytes() != old_sft  # another seed, another model


def test_make_methods_chain_runs_each_method_from_one_sft_start_and_evaluates_all(tmp_path: Path) -> None:
    """`make rlhf METHODS=...` (dry run): each method's stage from the same SFT folder, then one eval of all."""
    config, out = tmp_path / "config", tmp_path / "out"
    plan = make("rlhf", config, out, METHODS="ppo dpo grpo rloo-gold", FORCE="1", SEED="3", MAKEFLAGS="-n")
    assert plan.returncode == 0, plan.stderr[-2000:]
    planned = [line.split()[3] for line in plan.stdout.splitlines() if line.startswith('echo "==> stage ')]
    assert planned == ["sft", "reward", "ppo", "dpo", "grpo", "rloo-gold", "eval"]
    recipes = (re.search(r" recipes/(\w+)\.py --config", line) for line in plan.stdout.splitlines())
    commands = {found.group(1): found.string for found in recipes if found}
    assert f"--config {config}/dpo.yaml --model_name_or_path {out}/sft --seed 3" in commands["dpo"]
    assert f"--model_name_or_path {out}/sft" in commands["grpo"]
    assert f"--reward_model_path {out}/reward --output_dir {out}/grpo" in commands["grpo"]
    assert f"--reward tiny_gold --output_dir {out}/rloo-gold" in commands["rloo"]
    policies = f"--policy_paths {out}/ppo {out}/dpo {out}/grpo {out}/rloo-gold "
    assert policies in commands["eval"]

    wrong = make("rlhf", config, out, METHODS="ppo kto")
    assert wrong.returncode != 0
    assert "METHODS: unknown method(s) 'kto'; choose from: ppo dpo grpo rloo grpo-gold rloo-gold" in wrong.stderr
