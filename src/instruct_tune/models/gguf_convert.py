"""GGUF checkpoints (llama.cpp's format) as ordinary transformers folders, converted once and cached.

transformers loads a `.gguf` file de-quantised (`from_pretrained(folder, gguf_file=name)`), but the model it
returns keeps a GGUF "quantizer" that refuses `save_pretrained` and that the Trainer refuses to train, and every
later step (LoRA adapters naming their base, merge, push, cards, `AutoConfig` look-ups) wants a folder. So a
GGUF source is converted once into a folder of fp32 safetensors, tokenizer files and a card, with a stamp
(`gguf_source.json`: the file's name, size and sha256, plus what the caller adds) that says which file it came
from; the folder is rebuilt only when the stamp no longer matches.

The loader (`resolve_gguf`) converts a `.gguf` path, or a folder with `gguf_file`, into
`$INSTRUCT_TUNE_GGUF_CACHE` (default `~/.cache/instruct_tune/gguf`), one folder per file content.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STAMP_FILE = "gguf_source.json"
CACHE_ENV = "INSTRUCT_TUNE_GGUF_CACHE"
# The files a converted folder must hold besides the stamp (tokenizer.json: transformers' fast tokenizer).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def gguf_path_of(model_name_or_path: str | None, gguf_file: str | None = None) -> Path | None:
    """The GGUF file a model source names: a `.gguf` path, or `gguf_file` inside the folder; None otherwise."""
    if gguf_file:
        folder = Path(model_name_or_path or ".")
        path = folder / gguf_file if not Path(gguf_file).is_absolute() else Path(gguf_file)
    elif model_name_or_path and model_name_or_path.lower().endswith(".gguf"):
        path = Path(model_name_or_path)
    else:
        return None
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file (model_name_or_path / gguf_file)")
    return path


def gguf_summary(path: str | Path) -> dict[str, Any]:
    """What a GGUF file says about itself: its `general.*` name and license, and its tensors' quantisation
    types with counts (e.g. `{"Q4_1": 210, "F32": 61, "Q8_0": 1}`), the most frequent quantised type first."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    general: dict[str, Any] = {}
    for key in ("general.name", "general.license", "general.organization", "general.architecture"):
        field = reader.fields.get(key)
        if field is not None:
            general[key.split(".", 1)[1]] = field.contents()
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    types = dict(sorted(counts.items(), key=lambda kv: (kv[0] in ("F32", "F16", "BF16"), -kv[1])))
    quantised = [name for name in types if name not in ("F32", "F16", "BF16")]
    return {**general, "tensor_types": types, "quantization": quantised[0] if quantised else None}


def read_stamp(folder: str | Path) -> dict[str, Any] | None:
    """The stamp of a converted folder, or None when it has none (or is missing a required file)."""
    folder = Path(folder)
    stamp = folder / STAMP_FILE
    if not stamp.is_file() or not all((folder / name).is_file() for name in REQUIRED_FILES):
        return None
    return json.loads(stamp.read_text())


def is_current(folder: str | Path, expected: Mapping[str, Any]) -> bool:
    """Whether `folder` was converted from the source that `expected` (a stamp's keys) describes."""
    stamp = read_stamp(folder)
    return stamp is not None and all(stamp.get(key) == value for key, value in expected.items())


def _plain_model(model: Any) -> Any:
    """The de-quantised GGUF model as a plain transformers model (no GGUF quantizer): same config less its
    `quantization_config`, same weights (tied embeddings stay tied)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"GGUF weights do not fit {type(plain).__name__}: missing {missing}, unexpected {unexpected}"
        )
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    *,
    stamp: Mapping[str, Any] | None = None,
    write_card: Callable[[Path, dict[str, Any]], None] | None = None,
    force: bool = False,
    sha256: str | None = None,
) -> Path:
    """Convert a GGUF file into `out_dir` (fp32 safetensors, tokenizer, card, stamp); skipped when current.

    `stamp`: extra keys that must match for the folder to count as current (a package version...).
    `write_card(folder, stamp)` writes the folder's README.md; by default a card from the GGUF metadata.
    The folder is written beside `out_dir` and renamed into place, so a half-written one is never used.
    `sha256`: the file's digest when the caller has it already.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    record = {
        "gguf_file": gguf_path.name,
        "size": gguf_path.stat().st_size,
        "sha256": sha256 or file_sha256(gguf_path),
        **dict(stamp or {}),
    }
    expected = dict(record)
    if not force and is_current(out_dir, expected):
        logger.info("%s is up to date (%s, sha256 %s)", out_dir, gguf_path.name, record["sha256"][:12])
        return out_dir
    start = time.time()
    logger.info("Converting %s into %s (de-quantised to fp32)", gguf_path, out_dir)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = _plain_model(AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32))
    summary = gguf_summary(gguf_path)
    record |= {
        "source_path": str(gguf_path),
        "quantization": summary["quantization"],
        "tensor_types": summary["tensor_types"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = out_dir.parent / f".{out_dir.name}.converting-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    model.save_pretrained(scratch, safe_serialization=True)
    tokenizer.save_pretrained(scratch)
    (write_card or _default_card)(scratch, {**record, **summary})
    record["seconds"] = round(time.time() - start, 1)
    (scratch / STAMP_FILE).write_text(json.dumps(record, indent=2) + "\n")
    if out_dir.exists() and not force and is_current(out_dir, expected):
        shutil.rmtree(scratch)  # another process (a multi-process launch) converted the same file meanwhile
        return out_dir
    if out_dir.exists():
        shutil.rmtree(out_dir)
    scratch.rename(out_dir)
    logger.info(
        "Converted %s in %.1f s: %s parameters", gguf_path.name, record["seconds"], record["parameters"]
    )
    return out_dir


def dequantized_note(info: Mapping[str, Any]) -> str:
    """One line on where the weights came from, carried into the cards of every model trained from them."""
    quant = info.get("quantization") or "GGUF"
    return f"de-quantised from {quant} to fp32 (GGUF file {info['gguf_file']}, sha256 {info['sha256']})"


def _default_card(folder: Path, info: Mapping[str, Any]) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license=info.get("license"),
        tags=["gguf-converted"],
        weights_note=dequantized_note(info),
    )
    body = (
        f"# {info.get('name') or info['gguf_file']}\n\nConverted by instruct-tune from `{info['source_path']}`: "
        f"{dequantized_note(info)}. Tensor types in the file: {info['tensor_types']}.\n"
    )
    ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").save(folder / "README.md")


def cache_root() -> Path:
    """Where the loader keeps converted GGUF files."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "instruct_tune" / "gguf")


def resolve_gguf(model_args: Any) -> str | None:
    """Point `model_args` at the converted folder of the GGUF file it names (converting it on first use).

    `model_name_or_path` becomes that folder and `gguf_file` None, so everything after (adapters recording their
    base, context checks, cards) sees an ordinary checkpoint; returns the folder, or None for a non-GGUF source.
    """
    path = gguf_path_of(model_args.model_name_or_path, getattr(model_args, "gguf_file", None))
    if path is None:
        return None
    sha = file_sha256(path)
    out = convert_gguf(path, cache_root() / f"{path.stem}-{sha[:16]}", sha256=sha)
    model_args.model_name_or_path = str(out.resolve())
    model_args.gguf_file = None
    return model_args.model_name_or_path
