"""The run folder of a stage (`outputs/<run>/<stage>/`): model or adapter, tokenizer, config, metrics, card.

This is the one place that writes run folders and model cards, so every stage's output looks the same and
a later stage can find an earlier one's output by its folder alone.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from instruct_tune.checkpoints import write_atomic

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
CARD_FILE = "README.md"
# Written by `instruct-tune push` (never uploaded): the repo a run folder went to, so cards of later stages
# can name it as their `base_model`.
HUB_FILE = "hub.json"
# Written by transformers' Trainer with pickle; the run folder keeps `config.yaml` instead.
_PICKLED_FILES = ("training_args.bin",)


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so the file stays valid and the problem visible."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_metrics(output_dir: str | Path, metrics: Mapping[str, Any]) -> Path:
    """Merge `metrics` into the run folder's `metrics.json` (a later write of the same key wins).

    Written through a temporary file and a rename: make reads the file as a finished folder's last one.
    """
    path = Path(output_dir) / METRICS_FILE
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged.update({k: _finite(v) for k, v in metrics.items()})
    return write_atomic(path, json.dumps(merged, indent=2, sort_keys=True) + "\n")


def read_metrics(output_dir: str | Path) -> dict[str, Any]:
    """The run folder's metrics, or an empty mapping when none were written."""
    path = Path(output_dir) / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def is_hub_id(name: str | None) -> bool:
    """Whether `name` reads as a Hub repo id rather than a local path."""
    if not name or Path(name).exists() or name.startswith((".", "/", "~")):
        return False
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(parts)


def hub_id_of(model: str | None) -> str | None:
    """The Hub id that stands for `model` in card metadata, or None when it has none.

    A Hub id stands for itself; a local run folder for the repo it was pushed to (`hub.json`), else for the
    `base_model` its own card names (the Hub model at the root of its chain).
    """
    if not model:
        return None
    if is_hub_id(model):
        return model
    folder = Path(model)
    if (folder / HUB_FILE).is_file():
        return json.loads((folder / HUB_FILE).read_text()).get("repo_id")
    base = _card_data(folder).get("base_model")
    return base[0] if isinstance(base, list) and base else base or None


def license_of(model: str | None) -> str | None:
    """The license a local model folder's card declares (carried into the cards trained from it)."""
    return _card_data(Path(model)).get("license") if model and not is_hub_id(model) else None


# Card metadata key: where the base's weights came from when they are not the Hub model's own (e.g. a GGUF
# file de-quantised); carried from card to card, so every model trained from such a base says so.
WEIGHTS_NOTE = "weights_note"


def weights_note_of(model: str | None) -> str | None:
    """The `weights_note` a local model folder's card declares, or None."""
    return _card_data(Path(model)).get(WEIGHTS_NOTE) if model and not is_hub_id(model) else None


def _card_data(folder: Path) -> dict[str, Any]:
    card = folder / CARD_FILE
    if not card.is_file():
        return {}
    try:
        return ModelCard.load(card).data.to_dict()
    except Exception:  # a hand-written README without metadata is not an error here
        return {}


def remove_pickled_files(output_dir: str | Path) -> None:
    """Drop pickle files the Trainer writes beside the model: run folders hold safetensors only."""
    for name in _PICKLED_FILES:
        (Path(output_dir) / name).unlink(missing_ok=True)


def _metrics_table(metrics: Mapping[str, Any]) -> str:
    rows = [
        f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
        for key, value in sorted(metrics.items())
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    ]
    return "\n".join(["| metric | value |", "| --- | --- |", *rows]) if rows else "No metrics recorded."


def _quant_bits(config: Mapping[str, Any] | None) -> int | None:
    """4 or 8 for a QLoRA run's config (its base was loaded quantised), else None."""
    config = config or {}
    return 4 if config.get("load_in_4bit") else 8 if config.get("load_in_8bit") else None


