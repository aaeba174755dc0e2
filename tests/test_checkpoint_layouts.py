"""Which checkpoints of the sharded engines count as complete (`instruct_tune.checkpoints`): the layouts that
accelerate's `save_state` writes for PPO under FSDP2 (SHARDED_STATE_DICT) and DeepSpeed ZeRO-3, each whole and
with the file a kill mid-save leaves missing. (Whole ones resume in tests/test_ppo_multiprocess.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instruct_tune.checkpoints import PPO_STATE_FILE, ppo_checkpoint_problem


def _ppo_files(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / PPO_STATE_FILE).write_text(json.dumps({"step": 1}))
    (folder / "scheduler.bin").write_bytes(b"x")
    return folder


def fsdp_sharded(folder: Path, drop: str | None = None) -> Path:
    _ppo_files(folder)
    for name in ("pytorch_model_fsdp_0", "optimizer_0"):
        (folder / name).mkdir()
        for rank in (0, 1):
            (folder / name / f"__{rank}_0.distcp").write_bytes(b"x")
        (folder / name / ".metadata").write_bytes(b"x")
    if drop:
        (folder / drop).unlink()
    return folder


def deepspeed_zero3(folder: Path, drop: str | None = None) -> Path:
    _ppo_files(folder)
    (folder / "latest").write_text("pytorch_model")
    tag = folder / "pytorch_model"
    tag.mkdir()
    for rank in (0, 1):
        for kind in ("model", "optim"):
            (tag / f"zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt").write_bytes(b"x")
    if drop:
        (folder / drop).unlink()
    return folder


@pytest.mark.parametrize("layout", [fsdp_sharded, deepspeed_zero3])
def test_a_whole_sharded_checkpoint_is_complete(layout, tmp_path: Path) -> None:
    assert ppo_checkpoint_problem(layout(tmp_path / "checkpoint-1")) is None


@pytest.mark.parametrize(
    ("layout", "drop", "problem"),
    [
        (fsdp_sharded, "optimizer_0/.metadata", "optimizer_0 has no .metadata"),
        (fsdp_sharded, "pytorch_model_fsdp_0/.metadata", "pytorch_model_fsdp_0 has no .metadata"),
        (deepspeed_zero3, "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt", "1 optimizer partitions for 2"),
        (deepspeed_zero3, "scheduler.bin", "no scheduler.bin"),
    ],
)
def test_a_checkpoint_missing_a_file_is_not(layout, drop: str, problem: str, tmp_path: Path) -> None:
    found = ppo_checkpoint_problem(layout(tmp_path / "checkpoint-1", drop))
    assert found is not None and problem in found, found
