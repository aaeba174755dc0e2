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
    """Merge `metrics` into the run folder's `metrics.json` (a later write of the same key wins)."""
    path = Path(output_dir) / METRICS_FILE
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged.update({k: _finite(v) for k, v in metrics.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    return path


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
) -> Path:
    """Write `README.md` with Hub metadata (parsed by `huggingface_hub.ModelCard`) and a readable body."""
    output_dir = Path(output_dir)
    data = ModelCardData(
        base_model=hub_id_of(base_model),
        library_name="peft" if is_adapter else "transformers",
        pipeline_tag="text-classification" if stage == "reward" else "text-generation",
        tags=["instruct-tune", "trl", "rlhf", stage, *(["lora"] if is_adapter else [])],
        datasets=[d for d in datasets if is_hub_id(d)] or None,
        license=license or license_of(base_model),
    )
    loader = (
        "from peft import AutoPeftModelForCausalLM\n"
        f'model = AutoPeftModelForCausalLM.from_pretrained("{output_dir}")'
        if is_adapter
        else f'from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained("{output_dir}")'
    )
    if stage == "reward":  # the base chain, the score head and the normalisation bias come with this loader
        loader = (
            "from instruct_tune.models.reward import load_reward_model\n"
            f'rm = load_reward_model("{output_dir}")\n'
            'rm.score(["Add 2 and 3."], ["5"])  # normalised reward, one per (prompt, response)'
        )
    lineage_lines = "\n".join(f"- {name}: `{path}`" for name, path in (lineage or {}).items()) or "- none"
    body = f"""
# {output_dir.name}: {stage} stage of instruct-tune

Trained with instruct-tune ({stage} stage, built on TRL) from base model `{base_model}`.

## Lineage
- base model: `{base_model}`
{lineage_lines}

## Data
{chr(10).join(f"- `{d}`" for d in datasets) or "- none recorded"}

## Results
{_metrics_table(metrics or {})}

## Usage
```python
from transformers import AutoTokenizer
{loader}
tokenizer = AutoTokenizer.from_pretrained("{output_dir}")
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
