"""Merge a run folder's LoRA adapter into its base and write a standalone model (safetensors).

The adapter may sit on another adapter folder (a PPO adapter over an SFT adapter): the one model loader
follows the chain to the root checkpoint and merges oldest first, so the output loads with plain
`AutoModelForCausalLM.from_pretrained` and gives the logits of base + adapters.
"""

from __future__ import annotations

import json
from pathlib import Path

from instruct_tune.artifacts import write_model_card
from instruct_tune.models.loading import adapter_chain


class MergeError(RuntimeError):
    """A merge that cannot be done; the message says why and what to do instead."""


def _quantization(root: str) -> dict | None:
    config = Path(root) / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("quantization_config")


def merge_run_folder(folder: str | Path, output: str | Path, *, trust_remote_code: bool = False) -> Path:
    """Write `folder`'s adapter merged into its base to `output` (weights, config, tokenizer, card)."""
    from instruct_tune.config import ModelArguments
    from instruct_tune.models import load_model, load_tokenizer

    folder, output = Path(folder), Path(output)
    if not (folder / "adapter_config.json").is_file():
        if (folder / "config.json").is_file():
            raise MergeError(f"{folder} holds a full model, not an adapter: nothing to merge (use it as it is)")
        raise MergeError(f"{folder}: no adapter_config.json: not an adapter run folder")
    if output.resolve() == folder.resolve():
        raise MergeError("--output must be a new folder: merging in place would overwrite the adapter")
    root, adapters = adapter_chain(folder)
    quantization = _quantization(root)
    if quantization and (quantization.get("load_in_4bit") or quantization.get("quant_method") == "bitsandbytes"):
        raise MergeError(
            f"the base {root} is stored quantised ({quantization.get('quant_method', '4-bit')}): merging would "
            "round the adapter into quantised weights. Merge into the full-precision checkpoint the base was "
            "quantised from: point adapter_config.json's base_model_name_or_path at it (or copy the adapter "
            "folder and edit that copy), then run merge again."
        )
    args = ModelArguments(model_name_or_path=str(folder))
    tokenizer = load_tokenizer(args, trust_remote_code=trust_remote_code)
    model = load_model(args, tokenizer, trust_remote_code=trust_remote_code)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    write_model_card(
        output,
        stage="merged",
        base_model=root,
        is_adapter=False,
        lineage={"merged adapter": str(folder), **{f"adapter {i}": a for i, a in enumerate(adapters)}},
    )
    return output
