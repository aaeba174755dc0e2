"""Small helpers shared by the test modules: the repository's paths, cut-down copies of the tiny task's files,
random models, and a config file read back against its resolved values."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_DATA = REPO / "data" / "tiny"
CLI = [sys.executable, "-m", "instruct_tune.cli"]


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
