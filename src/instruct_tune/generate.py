"""Use a run folder (or Hub id): answer a file of prompts, or chat with it turn by turn.

Both go through the one model loader (adapters merged on load) and the one sampler, with the chat template
the run folder carries.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import torch


def load_policy(path: str, *, trust_remote_code: bool = False):
    """The model (in eval mode) and tokenizer of a run folder or Hub id."""
    from instruct_tune.config import ModelArguments
    from instruct_tune.models import load_model, load_tokenizer

    args = ModelArguments(model_name_or_path=path)
    tokenizer = load_tokenizer(args, trust_remote_code=trust_remote_code)
    model = load_model(args, tokenizer, trust_remote_code=trust_remote_code).eval()
    return model, tokenizer


def read_prompts(path: str | Path) -> list[list[dict]]:
    """Chat prompts of a file with a `prompt` (text or messages) or `messages` column, any supported format."""
    from instruct_tune.data import load_source

    rows, _ = load_source(str(path), "prompts")
    return [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in rows["prompt"]]


def generate_file(
    policy: str,
    input_path: str | Path,
    output_path: str | Path,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 32,
) -> int:
    """Answer every prompt of `input_path`; write JSONL rows (prompt, response, ended_with_eos); returns rows.

    A prompt longer than the model's context leaves room for is cut from the left, with a warning naming it;
    rows are written batch by batch, so the answers so far stay on disk if a later batch fails.
    """
    from instruct_tune.models.prompt_fit import context_budget, fit_prompt
    from instruct_tune.models.sampling import decode_responses, encode_prompts, sample_id_batches

    prompts = read_prompts(input_path)
    model, tokenizer = load_policy(policy)
    budget = context_budget(model, max_new_tokens)
    encoded = encode_prompts(tokenizer, prompts)
    ids = [fit_prompt(x, budget, f"{input_path}: prompt {i}") for i, x in enumerate(encoded, 1)]
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    rows = iter(prompts)
    written = 0
    with output_path.open("w", encoding="utf-8") as out, torch.no_grad():
        batches = sample_id_batches(
            model,
            tokenizer,
            ids,
            max_new_tokens=budget.max_new_tokens,
            temperature=temperature,
            seed=seed,
            batch_size=batch_size,
        )
        for rollout in batches:
            for text, eos in zip(decode_responses(tokenizer, rollout), rollout.has_eos.tolist(), strict=True):
                prompt = next(rows)
                row = {
                    "prompt": prompt[-1]["content"],
                    "messages": prompt,
                    "response": text,
                    "ended_with_eos": eos,
                }
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                written += 1
            out.flush()
    return written


def chat(
    policy: str,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    read: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
) -> list[dict]:
    """Chat in the terminal: each answer streams as it is generated and the history is kept for the next turn.

    `/history` prints it, `/reset` clears it, `/exit` or end of input (Ctrl-D) ends; returns the last history.
    When the history outgrows the model's context its oldest turns are dropped (a system turn is kept).
    """
    from transformers import TextStreamer

    from instruct_tune.models.prompt_fit import context_budget, trim_history
    from instruct_tune.models.sampling import left_pad, sample_responses

    model, tokenizer = load_policy(policy)
    budget = context_budget(model, max_new_tokens)
    device = next(model.parameters()).device
    history: list[dict] = []
    print(f"Chatting with {policy} (/history, /reset, /exit or Ctrl-D)", file=out, flush=True)
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            print(file=out)
            return history
        if line == "/exit":
            return history
        if line == "/history":
            for turn in history:
                print(f"[{turn['role']}] {turn['content']}", file=out, flush=True)
            continue
        if line == "/reset":
            history = []
            print("(history cleared)", file=out, flush=True)
            continue
        if not line:
            continue
        history, ids, dropped = trim_history(tokenizer, [*history, {"role": "user", "content": line}], budget)
        if dropped:
            note = (
                f"(dropped the {dropped} oldest turns to fit the model's context of {budget.context} tokens)"
            )
            print(note, file=out, flush=True)
        query, mask = left_pad([ids], tokenizer.pad_token_id)
        print("assistant> ", end="", file=out, flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        with torch.no_grad():
            rollout = sample_responses(
                model,
                tokenizer,
                query.to(device),
                mask.to(device),
                max_new_tokens=budget.max_new_tokens,
                temperature=temperature,
                streamer=streamer,
            )
        reply = tokenizer.decode(rollout.response[0], skip_special_tokens=True).strip()
        print(file=out, flush=True)
        history.append({"role": "assistant", "content": reply})
