"""Rankings of a policy's own samples by the gold judge: the tiny task's stand-in for InstructGPT's labellers.

InstructGPT's labellers ranked samples of its models, so the reward model learned to judge the answers PPO
would actually produce. The demonstrator's variants (`comparisons.jsonl`) show the demonstrator's mistakes; a
small SFT policy makes others (list items that are not in the prompt, sums some way off). This module samples
K answers of a policy folder per prompt at temperature 1, drops duplicates, unfinished answers and ties in gold
score, and writes one ranking row (best first) per prompt with at least two answers left:

    python -m instruct_tune.tiny.policy_comparisons --policy outputs/tiny/sft --out data/tiny/comparisons_policy.jsonl

A PPO run folder works the same way: as InstructGPT's later rounds collected comparisons of its RL policies'
samples, rankings of a PPO policy's answers show the reward model the answers it overrated.

Prompts come from the PPO prompt file, skipping any task of the reward model's eval comparisons so that eval
set stays unseen. The same policy folder and arguments give the same file.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path

from instruct_tune.tiny.task import gold_score, parse_prompt

logger = logging.getLogger(__name__)


def rank_answers(prompt: str, answers: list[tuple[str, bool]]) -> dict | None:
    """A ranking row of the distinct finished answers with distinct gold scores, or None if fewer than two."""
    kept: dict[str, float] = {}
    for text, ended in answers:
        text = text.strip()
        if not ended or not text or text in kept:
            continue
        score = gold_score(prompt, text)
        if all(abs(score - other) > 1e-9 for other in kept.values()):
            kept[text] = score
    if len(kept) < 2:
        return None
    responses = list(kept)
    ranking = sorted(range(len(responses)), key=lambda i: -kept[responses[i]])
    return {"prompt": prompt, "responses": responses, "ranking": ranking, "task": parse_prompt(prompt).family}


def policy_comparisons(
    policy: str,
    prompts_file: str | Path,
    exclude_file: str | Path | None,
    n_prompts: int,
    k: int = 4,
    max_new_tokens: int = 32,
    batch_size: int = 250,
) -> list[dict]:
    """Ranking rows of `k` temperature-1 samples of `policy` on the first `n_prompts` usable prompts."""
    from instruct_tune.config import ModelArguments
    from instruct_tune.models import load_model, load_tokenizer
    from instruct_tune.models.sampling import sample_texts

    excluded = set()
    if exclude_file:
        with Path(exclude_file).open() as f:
            excluded = {parse_prompt(json.loads(line)["prompt"]).key for line in f}
    with Path(prompts_file).open() as f:
        prompts = [json.loads(line)["prompt"] for line in f]
    prompts = [p for p in prompts if parse_prompt(p).key not in excluded][:n_prompts]
    args = ModelArguments(model_name_or_path=policy)
    tokenizer = load_tokenizer(args)
    model = load_model(args, tokenizer).eval()
    chats = [[{"role": "user", "content": p}] for p in prompts]
    samples = [
        sample_texts(
            model,
            tokenizer,
            chats,
            max_new_tokens=max_new_tokens,
            temperature=1.0,
            seed=10_000 * (i + 1),
            batch_size=batch_size,
        )
        for i in range(k)
    ]
    rows = []
    for j, prompt in enumerate(prompts):
        row = rank_answers(prompt, [(texts[j], ended[j]) for texts, ended in samples])
        if row is not None:
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    """CLI: sample, rank and write the policy comparisons; print rows per family."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", required=True, help="policy run folder (an SFT or PPO stage's)")
    ap.add_argument("--out", type=Path, default=Path("data/tiny/comparisons_policy.jsonl"))
    ap.add_argument("--prompts", default="data/tiny/prompts.jsonl")
    ap.add_argument("--exclude", default="data/tiny/comparisons_eval.jsonl", help="keep these tasks out")
    ap.add_argument("--n-prompts", type=int, default=6000)
    ap.add_argument("--k", type=int, default=4)
    args = ap.parse_args(argv)
    rows = policy_comparisons(args.policy, args.prompts, args.exclude, args.n_prompts, args.k)
    with args.out.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    families = Counter(row["task"] for row in rows)
    print(f"{args.out}: {len(rows)} rankings ({', '.join(f'{k} {v}' for k, v in sorted(families.items()))})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
