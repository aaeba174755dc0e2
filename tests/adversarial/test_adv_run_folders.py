"""Run-folder integrity (issue 19, items 1, 4, 5, 6, 7, 12): what a rerun may resume, who may write a folder,
which checkpoints count, what a checkpoint may hold, and which file make reads as "finished".

Every stage runs for real on the session's tiny model, cut to a couple of steps. New APIs are imported inside
the tests, so each test fails on its own on a tree without them.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import REPO, TINY_DATA, head_of

from instruct_tune.config import (
    DataArguments,
    ModelArguments,
    PPOStageConfig,
    RewardStageConfig,
    SFTStageConfig,
)
from instruct_tune.stages.ppo import run_ppo
from instruct_tune.stages.reward import run_reward
from instruct_tune.stages.sft import run_sft

COMMON = dict(report_to=[], use_cpu=True, seed=0, disable_tqdm=True)


def sane_ppo() -> dict:
    """PPO's policy-sanity bounds off where this tree has them: two steps of a tiny model say nothing."""
    names = {f.name for f in dataclasses.fields(PPOStageConfig)}
    return {k: None for k in ("max_kl", "min_eos_share") if k in names}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("rf-data")
    return {
        "sft": head_of(TINY_DATA / "sft.jsonl", folder / "sft.jsonl", 64),
        "prompts": head_of(TINY_DATA / "prompts.jsonl", folder / "prompts.jsonl", 32),
        "comparisons": head_of(TINY_DATA / "comparisons.jsonl", folder / "comparisons.jsonl", 16),
    }


def sft(out: Path, model: Path, data: dict, run_options=None, **overrides) -> Path:
    values = dict(
        output_dir=str(out), max_steps=2, per_device_train_batch_size=8, learning_rate=3e-3, logging_steps=1,
        eval_strategy="no", save_strategy="steps", save_steps=1, max_length=128, packing=False,
        gradient_checkpointing=False, **COMMON,
    )  # fmt: skip
    values.update(overrides)
    args = SFTStageConfig(**values)
    data_args = DataArguments(dataset_name=str(data["sft"]), eval_fraction=0.0)
    model_args = ModelArguments(model_name_or_path=str(model))
    extra = (run_options,) if run_options is not None else ()
    return run_sft(args, data_args, model_args, *extra)


def reward(out: Path, sft_dir: Path, data: dict, run_options=None, **overrides) -> Path:
    values = dict(
        output_dir=str(out), max_steps=2, per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=1,
        eval_strategy="no", save_strategy="steps", save_steps=1, max_length=128, gradient_checkpointing=False,
        policy_path=str(sft_dir), normalization_prompts=str(data["prompts"]), normalization_samples=8,
        normalization_max_new_tokens=8, **COMMON,
    )  # fmt: skip
    values.update(overrides)
    args = RewardStageConfig(**values)
    data_args = DataArguments(dataset_name=str(data["comparisons"]), eval_fraction=0.0)
    extra = (run_options,) if run_options is not None else ()
    return run_reward(args, data_args, ModelArguments(model_name_or_path=str(sft_dir)), *extra)


def ppo(out: Path, sft_dir: Path, reward_dir: Path, data: dict, run_options=None, **overrides) -> Path:
    values = dict(
        output_dir=str(out), reward_model_path=str(reward_dir), total_episodes=8, rollout_batch_size=4,
        num_mini_batches=1, ppo_epochs=1, max_new_tokens=8, learning_rate=1e-3, eval_samples=0, save_steps=1,
        logging_steps=1, sample_steps=1, num_samples_logged=2, **sane_ppo(), **COMMON,
    )  # fmt: skip
    values.update(overrides)
    args = PPOStageConfig(**values)
    data_args = DataArguments(dataset_name=str(data["prompts"]), eval_fraction=0.0)
    extra = (run_options,) if run_options is not None else ()
    return run_ppo(args, data_args, ModelArguments(model_name_or_path=str(sft_dir)), *extra)


def overwrite():
    from instruct_tune.stages.run_folder import RunFolderArguments

    return RunFolderArguments(overwrite_output_dir=True)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def logged_steps(folder: Path) -> list[int]:
    state = json.loads((folder / "trainer_state.json").read_text())
    return [e["step"] for e in state["log_history"] if "loss" in e or "objective/kl" in e]


