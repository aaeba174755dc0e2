"""FSDP2 and DeepSpeed ZeRO-3 for the Trainer-based stages (SFT, reward model, DPO) over 2 CPU processes (gloo), as the docs
say: `accelerate launch --config_file recipes/accelerate/fsdp_cpu.yaml recipes/<stage>.py --config ... --use_cpu true`.

Each test trains a few steps under FSDP2 and the same config in one process, then checks that
- the launch ends (rc 0) within a timeout: a hung collective fails the test, its processes killed;
- the run folder holds exactly the files of the single-process one (full `model.safetensors` or the adapter,
  no `pytorch_model_fsdp*` shards) and loads in one process with instruct_tune's loader, giving finite outputs;
- the logged training losses equal the single-process run's (`FIRST_LOSS_TOLERANCE`, `LATER_LOSS_TOLERANCE`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY_DATA, head_of, launch_sharded
from safetensors import safe_open

from instruct_tune.config import DataArguments, ModelArguments, RewardStageConfig, SFTStageConfig, parse_args
from instruct_tune.config.dpo import DPOStageConfig
from instruct_tune.models import load_model, load_tokenizer
from instruct_tune.models.reward import load_reward_model
from instruct_tune.stages.dpo import run_dpo
from instruct_tune.stages.reward import run_reward
from instruct_tune.stages.run_folder import RunFolderArguments
from instruct_tune.stages.sft import run_sft

LAUNCH_TIMEOUT = 300  # seconds; one launch takes 30-60 s on 2 cores

# The global batch is equal: 4 rows on each of the 2 processes against 8 rows in one. The seeded sampler gives
# both runs the same 8 rows at each step (rank 0 the first 4, rank 1 the next 4), and each stage's loss is a
# mean over the global batch (SFT: over its completion tokens; reward: over its prompts; DPO: over its pairs).
PER_DEVICE, PROCESSES, STEPS = 4, 2, 3
# Float32 throughout; what differs is the order of the sums (two half-batch sums and a gloo reduction against
# one sum) in the forward and in the reduce-scattered gradients. Measured (`docs/stages.md`, "Multi-process"):
# the first loss (before any update) within 5e-7 of the single process's; the later ones within 5e-5 relative
# (LoRA, whose Adam steps g/sqrt(v) enlarge rounding in small gradients; full fine-tuning within 1e-7). A
# process that trained alone on its half of the batch logs a first SFT loss 0.18 away (5.163 against 5.345).
FIRST_LOSS_TOLERANCE = 1e-5  # absolute
LATER_LOSS_TOLERANCE = 5e-4  # relative

COMMON = {
    "max_steps": STEPS,
    "learning_rate": 1.0e-3,
    "max_length": 128,
    "gradient_checkpointing": False,
    "logging_steps": 1,
    "eval_strategy": "no",
    "save_strategy": "no",
    "report_to": "none",
    "disable_tqdm": True,
    "seed": 0,
}


@pytest.fixture(scope="module")
def rankings(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """24 training rankings (K=4; 3 steps of 8 prompts, 144 DPO pairs) and 8 eval rankings of the tiny task."""
    folder = tmp_path_factory.mktemp("fsdp-rankings")
    return (
        head_of(TINY_DATA / "comparisons.jsonl", folder / "train.jsonl", 24),
        head_of(TINY_DATA / "comparisons_eval.jsonl", folder / "eval.jsonl", 8),
    )


def write_config(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump({**COMMON, **values}))
    return path


def launch(engine: str, recipe: str, config: Path, output_dir: Path, *launch_options: str) -> str:
    """`recipe` on `config` over 2 CPU processes under `engine` (fsdp or zero3) with `PER_DEVICE` rows each."""
    args = ["--config", str(config), "--output_dir", str(output_dir), "--per_device_train_batch_size", str(PER_DEVICE)]
    return launch_sharded(engine, recipe, args, *launch_options, timeout=LAUNCH_TIMEOUT)


def single_process(types: tuple[type, ...], config: Path, output_dir: Path) -> tuple:
    """The same config's options for one process, with the global batch in it."""
    flags = ["--config", str(config), "--output_dir", str(output_dir), "--use_cpu", "true"]
    flags += ["--per_device_train_batch_size", str(PER_DEVICE * PROCESSES)]
    return parse_args(*types, RunFolderArguments, args=flags)


