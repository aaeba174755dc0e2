"""Measure SFT tokens/s of each padding/packing setting on the tiny default (CPU), to choose the default.

    python bench/sft_packing.py [--steps 40] [--repeats 2]

Counts only non-padding tokens that enter the loss computation (attention_mask), alternates settings between
repeats, and writes bench/results/sft_packing.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "padding": {"packing": False},
    "padding_free": {"packing": False, "padding_free": True, "max_length": None},
    "wrapped": {"packing": True, "packing_strategy": "wrapped"},
    "bfd (TRL default packing)": {"packing": True, "packing_strategy": "bfd"},
}


class TokenCounter:
    """Trainer callback-free counter: wraps the collator to count real tokens per batch."""

    def __init__(self, collator):
        self.collator, self.tokens = collator, 0

    def __call__(self, examples):
        batch = self.collator(examples)
        if "attention_mask" in batch:
            self.tokens += int(batch["attention_mask"].sum())
        else:
            self.tokens += int(batch["input_ids"].numel())
        return batch


def run(setting: dict, steps: int, model_dir: str, data: str) -> float:
    from trl import SFTTrainer

    from instruct_tune.config import DataArguments, ModelArguments, SFTStageConfig
    from instruct_tune.models import load_model, load_tokenizer
    from instruct_tune.stages.sft import sft_datasets

    with tempfile.TemporaryDirectory() as out:
        options = {"max_length": 128, **setting}
        args = SFTStageConfig(
            output_dir=out, max_steps=steps, per_device_train_batch_size=32, learning_rate=1e-3,
            gradient_checkpointing=False, report_to=[], save_strategy="no",
            logging_steps=1000, disable_tqdm=True, use_cpu=True, **options,
        )
        data_args = DataArguments(dataset_name=data, eval_fraction=0.0, max_train_samples=steps * 32 * 2)
        model_args = ModelArguments(model_name_or_path=model_dir, use_peft=True, lora_r=32, lora_alpha=64)
        tokenizer = load_tokenizer(model_args)
        train, _ = sft_datasets(data_args, seed=0, completion_only=True)
        trainer = SFTTrainer(model=load_model(model_args, tokenizer), args=args, train_dataset=train,
                             processing_class=tokenizer)
        counter = TokenCounter(trainer.data_collator)
        trainer.data_collator = counter
        start = time.perf_counter()
        trainer.train()
        return counter.tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="models/tiny-gpt2")
    parser.add_argument("--data", default="data/tiny/sft.jsonl")
    args = parser.parse_args()
    results: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(args.repeats):
        for name, setting in SETTINGS.items():
            results[name].append(run(setting, args.steps, args.model, args.data))
    summary = {name: {"median": statistics.median(v), "min": min(v), "max": max(v)} for name, v in results.items()}
    base = summary["padding"]["median"]
    for name, s in summary.items():
        print(f"{name:28s} tokens/s median {s['median']:9.0f}  (min {s['min']:.0f}, max {s['max']:.0f})  "
              f"x{s['median'] / base:.2f} vs padding")
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path("bench/results/sft_packing.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
