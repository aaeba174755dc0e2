"""Shared fixtures: a small tiny-task model built once per test session from the shipped data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_DATA = REPO / "data" / "tiny"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run faster on one thread, and much faster when other processes share the 2 cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pretrained tiny GPT-2 (smaller than the default's, same recipe), built from data/tiny."""
    from instruct_tune.tiny.build_model import TinyModelSpec, build_tiny_model

    spec = TinyModelSpec(vocab_size=512, n_embd=64, n_layer=2, n_head=2, pretrain_max_rows=2000, batch_size=32)
    return build_tiny_model(TINY_DATA, tmp_path_factory.mktemp("tiny-model"), spec)


@pytest.fixture(scope="session")
def tiny_sft_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 600 demonstrations of the tiny task, as a JSONL file."""
    path = tmp_path_factory.mktemp("tiny-data") / "sft.jsonl"
    with (TINY_DATA / "sft.jsonl").open() as src:
        path.write_text("".join(line for _, line in zip(range(600), src, strict=False)))
    return path