def losses(run_dir: Path) -> list[float]:
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def assert_same_run(fsdp_dir: Path, single_dir: Path, weights: str) -> None:
    """Same files as the single-process folder (weights gathered whole), same global steps, same losses."""
    names = sorted(p.name for p in fsdp_dir.iterdir())
    assert names == sorted(p.name for p in single_dir.iterdir())
    shards = ("pytorch_model_fsdp", "global_step", "latest", "zero_to_fp32")  # FSDP's and DeepSpeed's
    assert weights in names and not [n for n in names if n.startswith(shards)]
    with (
        safe_open(fsdp_dir / weights, "pt") as fsdp_file,
        safe_open(single_dir / weights, "pt") as single_file,
    ):
        assert sorted(fsdp_file.keys()) == sorted(
            single_file.keys()
        )  # tied weights stored once, as in one process
    assert json.loads((fsdp_dir / "trainer_state.json").read_text())["global_step"] == STEPS
    fsdp_losses, single_losses = losses(fsdp_dir), losses(single_dir)
    assert len(fsdp_losses) == len(single_losses) == STEPS
    print(f"{fsdp_dir.name}: sharded losses {fsdp_losses}, one process {single_losses}")  # the figures docs cite
    assert fsdp_losses[0] == pytest.approx(single_losses[0], abs=FIRST_LOSS_TOLERANCE)
    assert fsdp_losses[1:] == pytest.approx(single_losses[1:], rel=LATER_LOSS_TOLERANCE)


def causal_logits(folder: Path) -> torch.Tensor:
    model_args = ModelArguments(model_name_or_path=str(folder))
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, tokenizer).eval()
    ids = tokenizer("Sort these numbers in ascending order: 3, 1, 2", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_trained_policy_like_one_process(
    fsdp_dir: Path, single_dir: Path, use_peft: bool, start: Path
) -> None:
    """A causal-LM stage's FSDP folder: the single-process run's layout and losses, and it loads in one process
    with finite logits that differ from the start's (the trained weights were saved)."""
    assert_same_run(fsdp_dir, single_dir, "adapter_model.safetensors" if use_peft else "model.safetensors")
    logits = causal_logits(fsdp_dir)
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits, causal_logits(start))


@pytest.mark.slow
@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_sft_sharded(tiny_model_dir: Path, tiny_sft_file: Path, tmp_path: Path, engine: str, use_peft: bool) -> None:
    """SFT under FSDP2 (`fsdp_cpu.yaml`) and under DeepSpeed ZeRO-3 (`zero3_cpu.yaml`), as one process does."""
    values = {
        "model_name_or_path": str(tiny_model_dir),
        "use_peft": use_peft,
        "lora_r": 8,
        "lora_alpha": 16,
        "dataset_name": str(tiny_sft_file),
        "eval_fraction": 0.0,
        "max_train_samples": STEPS * PER_DEVICE * PROCESSES,
        "packing": False,
    }
    config = write_config(tmp_path / "sft.yaml", values)
    sharded_dir, single_dir = tmp_path / engine / "sft", tmp_path / "single" / "sft"
    launch(engine, "recipes/sft.py", config, sharded_dir)
    run_sft(*single_process((SFTStageConfig, DataArguments, ModelArguments), config, single_dir))

    assert_trained_policy_like_one_process(sharded_dir, single_dir, use_peft, tiny_model_dir)


@pytest.mark.slow
def test_sft_resumes_from_sharded_fsdp2_checkpoints(
    tiny_model_dir: Path, tiny_sft_file: Path, tmp_path: Path
) -> None:
    """SHARDED_STATE_DICT checkpoints (`pytorch_model_fsdp_0/`, as `recipes/accelerate/fsdp.yaml` writes them)
    count as complete: a rerun resumes from one and trains the step after it as the uninterrupted run did."""
    values = {
        "model_name_or_path": str(tiny_model_dir),
        "use_peft": False,
        "dataset_name": str(tiny_sft_file),
        "eval_fraction": 0.0,
        "max_train_samples": STEPS * PER_DEVICE * PROCESSES,
        "packing": False,
        "save_strategy": "steps",
        "save_steps": 2,
    }
    config = write_config(tmp_path / "sft.yaml", values)
    run_dir = tmp_path / "fsdp" / "sft"
    sharded = ("--fsdp_state_dict_type", "SHARDED_STATE_DICT")
    launch("fsdp", "recipes/sft.py", config, run_dir, *sharded)
    uninterrupted = losses(run_dir)
    assert (run_dir / "checkpoint-2" / "pytorch_model_fsdp_0" / ".metadata").is_file()
    for later in [p for p in run_dir.glob("checkpoint-*") if int(p.name.split("-")[1]) > 2]:
        shutil.rmtree(later)  # as if killed after checkpoint-2

    output = launch("fsdp", "recipes/sft.py", config, run_dir, *sharded)
    assert f"Resuming from {run_dir / 'checkpoint-2'}" in output
    resumed = losses(run_dir)
    print(f"resumed: losses {resumed}, uninterrupted {uninterrupted}")
    assert resumed[:2] == uninterrupted[:2]  # steps 1-2 come from the checkpoint's state
    assert resumed[2] == pytest.approx(uninterrupted[2], rel=LATER_LOSS_TOLERANCE)
    assert (run_dir / "model.safetensors").is_file()


