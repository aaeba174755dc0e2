"""The peer: a plain `trl.SFTTrainer` script with TRL's defaults, as a user would write it (no instruct_tune).

    python bench/peers/trl_sft.py --model DIR --data data/tiny/sft.jsonl --steps 20 [--packing bfd|wrapped|none]
        [--padding_free]

Prints one JSON line: non-padding tokens trained on (TRL's own `num_tokens`) and the train runtime.
"""

import argparse
import json

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--data", required=True)
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--batch_size", type=int, default=32)
parser.add_argument("--max_length", type=int, default=256)
parser.add_argument("--packing", default="default", help="default (TRL's), none, bfd or wrapped")
parser.add_argument("--padding_free", action="store_true")
parser.add_argument("--gradient_accumulation_steps", type=int, default=1, help="batch_size rows per micro-batch / this")
# TRL turns bf16 on whenever fp16 is off, also on a CPU: here that is bf16 autocast on a CPU without a fast bf16
# matmul (1.34 GFLOP/s against 117.7 in fp32, bench/machine.py), which made every TRL run crawl. Both sides
# train in fp32 unless --bf16 is given.
parser.add_argument("--bf16", action="store_true")
args = parser.parse_args()
if args.batch_size % args.gradient_accumulation_steps:
    parser.error(f"--batch_size {args.batch_size} is not a multiple of --gradient_accumulation_steps")

options = {}
if args.packing == "none":
    options["packing"] = False
elif args.packing in ("bfd", "wrapped"):
    options.update(packing=True, packing_strategy=args.packing)
if args.padding_free:
    options["padding_free"] = True
    if args.packing == "none":  # TRL does not cut rows without packing here; no demonstration is that long
        options["max_length"] = None
config = SFTConfig(
    output_dir="/tmp/trl-sft-bench", max_steps=args.steps,
    per_device_train_batch_size=args.batch_size // args.gradient_accumulation_steps,
    gradient_accumulation_steps=args.gradient_accumulation_steps,
    max_length=options.pop("max_length", args.max_length), learning_rate=1e-3, logging_steps=args.steps, save_strategy="no",
    report_to=[], disable_tqdm=True, use_cpu=True, bf16=args.bf16, **options,
)  # fmt: skip
dataset = load_dataset("json", data_files=args.data, split="train").select(range(args.steps * args.batch_size * 4))
trainer = SFTTrainer(
    model=AutoModelForCausalLM.from_pretrained(args.model),
    args=config,
    train_dataset=dataset.remove_columns([c for c in dataset.column_names if c != "messages"]),
    processing_class=AutoTokenizer.from_pretrained(args.model),
)
metrics = trainer.train().metrics
tokens = max(entry.get("num_tokens", 0) for entry in trainer.state.log_history)
print(json.dumps({"tokens": tokens, "runtime": metrics["train_runtime"], "packing": config.packing}))
