"""The PPO peer: `trl.experimental.ppo.PPOTrainer` of trl==1.12.0 (the last TRL with PPO), as its docs use it.

    bench/.venv-trl112/bin/python bench/peers/trl112_ppo.py --policy DIR --reward DIR --value DIR
        --prompts data/tiny/prompts.jsonl --episodes 256 --batch 64 --mini_batches 4 --ppo_epochs 4
        --response_length 24 [--lora_r 16]

Four models, TRL's layout: policy, reference (a copy, or the policy with its adapter switched off under
`--lora_r`), reward and value (sequence-classification models). Prints one JSON line: episodes and the
seconds `trainer.train()` took.
"""

import argparse
import json
import time

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl.experimental.ppo import PPOConfig, PPOTrainer

parser = argparse.ArgumentParser()
for name in ("policy", "reward", "value", "prompts"):
    parser.add_argument(f"--{name}", required=True)
for name, default in (("episodes", 256), ("batch", 64), ("mini_batches", 4), ("ppo_epochs", 4),
                      ("response_length", 24), ("lora_r", 0)):  # fmt: skip
    parser.add_argument(f"--{name}", type=int, default=default)
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(args.policy)
prompts = load_dataset("json", data_files=args.prompts, split="train").select(range(args.episodes))
prompts = prompts.map(
    lambda row: {"input_ids": tokenizer.apply_chat_template(
        [{"role": "user", "content": row["prompt"]}], add_generation_prompt=True, tokenize=True, return_dict=False
    )},  # fmt: skip
    remove_columns=prompts.column_names,
)
config = PPOConfig(
    output_dir="/tmp/trl112-ppo-bench",
    total_episodes=args.episodes,
    per_device_train_batch_size=args.batch // args.mini_batches,
    gradient_accumulation_steps=args.mini_batches,  # rollout batch = per_device x accumulation
    num_mini_batches=args.mini_batches,
    num_ppo_epochs=args.ppo_epochs,
    local_rollout_forward_batch_size=args.batch,
    response_length=args.response_length,
    stop_token="eos",
    temperature=1.0,
    learning_rate=1e-5,
    num_sample_generations=0,
    save_strategy="no",
    report_to=[],
    use_cpu=True,
    bf16=False,
    disable_tqdm=True,
    seed=0,
)
peft_config = None
if args.lora_r:
    from peft import LoraConfig

    peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, task_type="CAUSAL_LM", target_modules="all-linear")
policy = AutoModelForCausalLM.from_pretrained(args.policy)
trainer = PPOTrainer(
    args=config,
    processing_class=tokenizer,
    model=policy,
    ref_model=None if args.lora_r else AutoModelForCausalLM.from_pretrained(args.policy),
    reward_model=AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1),
    value_model=AutoModelForSequenceClassification.from_pretrained(args.value, num_labels=1),
    train_dataset=prompts,
    peft_config=peft_config,
)
start = time.perf_counter()
trainer.train()
print(json.dumps({"episodes": args.episodes, "seconds": time.perf_counter() - start}))