@pytest.fixture(scope="module")
def chain(tiny_model_dir: Path, data, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SFT -> reward -> PPO, each with checkpoints, in one run folder tree."""
    root = tmp_path_factory.mktemp("chain")
    s = sft(root / "sft", tiny_model_dir, data)
    r = reward(root / "reward", s, data)
    p = ppo(root / "ppo", s, r, data)
    return {"root": root, "sft": s, "reward": r, "ppo": p}


# --- item 1: a checkpoint belongs to one set of inputs ---------------------------------------------------


@pytest.mark.parametrize("change", ["seed", "data_file"])
def test_item1_rerun_with_other_inputs_is_refused_naming_what_differs(
    change: str, tiny_model_dir: Path, data, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    own = {**data, "sft": Path(shutil.copy(data["sft"], tmp_path / "sft.jsonl"))}
    out = sft(tmp_path / "sft", tiny_model_dir, own)
    before = snapshot(out)
    overrides = {}
    if change == "seed":
        overrides["seed"] = 1
    else:  # the same path, other rows
        lines = own["sft"].read_text().splitlines(keepends=True)
        own["sft"].write_text("".join(lines[8:]))
    caplog.set_level(logging.INFO)
    with pytest.raises(Exception, match="made from other inputs") as error:
        sft(out, tiny_model_dir, own, **overrides)
    message = str(error.value)
    assert str(out) in message and "--overwrite_output_dir" in message
    assert ("seed 0 -> 1" in message) if change == "seed" else ("dataset_name" in message and "content changed" in message)
    assert "Resuming" not in caplog.text
    assert snapshot(out) == before  # nothing was touched


def test_item1_redone_upstream_stops_reward_and_ppo_until_started_fresh(
    tiny_model_dir: Path, data, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SFT redone with another seed (its folder removed first): reward and PPO do not continue old runs."""
    root = tmp_path
    chain = {"sft": sft(root / "sft", tiny_model_dir, data)}
    chain["reward"] = reward(root / "reward", chain["sft"], data)
    chain["ppo"] = ppo(root / "ppo", chain["sft"], chain["reward"], data)
    old_reward, old_ppo = snapshot(chain["reward"]), snapshot(chain["ppo"])
    shutil.rmtree(chain["sft"])
    s = sft(root / "sft", tiny_model_dir, data, seed=1)
    caplog.set_level(logging.INFO)
    with pytest.raises(Exception, match="made from other inputs") as error:
        reward(root / "reward", s, data)
    assert str(root / "reward") in str(error.value) and "model_name_or_path" in str(error.value)
    assert "another sft run" in str(error.value)
    assert snapshot(chain["reward"]) == old_reward

    caplog.clear()
    r = reward(root / "reward", s, data, run_options=overwrite())  # started fresh: all steps trained again
    assert "Resuming" not in caplog.text
    assert logged_steps(r) == [1, 2]
    fingerprint = json.loads((r / "run_fingerprint.json").read_text())
    sft_run = json.loads((s / "run_fingerprint.json").read_text())["run_id"]
    assert fingerprint["inputs"]["model_name_or_path"]["run_id"] == sft_run

    with pytest.raises(Exception, match="made from other inputs") as error:
        ppo(root / "ppo", s, r, data)
    assert "reward_model_path" in str(error.value) and "model_name_or_path" in str(error.value)
    assert "Resumed PPO" not in caplog.text
    assert snapshot(chain["ppo"]) == old_ppo


# --- item 4: only complete checkpoints are resumed from; a full disk is named --------------------------


def test_item4_sft_disk_full_is_named_and_the_partial_checkpoint_skipped(
    tiny_model_dir: Path, data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers.trainer_callback import TrainerState

    out = tmp_path / "sft"
    original = TrainerState.save_to_json

    def full_disk(self, path: str) -> None:
        if "checkpoint-4" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        original(self, path)

    monkeypatch.setattr(TrainerState, "save_to_json", full_disk)
    with pytest.raises(OSError) as error:
        sft(out, tiny_model_dir, data, max_steps=4, save_steps=2)
    assert "disk is full" in str(error.value) and "ENOSPC" in str(error.value) and str(out) in str(error.value)
    monkeypatch.undo()
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-4" / "trainer_state.json").exists()
    # and a newer one whose weights were cut short
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-6")
    weights = out / "checkpoint-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])

    caplog.set_level(logging.INFO)
    sft(out, tiny_model_dir, data, max_steps=4, save_steps=2)
    assert f"incomplete checkpoint {out / 'checkpoint-6'}" in caplog.text
    assert f"incomplete checkpoint {out / 'checkpoint-4'} (no trainer_state.json)" in caplog.text
    assert f"Resuming from {out / 'checkpoint-2'}" in caplog.text
    assert logged_steps(out) == [1, 2, 3, 4] and (out / "metrics.json").is_file()


def test_item4_ppo_disk_full_mid_checkpoint_leaves_no_partial_and_resumes(
    chain: dict[str, Path], data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from accelerate import Accelerator

    out = tmp_path / "ppo"
    original = Accelerator.save_state

    def full_disk(self, output_dir=None, **kwargs):
        result = original(self, output_dir, **kwargs)
        if output_dir and Path(output_dir).name.endswith("checkpoint-3"):
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(output_dir) / "optimizer.bin"))
        return result

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    with pytest.raises(OSError) as error:
        ppo(out, chain["sft"], chain["reward"], data, total_episodes=16)
    assert "disk is full" in str(error.value) and str(out) in str(error.value)
    monkeypatch.undo()
    assert not (out / "checkpoint-3" / "ppo_state.json").exists()

    caplog.set_level(logging.INFO)
    ppo(out, chain["sft"], chain["reward"], data, total_episodes=16)
    assert f"Resumed PPO from {out / 'checkpoint-2'} at step 2 of 4" in caplog.text
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rows) == [1, 1, 2, 2, 3, 3, 4, 4]  # steps 3-4 were logged once
    assert (out / "metrics.json").is_file()


