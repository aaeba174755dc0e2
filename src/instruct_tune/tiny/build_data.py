"""Generate the shipped tiny-task data set (``data/tiny``) deterministically from a seed.

    python -m instruct_tune.tiny.build_data --out data/tiny --seed 0

Files: sft.jsonl, sft_eval.jsonl, comparisons.jsonl, comparisons_eval.jsonl, prompts.jsonl,
heldout_prompts.jsonl, pretrain.jsonl. Pure standard library.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from instruct_tune.tiny.task import (
    FAMILIES,
    WORDS,
    NoisyDemonstrator,
    Task,
    gold_score,
    is_heldout,
    sample_task,
)

__all__ = ["EXTRA_COMPARISONS", "FILES", "build_tiny_data", "imperfect_shares", "main", "make_pretrain_text"]

FILES: tuple[str, ...] = (
    "sft.jsonl",
    "sft_eval.jsonl",
    "comparisons.jsonl",
    "comparisons_eval.jsonl",
    "prompts.jsonl",
    "heldout_prompts.jsonl",
    "pretrain.jsonl",
)
K = 4  # responses per comparison row
# Training comparisons added after the balanced ones, per family, as a share of `n_comparisons`: the families
# whose rankings the reward model learns slowest. Measured on the tiny default (reward model of the SFT run
# folder, 3 epochs): adding only add comparisons, 2000 -> 6000 add prompts raised eval accuracy on add from
# 0.82 to 0.90; reverse alone, 2000 -> 6000 prompts, from 0.87 to 0.96. Rows of add are the cheapest to train
# (23 tokens a prompt with its 4 responses, against 51 for reverse and 54 for sort).
EXTRA_COMPARISONS: dict[str, float] = {"add": 0.5, "reverse": 0.25}
_MAX_PRETRAIN_CHARS = 160


def _rng(seed: int, name: str) -> random.Random:
    """An independent, stable stream per output file (str seeds hash with SHA-512, not the salted hash())."""
    return random.Random(f"instruct-tune-tiny/{seed}/{name}")


def _write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    n = 0
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def _sft_row(task: Task, demo: str) -> dict:
    return {
        "messages": [{"role": "user", "content": task.prompt}, {"role": "assistant", "content": demo}],
        "task": task.family,
    }


def _comparison_row(task: Task, demo: NoisyDemonstrator, rng: random.Random) -> dict:
    responses = demo.variants(task, rng, K)
    rng.shuffle(responses)
    scores = [gold_score(task.prompt, r) for r in responses]
    ranking = sorted(range(K), key=lambda i: -scores[i])
    return {"prompt": task.prompt, "responses": responses, "ranking": ranking, "task": task.family}


def _unique_tasks(
    rng: random.Random, n: int, split: str, ident: Callable[[Task], str], exclude: set[str] | None = None
) -> list[Task]:
    """``n`` tasks, families in round-robin order, no two (and none in ``exclude``) with the same ident."""
    seen = set(exclude or ())
    out: list[Task] = []
    for i in range(n):
        family = FAMILIES[i % len(FAMILIES)]
        for _ in range(100_000):
            task = sample_task(rng, family, split)
            if ident(task) not in seen:
                break
        else:
            raise RuntimeError(f"ran out of distinct {split} {family} tasks after {i} rows")
        seen.add(ident(task))
        out.append(task)
    return out


def _tasks(
    rng: random.Random,
    n: int,
    exclude: Callable[[Task], bool] | None = None,
    families: tuple[str, ...] = FAMILIES,
) -> list[Task]:
    """``n`` train-split tasks, ``families`` round-robin, skipping those ``exclude`` rejects."""
    out: list[Task] = []
    for i in range(n):
        family = families[i % len(families)]
        task = sample_task(rng, family, "train")
        while exclude is not None and exclude(task):
            task = sample_task(rng, family, "train")
        out.append(task)
    return out


# ------------------------------------------------------------------------------------------------ pretrain


def _not_heldout_add(a: int, b: int) -> bool:
    return not is_heldout(Task("add", (a, b)))


def _ascending(rng: random.Random) -> list[int]:
    while True:
        items = sorted(rng.sample(range(100), rng.randint(3, 6)))
        if len(items) > 5 or not is_heldout(Task("sort", tuple(items))):
            return items


def _snippet(rng: random.Random) -> str:
    kind = rng.randrange(9)
    w = rng.choice(WORDS)
    if kind == 0:  # counting
        start, step = rng.randrange(95), rng.choice((1, 1, 1, 2, 5, 10))
        seq = [x for x in range(start, 100, step)][: rng.randint(4, 9)]
        sep = rng.choice((" ", ", "))
        return sep.join(str(x) for x in seq) + "."
    if kind == 1:  # number facts
        while True:
            a, b = rng.randrange(100), rng.randrange(100)
            if _not_heldout_add(a, b):
                break
        return rng.choice(
            (
                f"{a} plus {b} is {a + b}.",
                f"{a} and {b} make {a + b}.",
                f"{a + b} minus {b} is {a}.",
                f"{a} + {b} = {a + b}.",
            )
        )
    if kind == 2:  # ascending runs
        items = _ascending(rng)
        return rng.choice((" ", ", ")).join(str(x) for x in items) + rng.choice(("", "."))
    if kind == 3:  # a list of words
        return ", ".join(rng.sample(WORDS, rng.randint(3, 6))) + "."
    if kind == 4:  # a word said several times
        return " ".join([w] * rng.randint(2, 6)) + "."
    if kind == 5:  # numbers and words
        n = rng.randint(2, 9)
        return rng.choice(
            (f"i see {n} of the {w}.", f"{n} times {w}: " + " ".join([w] * n) + ".", f"{w} {n}.")
        )
    if kind == 6:  # comparisons between numbers
        a, b = rng.sample(range(100), 2)
        lo, hi = min(a, b), max(a, b)
        return rng.choice(
            (f"{lo} is less than {hi}.", f"{hi} is more than {lo}.", f"{lo} comes before {hi}.")
        )
    w2 = rng.choice(WORDS)
    return rng.choice(
        (
            f"the {w} is by the {w2}.",
            f"a {w} and a {w2}.",
            f"i like the {w}.",
            f"the {w} and the {w2} sat in the {rng.choice(WORDS)}.",
            f"look at the {w}!",
            f"where is my {w}?",
            f"{w} then {w2}.",
        )
    )


def make_pretrain_text(rng: random.Random) -> str:
    """One short plain-text document (no instructions) over the task vocabulary."""
    parts = [_snippet(rng)]
    target = rng.randint(40, _MAX_PRETRAIN_CHARS)
    while True:
        nxt = _snippet(rng)
        if len(" ".join(parts)) + 1 + len(nxt) > target:
            break
        parts.append(nxt)
    text = " ".join(parts)
    return text[0].upper() + text[1:] if rng.random() < 0.5 else text


# ------------------------------------------------------------------------------------------------- builder


def build_tiny_data(
    out_dir: Path,
    seed: int = 0,
    n_sft: int = 40000,
    n_sft_eval: int = 1000,
    n_comparisons: int = 8000,
    n_prompts: int = 8000,
    n_heldout: int = 400,
    n_pretrain: int = 30000,
    n_comparisons_eval: int = 500,
    extra_comparisons: Mapping[str, float] | None = None,
) -> dict[str, int]:
    """Write the tiny data set to ``out_dir`` (same seed -> byte-identical files); return rows per file.

    Families are balanced (round-robin), except that comparisons.jsonl continues its ``n_comparisons``
    balanced rows with ``round(share * n_comparisons)`` more rows of each family in ``extra_comparisons``
    (default :data:`EXTRA_COMPARISONS`; ``{}`` for none), drawn from their own random stream so the other rows
    and files do not depend on them. Instruction files use train-split tasks except heldout_prompts.jsonl
    (unique held-out tasks). sft_eval prompts never occur in sft.jsonl, and comparisons_eval tasks (by key)
    never occur in comparisons.jsonl.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    demo = NoisyDemonstrator()
    counts: dict[str, int] = {}

    rng = _rng(seed, "sft")
    eval_tasks = _unique_tasks(rng, n_sft_eval, "train", lambda t: t.prompt)
    eval_prompts = {t.prompt for t in eval_tasks}
    sft_tasks = _tasks(rng, n_sft, exclude=lambda t: t.prompt in eval_prompts)
    counts["sft_eval.jsonl"] = _write_jsonl(
        out_dir / "sft_eval.jsonl", (_sft_row(t, demo.respond(t, rng)) for t in eval_tasks)
    )
    counts["sft.jsonl"] = _write_jsonl(
        out_dir / "sft.jsonl", (_sft_row(t, demo.respond(t, rng)) for t in sft_tasks)
    )

    rng = _rng(seed, "comparisons")
    ceval_tasks = _unique_tasks(rng, n_comparisons_eval, "train", lambda t: t.key)
    ceval_keys = {t.key for t in ceval_tasks}
    comp_tasks = _tasks(rng, n_comparisons, exclude=lambda t: t.key in ceval_keys)
    counts["comparisons_eval.jsonl"] = _write_jsonl(
        out_dir / "comparisons_eval.jsonl", (_comparison_row(t, demo, rng) for t in ceval_tasks)
    )
    comp_rows = [_comparison_row(t, demo, rng) for t in comp_tasks]
    rng = _rng(seed, "comparisons-extra")
    for family, share in (EXTRA_COMPARISONS if extra_comparisons is None else extra_comparisons).items():
        if family not in FAMILIES:
            raise ValueError(f"extra_comparisons: unknown family {family!r}")
        extra = _tasks(rng, round(share * n_comparisons), lambda t: t.key in ceval_keys, (family,))
        comp_rows += [_comparison_row(t, demo, rng) for t in extra]
    counts["comparisons.jsonl"] = _write_jsonl(out_dir / "comparisons.jsonl", comp_rows)

    rng = _rng(seed, "prompts")
    counts["prompts.jsonl"] = _write_jsonl(
        out_dir / "prompts.jsonl", ({"prompt": t.prompt, "task": t.family} for t in _tasks(rng, n_prompts))
    )
    rng = _rng(seed, "heldout")
    held = _unique_tasks(rng, n_heldout, "heldout", lambda t: t.key)
    counts["heldout_prompts.jsonl"] = _write_jsonl(
        out_dir / "heldout_prompts.jsonl", ({"prompt": t.prompt, "task": t.family} for t in held)
    )
    rng = _rng(seed, "pretrain")
    counts["pretrain.jsonl"] = _write_jsonl(
        out_dir / "pretrain.jsonl", ({"text": make_pretrain_text(rng)} for _ in range(n_pretrain))
    )
    return {name: counts[name] for name in FILES}