@pytest.mark.slow
def test_reward_under_fsdp2_as_the_gpu_config(tiny_model_dir: Path, rankings, tmp_path: Path) -> None:
    """With the FSDP options of the GPU config (`recipes/accelerate/fsdp.yaml`): SHARDED_STATE_DICT (the folder
    still gets full weights) and `cpu_ram_efficient_loading` (rank 0 loads the weights, FSDP sends them to the
    others). The scoring after training (eval comparisons, normalisation), a forward on every rank, ends."""
    values = {
        "model_name_or_path": str(tiny_model_dir),
        "use_peft": False,
        "dataset_name": str(rankings[0]),
        "eval_dataset_name": str(rankings[1]),
    }
    config = write_config(tmp_path / "reward.yaml", values)
    fsdp_dir, single_dir = tmp_path / "fsdp" / "reward", tmp_path / "single" / "reward"
    gpu_options = ("--fsdp_state_dict_type", "SHARDED_STATE_DICT", "--fsdp_cpu_ram_efficient_loading", "true")
    launch("fsdp", "recipes/reward.py", config, fsdp_dir, *gpu_options)
    run_reward(*single_process((RewardStageConfig, DataArguments, ModelArguments), config, single_dir))

    assert_same_run(fsdp_dir, single_dir, "model.safetensors")
    fsdp_metrics = json.loads((fsdp_dir / "metrics.json").read_text())
    single_metrics = json.loads((single_dir / "metrics.json").read_text())
    assert fsdp_metrics["eval_comparisons"] == single_metrics["eval_comparisons"] == 8 * 6
    rm = load_reward_model(fsdp_dir, device="cpu")
    scores = rm.score(["Add 2 and 3."], ["5"])
    assert scores.shape == (1,) and torch.isfinite(scores).all()


@pytest.mark.slow
@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "lora"])
def test_dpo_under_fsdp2(tiny_model_dir: Path, rankings, tmp_path: Path, use_peft: bool) -> None:
    """Full fine-tuning: the frozen reference copy is sharded too (TRL's `prepare_fsdp`); LoRA: TRL wraps the
    policy, the reference is the adapter disabled."""
    values = {
        "model_name_or_path": str(tiny_model_dir),
        "use_peft": use_peft,
        "lora_r": 8,
        "lora_alpha": 16,
        "dataset_name": str(rankings[0]),
        "eval_fraction": 0.0,
        "max_train_samples": 4,  # 4 K=4 rankings: 24 pairs, 3 steps of 8
    }
    config = write_config(tmp_path / "dpo.yaml", values)
    fsdp_dir, single_dir = tmp_path / "fsdp" / "dpo", tmp_path / "single" / "dpo"
    launch("fsdp", "recipes/dpo.py", config, fsdp_dir)
    run_dpo(*single_process((DPOStageConfig, DataArguments, ModelArguments), config, single_dir))

    assert_trained_policy_like_one_process(fsdp_dir, single_dir, use_peft, tiny_model_dir)


# --- DeepSpeed ZeRO-3 (recipes/accelerate/zero3_cpu.yaml) ---------------------------------------------------


@pytest.mark.slow
def test_reward_under_zero3(tiny_model_dir: Path, rankings, tmp_path: Path) -> None:
    """The new head's initialisation reaches the partitioned weights (lost before: the first loss was 0.6939
    against one process's 0.6982); the scoring after training runs on every rank and ends."""
    values = {
        "model_name_or_path": str(tiny_model_dir),
        "use_peft": False,
        "dataset_name": str(rankings[0]),
        "eval_dataset_name": str(rankings[1]),

    }
    config = write_config(tmp_path / "reward.yaml", values)
    zero3_dir, single_dir = tmp_path / "zero3" / "reward", tmp_path / "single" / "reward"
    launch("zero3", "recipes/reward.py", config, zero3_dir)
    run_reward(*single_process((RewardStageConfig, DataArguments, ModelArguments), config, single_dir))

    assert_same_run(zero3_dir, single_dir, "model.safetensors")
    assert json.loads((zero3_dir / "metrics.json").read_text())["eval_comparisons"] == 8 * 6
    scores = load_reward_model(zero3_dir, device="cpu").score(["Add 2 and 3."], ["5"])
    assert scores.shape == (1,) and torch.isfinite(scores).all()


@pytest.mark.slow
def test_dpo_under_zero3(tiny_model_dir: Path, rankings, tmp_path: Path) -> None:
    """Full fine-tuning: the frozen reference copy is partitioned too (TRL prepares it with DeepSpeed)."""
    values = {
        "model_name_or_path": str(tiny_model_dir),
        "use_peft": False,
        "dataset_name": str(rankings[0]),
        "eval_fraction": 0.0,
        "max_train_samples": 4,  # 4 K=4 rankings: 24 pairs, 3 steps of 8
    }
    config = write_config(tmp_path / "dpo.yaml", values)
    zero3_dir, single_dir = tmp_path / "zero3" / "dpo", tmp_path / "single" / "dpo"
    launch("zero3", "recipes/dpo.py", config, zero3_dir)
    run_dpo(*single_process((DPOStageConfig, DataArguments, ModelArguments), config, single_dir))

    assert_trained_policy_like_one_process(zero3_dir, single_dir, False, tiny_model_dir)
