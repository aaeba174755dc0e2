"""The PPO stage over 2 CPU processes: DDP, FSDP2 and DeepSpeed ZeRO-3 launches of `recipes/ppo.py`, each
against DDP, and the refusal of a launch whose processes would each train alone. (A file of its own: the
launches take minutes, and test files run in parallel.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import DDP_CPU, accelerate_launch, launch_sharded
from stage_runs import lora_args, ppo_data, ppo_reward_run, write_ppo_config

from instruct_tune.config import ModelArguments
from instruct_tune.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return ppo_data(tmp_path_factory.mktemp("ppo-data"))


@pytest.fixture(scope="module")
def lora_reward(sft_folder: Path, data, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA reward model trained from the SFT run folder: it can share the policy's base."""
    return ppo_reward_run(tmp_path_factory.mktemp("rm-lora") / "reward", sft_folder, data, use_peft=True)


def test_accelerate_launch_two_processes(sft_folder: Path, lora_reward: Path, data, tmp_path: Path) -> None:
    out = tmp_path / "runs" / "ppo"
    config = write_ppo_config(
        tmp_path / "ppo.yaml",
        sft_folder,
        lora_reward,
        data,
        out,
        total_episodes=16,
        eval_dataset_name=str(data["eval"]),
        eval_samples=8,
    )
    accelerate_launch(DDP_CPU, "recipes/ppo.py", ["--config", str(config), "--use_cpu", "true"])
    assert [p.name for p in out.parent.iterdir()] == ["ppo"]
    state = json.loads((out / "trainer_state.json").read_text())
    steps = [e for e in state["log_history"] if "step" in e]
    assert [e["episodes"] for e in steps] == [8, 16]  # 2 ranks x 4 prompts per step
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_end_prompts"] == 8  # the 8 eval prompts were split over the ranks
    assert (out / "adapter_model.safetensors").is_file()


def test_a_multi_process_launch_on_cpu_without_use_cpu_is_refused(
    sft_folder: Path, lora_reward: Path, data, tmp_path: Path
) -> None:
    """Without `--use_cpu true` on a machine without a GPU, each PPO process would train alone and all would
    write the same run folder: refused before any model loads."""
    out = tmp_path / "runs" / "ppo"
    config = write_ppo_config(tmp_path / "ppo.yaml", sft_folder, lora_reward, data, out)
    output = accelerate_launch(
        DDP_CPU, "recipes/ppo.py", ["--config", str(config)], succeed=False, CUDA_VISIBLE_DEVICES=""
    )
    assert "2 processes were launched but each would train alone (this one sees 1)" in output
    assert "add `--use_cpu true`" in output
    assert not (out / "metrics.json").exists() and "Loading" not in output


def _step_log(run_dir: Path) -> list[dict]:
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return [e for e in state["log_history"] if "step" in e]