def imperfect_shares(sft_path: Path) -> dict[str, float]:
    """Share of demonstrations in an SFT jsonl with gold score < 1, per family and ``"all"``."""
    bad: dict[str, int] = {}
    total: dict[str, int] = {}
    with Path(sft_path).open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            prompt, response = row["messages"][0]["content"], row["messages"][1]["content"]
            fam = row["task"]
            total[fam] = total.get(fam, 0) + 1
            bad[fam] = bad.get(fam, 0) + (gold_score(prompt, response) < 1.0)
    shares = {fam: bad[fam] / total[fam] for fam in FAMILIES if fam in total}
    shares["all"] = sum(bad.values()) / max(1, sum(total.values()))
    return shares


def main(argv: list[str] | None = None) -> None:
    """CLI: build the data set and print row counts, file sizes and imperfect-demonstration shares."""
    ap = argparse.ArgumentParser(description="Build the tiny-task data set.")
    ap.add_argument("--out", type=Path, default=Path("data/tiny"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-sft", type=int, default=40000)
    ap.add_argument("--n-sft-eval", type=int, default=1000)
    ap.add_argument("--n-comparisons", type=int, default=8000)
    ap.add_argument("--n-comparisons-eval", type=int, default=500)
    ap.add_argument("--n-prompts", type=int, default=8000)
    ap.add_argument("--n-heldout", type=int, default=400)
    ap.add_argument("--n-pretrain", type=int, default=30000)
    ap.add_argument(
        "--extra-comparisons",
        default=",".join(f"{family}={share}" for family, share in EXTRA_COMPARISONS.items()),
        help="family=share,...: extra comparison rows per family, as a share of --n-comparisons ('' for none)",
    )
    args = ap.parse_args(argv)
    extra = dict(item.split("=") for item in args.extra_comparisons.split(",") if item)
    counts = build_tiny_data(
        args.out,
        seed=args.seed,
        n_sft=args.n_sft,
        n_sft_eval=args.n_sft_eval,
        n_comparisons=args.n_comparisons,
        n_prompts=args.n_prompts,
        n_heldout=args.n_heldout,
        n_pretrain=args.n_pretrain,
        n_comparisons_eval=args.n_comparisons_eval,
        extra_comparisons={family: float(share) for family, share in extra.items()},
    )
    total_bytes = 0
    for name, n in counts.items():
        size = (args.out / name).stat().st_size
        total_bytes += size
        print(f"{name:24s} {n:7d} rows {size / 1e6:7.2f} MB")
    print(f"{'total':24s} {sum(counts.values()):7d} rows {total_bytes / 1e6:7.2f} MB")
    shares = imperfect_shares(args.out / "sft.jsonl")
    print(
        "imperfect demonstrations (gold < 1) in sft.jsonl: "
        + ", ".join(f"{k} {v:.3f}" for k, v in shares.items())
    )


if __name__ == "__main__":
    main()