def usage_code(folder: str | Path, stage: str) -> str:
    """Python that loads exactly the model of the run folder `folder`, for its card.

    An adapter trained on an earlier stage's adapter is loaded as the root checkpoint with every earlier
    adapter merged in, oldest first, then its own adapter on top: what instruct-tune's loader does.
    (`AutoPeftModelForCausalLM` would take the root and this adapter only, dropping the ones between.)
    """
    from instruct_tune.models.adapter_base import adapter_chain

    path = str(Path(folder).resolve())
    tokenizer = f'tokenizer = AutoTokenizer.from_pretrained("{path}")'
    if stage == "reward":  # the base chain, the score head and the normalisation come with this loader
        return (
            "from instruct_tune.models.reward import load_reward_model\n"
            f'rm = load_reward_model("{path}")\n'
            'rm.score(["Add 2 and 3."], ["5"])  # normalised reward, one per (prompt, response)'
        )
    root, adapters = adapter_chain(path)
    if not adapters:
        return (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f'model = AutoModelForCausalLM.from_pretrained("{path}")\n{tokenizer}'
        )
    lines = [
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        tokenizer,
        f'model = AutoModelForCausalLM.from_pretrained("{root}")',
        "if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # a pad token was added",
        "    model.resize_token_embeddings(len(tokenizer))",
    ]
    for adapter in adapters[:-1]:
        lines.append(
            f'model = PeftModel.from_pretrained(model, "{Path(adapter).resolve()}").merge_and_unload()'
            "  # the adapter this one was trained on"
        )
    lines.append(f'model = PeftModel.from_pretrained(model, "{path}")')
    return "\n".join(lines)


def write_model_card(
    output_dir: str | Path,
    *,
    stage: str,
    base_model: str,
    is_adapter: bool,
    datasets: Sequence[str] = (),
    config: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    lineage: Mapping[str, str] | None = None,
    license: str | None = None,
    eval_data: str | None = None,
) -> Path:
    """Write `README.md` with Hub metadata (parsed by `huggingface_hub.ModelCard`) and a readable body."""
    output_dir = Path(output_dir)
    bits = _quant_bits(config)
    note = weights_note_of(base_model)
    data = ModelCardData(
        base_model=hub_id_of(base_model),
        library_name="peft" if is_adapter else "transformers",
        pipeline_tag="text-classification" if stage == "reward" else "text-generation",
        tags=["instruct-tune", "trl", "rlhf", stage, *(["lora"] if is_adapter else [])]
        + ([f"{bits}-bit", "qlora"] if bits else []),
        datasets=[d for d in datasets if is_hub_id(d)] or None,
        license=license or license_of(base_model),
        **({WEIGHTS_NOTE: note} if note else {}),
    )
    loader = usage_code(output_dir, stage)
    lineage_lines = "\n".join(f"- {name}: `{path}`" for name, path in (lineage or {}).items()) or "- none"
    if note:
        lineage_lines += f"\n- base weights: {note}"
    if bits is not None:  # QLoRA: say so, since the adapter was fitted to a quantised base
        kind = (config or {}).get("bnb_4bit_quant_type", "nf4") if bits == 4 else "int8"
        lineage_lines += (
            f"\n- quantisation: trained as QLoRA on the base loaded in {bits}-bit ({kind}, bitsandbytes); "
            f"load the base in {bits}-bit for the same outputs"
        )
    body = f"""
# {output_dir.name}: {stage} stage of instruct-tune

Trained with instruct-tune ({stage} stage, built on TRL) from base model `{base_model}`.

## Lineage
- base model: `{base_model}`
{lineage_lines}

## Data
{chr(10).join(f"- `{d}`" for d in datasets) or "- none recorded"}
{f"- eval set: {eval_data}" if eval_data else ""}

## Results
{_metrics_table(metrics or {})}

## Usage
```python
{loader}
```

## Training configuration
```yaml
{yaml.safe_dump(dict(config or {}), sort_keys=False).strip()}
```
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    path = output_dir / CARD_FILE
    card.save(path)
    return path


def append_to_card(output_dir: str | Path, title: str, body: str) -> Path:
    """Set the `## title` section of the run folder's model card (replacing one of the same title)."""
    path = Path(output_dir) / CARD_FILE
    card = ModelCard.load(path)
    heading = f"\n## {title}\n"
    text = card.text.rstrip() + "\n"
    start = text.find(heading)
    if start != -1:  # drop the old section: up to the next `## ` heading or the end
        end = text.find("\n## ", start + 1)
        text = text[:start] + (text[end:] if end != -1 else "")
    card.text = f"{text.rstrip()}\n{heading}{body.strip()}\n"
    card.save(path)
    return path