# --- item 5: one run per output_dir ------------------------------------------------------------------


_HOLDER = """
import json, pathlib, sys, time
from transformers import Trainer
out, model, data, flag = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), pathlib.Path(sys.argv[4])

def training_step(self, *args, **kwargs):  # a run that is busy training when the second one starts
    flag.write_text("training")
    time.sleep(300)

Trainer.training_step = training_step
sys.path[:0] = [sys.argv[5], str(pathlib.Path(sys.argv[5]).parent)]  # the module, and tests/ for its imports
import test_adv_run_folders as helpers
helpers.sft(pathlib.Path(out), pathlib.Path(model), {k: pathlib.Path(v) for k, v in data.items()})
"""


def test_item5_a_second_run_on_a_busy_folder_is_refused_naming_the_pid(
    tiny_model_dir: Path, data, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out, flag = tmp_path / "sft", tmp_path / "first-run-is-training"
    paths = json.dumps({k: str(v) for k, v in data.items()})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", _HOLDER, str(out), str(tiny_model_dir), paths, str(flag), str(Path(__file__).parent)]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while not flag.exists():
            assert first.poll() is None, first.stdout.read()[-3000:]
            assert time.time() < deadline, "the first run did not start training within 180 s"
            time.sleep(0.2)
        with pytest.raises(Exception, match="in use by another run") as error:
            sft(out, tiny_model_dir, data, seed=1)  # another seed, as in the issue
        assert str(out) in str(error.value) and f"pid {first.pid}" in str(error.value)
        assert not list(out.glob("checkpoint-*"))
    finally:
        first.kill()  # SIGKILL: its lock file stays behind
        first.wait()

    caplog.set_level(logging.INFO)
    sft(out, tiny_model_dir, data)  # the dead run's lock is taken over; same inputs: it runs
    assert f"stale lock {out / '.instruct_tune.lock'} of pid {first.pid}" in caplog.text
    assert (out / "metrics.json").is_file() and not (out / ".instruct_tune.lock").exists()
    # the second run of the issue (another seed) would have resumed the first's final checkpoint
    with pytest.raises(Exception, match="seed 0 -> 7"):
        sft(out, tiny_model_dir, data, seed=7)


# --- item 6: folders that are not this stage's run folder ---------------------------------------------


def test_item6_a_users_folder_is_refused_and_kept(tiny_model_dir: Path, data, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("# my notes\n")
    (out / "config.yaml").write_text("mine: 1\n")
    (out / "metrics.json").write_text('{"my_score": 1}\n')
    (out / "table.csv").write_text("a,b\n1,2\n")
    before = snapshot(out)
    with pytest.raises(Exception, match="not an instruct-tune run folder") as error:
        sft(out, tiny_model_dir, data)
    assert str(out) in str(error.value) and "--overwrite_output_dir" in str(error.value)
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)

    sft(out, tiny_model_dir, data, run_options=overwrite())  # asked for: written, nothing merged
    assert "my_score" not in json.loads((out / "metrics.json").read_text())
    assert (out / "table.csv").read_text() == "a,b\n1,2\n"


def test_item6_sft_into_a_reward_run_folder_is_refused(
    chain: dict[str, Path], tiny_model_dir: Path, data, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "reward"
    shutil.copytree(chain["reward"], folder)
    before = snapshot(folder)
    caplog.set_level(logging.INFO)
    with pytest.raises(Exception, match="run folder of the reward stage, not of sft") as error:
        sft(folder, tiny_model_dir, data)
    assert str(folder) in str(error.value) and "--overwrite_output_dir" in str(error.value)
    assert "Resuming" not in caplog.text and snapshot(folder) == before


# --- item 7: no token in any file ----------------------------------------------------------------------


def test_item7_hub_token_is_in_no_file_of_the_run_folder(tiny_model_dir: Path, data, tmp_path: Path) -> None:
    token = "hf_adversarialSECRET0123456789"
    out = sft(tmp_path / "sft", tiny_model_dir, data, hub_token=token)
    holding = [p for p in out.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
    assert holding == []
    assert list(out.rglob("training_args.bin")) == []
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()  # the checkpoints were written


# --- item 12: the finished-file is written last --------------------------------------------------------


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_item12_a_kill_before_the_card_is_done_leaves_no_finished_file(
    stage: str, chain: dict[str, Path], tiny_model_dir: Path, data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed while the card is written (SFT: the card itself; reward: its normalisation section)."""
    import instruct_tune.stages.reward as reward_stage
    import instruct_tune.stages.runner as runner

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the card")

    monkeypatch.setattr(*((runner, "write_model_card") if stage == "sft" else (reward_stage, "append_to_card")), killed)
    with pytest.raises(KeyboardInterrupt):
        if stage == "sft":
            sft(tmp_path / stage, tiny_model_dir, data)
        else:
            reward(tmp_path / stage, chain["sft"], data)
    marker = "metrics.json" if stage == "sft" else "reward_normalization.json"
    assert (tmp_path / stage / "model.safetensors").is_file()  # killed after the model was saved
    assert not (tmp_path / stage / marker).exists()  # make does not call the folder finished


def test_item12_marker_is_the_newest_file(chain: dict[str, Path]) -> None:
    for stage, marker in (("sft", "metrics.json"), ("reward", "reward_normalization.json"), ("ppo", "metrics.json")):
        folder = chain[stage]
        newest = max((p for p in folder.iterdir() if p.is_file()), key=lambda p: p.stat().st_mtime_ns)
        assert newest.name == marker, (stage, newest.name)


def test_item12_ppo_killed_before_metrics_redoes_no_step(
    chain: dict[str, Path], data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import instruct_tune.stages.ppo as ppo_stage

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed before the run folder was written")

    out = tmp_path / "ppo"
    monkeypatch.setattr(ppo_stage, "write_run_folder", killed)
    with pytest.raises(KeyboardInterrupt):
        ppo(out, chain["sft"], chain["reward"], data, save_steps=5)
    monkeypatch.undo()
    assert not (out / "metrics.json").exists()
    caplog.set_level(logging.INFO)
    ppo(out, chain["sft"], chain["reward"], data, save_steps=5)
    assert f"Resumed PPO from {out / 'checkpoint-2'} at step 2 of 2" in caplog.text
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rows) == [1, 1, 2, 2]


# --- item 1 through the Makefile: the redo retrains reward and PPO from scratch --------------------------


def _make(target: str, config: Path, out: Path) -> subprocess.CompletedProcess:
    args = [f"VENV={Path(sys.prefix)}", "NO_INSTALL=1", f"CONFIG={config}", f"OUT={out}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        ["make", "--no-print-directory", target, *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def _write_configs(config: Path, model: Path, data: dict, sft_seed: int) -> None:
    common = {"report_to": "none", "use_cpu": True, "disable_tqdm": True, "seed": 0, "logging_steps": 1}
    train = {"max_steps": 2, "save_strategy": "steps", "save_steps": 1, "eval_strategy": "no", "max_length": 128}
    configs = {
        "sft": {
            "model_name_or_path": str(model), "dataset_name": str(data["sft"]), "eval_fraction": 0.0,
            "per_device_train_batch_size": 8, "learning_rate": 3e-3, "packing": False, **train, **common,
            "seed": sft_seed,
        },
        "reward": {
            "dataset_name": str(data["comparisons"]), "eval_fraction": 0.0, "per_device_train_batch_size": 4,
            "normalization_prompts": str(data["prompts"]), "normalization_samples": 8,
            "normalization_max_new_tokens": 8, **train, **common,
        },
        "ppo": {
            "dataset_name": str(data["prompts"]), "eval_fraction": 0.0, "total_episodes": 8,
            "rollout_batch_size": 4, "num_mini_batches": 1, "ppo_epochs": 1, "max_new_tokens": 8,
            "eval_samples": 0, "save_steps": 1, **sane_ppo(), **common,
        },
        "eval": {"dataset_name": str(data["prompts"]), "max_samples": 8, "max_new_tokens": 8, "batch_size": 8,
                 "greedy": False, "seed": 0},
    }  # fmt: skip
    for name, values in configs.items():
        (config / f"{name}.yaml").write_text(yaml.safe_dump(values))


def _stages(result: subprocess.CompletedProcess) -> list[str]:
    return [line.split()[2] for line in result.stdout.splitlines() if line.startswith("==> stage ")]


@pytest.mark.slow
def test_item1_make_redo_of_sft_retrains_reward_and_ppo_from_scratch(
    tiny_model_dir: Path, data, tmp_path: Path
) -> None:
    config, out = tmp_path / "config", tmp_path / "run"
    config.mkdir()
    _write_configs(config, tiny_model_dir, data, sft_seed=0)
    first = _make("rlhf", config, out)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert _stages(first) == ["sft", "reward", "ppo", "eval"]
    old_weights = {s: (out / s / "model.safetensors").read_bytes() for s in ("reward", "ppo")}

    _write_configs(config, tiny_model_dir, data, sft_seed=1)  # the SFT seed changed, its folder removed
    shutil.rmtree(out / "sft")
    time.sleep(0.05)
    redo = _make("rlhf", config, out)
    logs = redo.stdout + redo.stderr
    assert redo.returncode == 0, redo.stdout[-2000:] + redo.stderr[-3000:]
    assert _stages(redo) == ["sft", "reward", "ppo", "eval"]
    assert "Resuming from" not in logs and "Resumed PPO" not in logs
    assert logged_steps(out / "reward") == [1, 2] and logged_steps(out / "ppo") == [1, 2]
    for stage in ("reward", "ppo", "eval"):
        assert f"kept the previous {stage} folder as {out / stage}.previous" in redo.stdout
    for stage in ("reward", "ppo"):  # the old runs are kept whole; the new ones trained on the new SFT policy
        assert (out / f"{stage}.previous" / "model.safetensors").read_bytes() == old_weights[stage]
        assert (out / stage / "model.safetensors").read_bytes() != old_weights[stage]
    fp = {s: json.loads((out / s / "run_fingerprint.json").read_text()) for s in ("sft", "reward", "ppo")}
    previous = {s: json.loads((out / f"{s}.previous" / "run_fingerprint.json").read_text()) for s in ("reward", "ppo")}
    assert fp["reward"]["inputs"]["model_name_or_path"]["run_id"] == fp["sft"]["run_id"]
    assert previous["reward"]["inputs"]["model_name_or_path"]["run_id"] != fp["sft"]["run_id"]
    assert fp["ppo"]["inputs"]["reward_model_path"]["run_id"] == fp["reward"]["run_id"]
    assert fp["reward"]["id"] != previous["reward"]["id"] and fp["ppo"]["id"] != previous["ppo"]["id"]

    again = _make("rlhf", config, out)
    assert again.returncode == 0 and _stages(again) == []
