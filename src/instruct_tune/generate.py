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
    """Answer every prompt of `input_path`; write JSONL rows (prompt, response, ended_with_eos); returns rows."""
    from instruct_tune.models.sampling import sample_texts

    prompts = read_prompts(input_path)
    model, tokenizer = load_policy(policy)
    with torch.no_grad():
        texts, ended = sample_texts(
            model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            batch_size=batch_size,
        )
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with output_path.open("w", encoding="utf-8") as out:
        for prompt, text, eos in zip(prompts, texts, ended, strict=True):
            row = {"prompt": prompt[-1]["content"], "messages": prompt, "response": text, "ended_with_eos": eos}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(texts)


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
    """
    from transformers import TextStreamer

    from instruct_tune.models.sampling import encode_prompts, left_pad, sample_responses

    model, tokenizer = load_policy(policy)
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
        history.append({"role": "user", "content": line})
        query, mask = left_pad(encode_prompts(tokenizer, [history]), tokenizer.pad_token_id)
        print("assistant> ", end="", file=out, flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        with torch.no_grad():
            rollout = sample_responses(
                model,
                tokenizer,
                query.to(device),
                mask.to(device),
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                streamer=streamer,
            )
        reply = tokenizer.decode(rollout.response[0], skip_special_tokens=True).strip()
        print(file=out, flush=True)
        history.append({"role": "assistant", "content": reply})