def _policy_logits(run_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    model = load_model(ModelArguments(model_name_or_path=str(run_dir)), load_tokenizer(lora_args(run_dir)))
    with torch.no_grad():
        return model(ids).logits


# PPO under FSDP2 against DDP, same seeds: the same samples (the gathered weights are the DDP model's, bit for
# bit), losses apart by the order of the gradient sums (reduce-scatter against all-reduce). Measured: the
# first step's figures equal, the third step's policy loss 2e-8 apart.
FSDP_PPO_TOLERANCE = {"rel": 1e-4, "abs": 1e-5}
PPO_STEP_KEYS = ("objective/scores", "objective/kl", "loss/policy", "loss/value", "response/length")


def _launch_sharded(engine: str, config: Path, output_dir: Path) -> str:
    """`recipes/ppo.py` on `config` over 2 CPU processes under `engine` (fsdp: FSDP2, fsdp_sharded: FSDP2 with
    checkpoints as the GPU config `recipes/accelerate/fsdp.yaml` writes them, zero3: DeepSpeed ZeRO-3)."""
    sharded = ["--fsdp_state_dict_type", "SHARDED_STATE_DICT"] if engine == "fsdp_sharded" else []
    args = ["--config", str(config), "--output_dir", str(output_dir)]
    return launch_sharded("zero3" if engine == "zero3" else "fsdp", "recipes/ppo.py", args, *sharded)


def _ddp_run(config: Path) -> tuple[Path, Path]:
    """`config` run under DDP over 2 CPU processes, beside it: the reference of the sharded runs."""
    run_dir = config.parent / "ddp" / "ppo"
    accelerate_launch(DDP_CPU, "recipes/ppo.py", ["--config", str(config), "--use_cpu", "true", "--output_dir", str(run_dir)])
    return config, run_dir


@pytest.fixture(scope="module")
def lora_ddp(sft_folder: Path, lora_reward: Path, data, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """3 steps of LoRA PPO on one shared base (a checkpoint each), under DDP: the config and the run folder."""
    config = write_ppo_config(
        tmp_path_factory.mktemp("ppo-lora") / "ppo.yaml", sft_folder, lora_reward, data, Path("unused"),
        total_episodes=24, eval_dataset_name=str(data["eval"]), eval_samples=8, save_steps=1,
    )  # fmt: skip
    return _ddp_run(config)


@pytest.fixture(scope="module")
def full_ddp(sft_folder: Path, lora_reward: Path, data, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """2 steps of PPO with four full models under DDP: the config and the run folder."""
    config = write_ppo_config(
        tmp_path_factory.mktemp("ppo-full") / "ppo.yaml", sft_folder, lora_reward, data, Path("unused"),
        use_peft=False, total_episodes=16, learning_rate=1.0e-4,
    )  # fmt: skip
    return _ddp_run(config)


def _sharded_and_ddp_runs(
    ddp: tuple[Path, Path], tmp_path: Path, engine: str
) -> tuple[dict[str, Path], list[str]]:
    """The DDP run's config under `engine` over 2 CPU processes; checks it agrees with the DDP run."""
    config, ddp_dir = ddp
    runs = {"ddp": ddp_dir, "fsdp": tmp_path / engine / "ppo"}
    _launch_sharded(engine, config, runs["fsdp"])
    for a, b in zip(_step_log(runs["ddp"]), _step_log(runs["fsdp"]), strict=True):
        print({k: (a[k], b[k]) for k in PPO_STEP_KEYS})
        for k in PPO_STEP_KEYS:
            assert b[k] == pytest.approx(a[k], **FSDP_PPO_TOLERANCE), (b["step"], k)
    files = {name: sorted(p.name for p in run.iterdir() if not p.name.startswith("checkpoint-")) for name, run in runs.items()}
    assert files["fsdp"] == files["ddp"]
    assert not any("fsdp" in f for f in files["fsdp"])
    ids = torch.tensor([[5, 17, 42, 8, 99, 3, 61]])
    torch.testing.assert_close(_policy_logits(runs["fsdp"], ids), _policy_logits(runs["ddp"], ids), rtol=1e-4, atol=1e-4)
    return runs, files["fsdp"]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp", "fsdp_sharded", "zero3"])
def test_sharded_ppo_trains_as_ddp_and_resumes(engine: str, lora_ddp: tuple[Path, Path], tmp_path: Path) -> None:
    """PPO with LoRA on one shared base under FSDP2 (`recipes/accelerate/fsdp_cpu.yaml`) or DeepSpeed ZeRO-3
    (`recipes/accelerate/zero3_cpu.yaml`), 2 CPU processes, against the same run under DDP: the same rollouts
    and losses, a run folder of the same files whose policy gives the same logits; a rerun resumes from a
    sharded run's checkpoint and ends where the uninterrupted run did. A hang fails the test."""
    config = lora_ddp[0]
    runs, files = _sharded_and_ddp_runs(lora_ddp, tmp_path, engine)
    assert "adapter_model.safetensors" in files
    sharded = _step_log(runs["fsdp"])
    assert [e["episodes"] for e in sharded] == [8, 16, 24]

    for later in ("checkpoint-2", "checkpoint-3"):  # as if killed after the first step's checkpoint
        shutil.rmtree(runs["fsdp"] / later)
    (runs["fsdp"] / "metrics.json").unlink()
    output = _launch_sharded(engine, config, runs["fsdp"])
    assert f"Resumed PPO from {runs['fsdp'] / 'checkpoint-1'} at step 1" in output
    resumed = _step_log(runs["fsdp"])
    assert resumed[0] == sharded[0]
    for a, b in zip(sharded[1:], resumed[1:], strict=True):
        for k in PPO_STEP_KEYS:
            assert b[k] == pytest.approx(a[k], **FSDP_PPO_TOLERANCE), (b["step"], k)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_sharded_ppo_trains_full_models_as_ddp(engine: str, full_ddp: tuple[Path, Path], tmp_path: Path) -> None:
    """Full fine-tuning (four models: the policy and value sharded, reference and reward frozen copies) under
    FSDP2 or ZeRO-3 as under DDP; the run folder holds the whole policy, its tied weights saved once."""
    runs, files = _sharded_and_ddp_runs(full_ddp, tmp_path, engine)
    assert "model.safetensors" in files and "adapter_model.safetensors" not in files
    metrics = json.loads((runs["fsdp"] / "metrics.json").read_text())
    assert metrics["model_layout"] == "four models: policy, reference, reward, value"
