"""Small helpers shared by the test modules: the repository's paths, cut-down copies of the tiny task's files,
random models, a config file read back against its resolved values, and multi-process launches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_DATA = REPO / "data" / "tiny"
CLI = [sys.executable, "-m", "instruct_tune.cli"]
ACCELERATE = Path(sys.executable).parent / "accelerate"
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}
DDP_CPU = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
DDP_CPU += ["--dynamo_backend", "no"]
# Sharded launches over 2 CPU processes (gloo): FSDP2 `fully_shard` and DeepSpeed ZeRO-3.
FSDP_CPU = REPO / "recipes" / "accelerate" / "fsdp_cpu.yaml"
ZERO3_CPU = REPO / "recipes" / "accelerate" / "zero3_cpu.yaml"


def accelerate_launch(
    launch_options: list[str], recipe: str, args: list[str], *, timeout: int = 300, succeed: bool = True, **env: str
) -> str:
    """`accelerate launch <launch_options> <recipe> <args>` from the repository, offline; returns its stdout and
    stderr. Fails the test on a non-zero exit or when still running at `timeout` seconds (a hung collective): the
    launcher and its workers, one process group, are then killed and their output so far shown. `succeed=False`:
    fails on a zero exit instead. `env`: more environment variables.

    Test files run in parallel (pytest-xdist): `--main_process_port 0` gives each launch a free port of its own,
    where launches on accelerate's default 29500 race for it."""
    command = [str(ACCELERATE), "launch", *launch_options, "--main_process_port", "0", recipe, *args]
    env = {**os.environ, **OFFLINE_ENV, **env}
    with subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"launch of {recipe} still running after {timeout} s:\n{out[-2000:]}{err[-4000:]}")
    assert (proc.returncode == 0) == succeed, f"exit {proc.returncode}:\n{out[-3000:]}{err[-5000:]}"
    return out + err


def head_of(src: Path, dst: Path, n: int, *, last: bool = False) -> Path:
    """The first (with `last`: the final) `n` lines of `src`, written to `dst`."""
    if last:
        lines = src.read_text().splitlines(keepends=True)[-n:]
    else:
        with src.open() as rows:
            lines = [line for _, line in zip(range(n), rows, strict=False)]
    dst.write_text("".join(lines))
    return dst


def save_random_model(config, tokenizer, out: Path, *, seed: int = 0) -> Path:
    """A causal LM of `config` with random (seeded) weights, saved with `tokenizer` to `out`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def assert_resolved_as_written(raw: dict, resolved: dict) -> None:
    """Every key of a config file (but `env` and `output_dir`) has the value its stage resolved it to."""
    for key, value in raw.items():
        if key in ("env", "output_dir"):
            continue
        got = resolved[key]
        if isinstance(value, str) and isinstance(got, list):  # report_to: tensorboard -> [tensorboard]
            assert got == [value], key
        elif isinstance(value, float) or isinstance(got, float):
            assert got == pytest.approx(value), key
        else:
            assert got == value, key


def launch_sharded(engine: str, recipe: str, args: list[str], *launch_options: str, timeout: int = 300) -> str:
    """`recipe` with `args` over 2 CPU processes under `engine`, returning its output: "fsdp" (FSDP2,
    `fsdp_cpu.yaml`, with `--use_cpu true`) or "zero3" (DeepSpeed ZeRO-3, `zero3_cpu.yaml` with
    DS_ACCELERATOR=cpu and no `--use_cpu`, which would turn DeepSpeed off). `launch_options` go to `accelerate
    launch`. Fails on an error, a hang, or a run that did not say it sharded that way."""
    if engine == "fsdp":
        options, args, env, said = FSDP_CPU, [*args, "--use_cpu", "true"], {}, "FSDP over CPU processes"
    elif engine == "zero3":
        options, env, said = ZERO3_CPU, {"DS_ACCELERATOR": "cpu"}, "DeepSpeed over CPU processes"
    else:
        raise ValueError(f"engine {engine!r}: fsdp or zero3")
    output = accelerate_launch(["--config_file", str(options), *launch_options], recipe, args, timeout=timeout, **env)
    assert said in output, f"the launch of {recipe} did not run {engine} ({said!r} not in its output)"
    return output
