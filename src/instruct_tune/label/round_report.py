"""The figures of a feedback round (`label.round`): reward-model accuracy on held-out new rankings, round.md.

Accuracy is measured as the reward stage measures its own (`evaluation.comparisons`): every pair of a held-out
ranking, the share the reward model orders right (exact ties half), overall and per task. The policies'
figures come from the round's one eval run (`metrics.json` keys `<figure>/round1`, `<figure>/round2`).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

LABELLERS = {
    "scripted": "the scripted labeller (the tiny gold judge, through the labelling app's HTTP API)",
    "human": "people in the labelling app",
}
STEP_NAMES = {
    "sample": "sample (`label new-project`: K responses of the round-1 policy per prompt)",
    "label": "label (`label serve` + labeller, every item)",
    "export": "export (`label export`, split train / held out)",
    "reward": "reward (retrain on old + new comparisons)",
    "ppo": "ppo (from SFT against the new reward model)",
    "eval": "eval (both rounds' policies against SFT)",
    "report": "report (both reward models on the held-out rankings)",
}


def reward_accuracy(reward_path: str | Path, rankings: str | Path, max_length: int | None) -> dict[str, Any]:
    """Pairwise accuracy and margin of a reward run folder on a rankings file, overall and per task."""
    from instruct_tune.data import load_source
    from instruct_tune.data.preference_groups import group_comparisons, tokenize_groups
    from instruct_tune.evaluation.comparisons import comparison_metrics, pair_differences
    from instruct_tune.models.reward import load_reward_model
    from instruct_tune.stages.data_sources import task_tags

    pairs, _ = load_source(str(rankings), "preference")
    rm = load_reward_model(reward_path, device="cpu")
    groups = tokenize_groups(group_comparisons(pairs), rm.tokenizer, max_length, "held-out")
    diffs, tasks = pair_differences(rm, groups)
    metrics = comparison_metrics(diffs, tasks, task_tags(tasks), prefix="heldout")
    return {**metrics, "heldout_comparisons": len(diffs), "heldout_prompts": len(groups)}


def win_difference(samples: Path) -> tuple[float, float, int] | None:
    """Round 2's gold win rate vs SFT less round 1's, from the eval's samples.jsonl (the same prompt and draw
    judged for both: ties half), with its standard error over prompts (the paired differences' spread)."""
    if not samples.is_file():
        return None
    gold = {}
    for line in samples.read_text().splitlines():
        row = json.loads(line)
        if row["decoding"] == "sampled" and row.get("gold") is not None:
            gold[row["policy"], row["index"], row["sample"]] = row["gold"]

    def win(policy: str, i: int, draw: int) -> float:
        gap = gold[policy, i, draw] - gold["sft", i, draw]
        return 0.5 if abs(gap) <= 1e-9 else float(gap > 0)  # gold_compare's rule

    by_prompt: dict[int, list[float]] = {}
    for policy, i, draw in gold:
        if policy == "round1":
            by_prompt.setdefault(i, []).append(win("round2", i, draw) - win("round1", i, draw))
    diffs = [statistics.fmean(d) for d in by_prompt.values()]
    if len(diffs) < 2:
        return None
    return statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs)), len(diffs)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def report_markdown(o: dict[str, Any], state: dict[str, Any], rd: Path) -> str:
    """round.md: what the round did, whether round 2 beats round 1, the figures and each step's wall time."""
    run = Path(o["run_dir"])
    ev = _json(rd / "eval" / "metrics.json")
    acc = state.get("accuracy", {})
    rm_eval = [_json(run / "reward" / "metrics.json"), _json(rd / "reward" / "metrics.json")]

    def both(key: str) -> list[Any]:
        return [ev.get(f"{key}/round1"), ev.get(f"{key}/round2")]

    win, greedy = both("win_rate_vs_sft_gold"), both("greedy/win_rate_vs_sft_gold")
    first = o["first_prompt"]
    held = acc.get("round1", {})
    lines = [
        f"# Round 2 of the human-feedback loop: {run}",
        "",
        f"The round-1 policy `{o['policy']}` sampled K={o['k']} responses for each of "
        f"{state.get('prompts_sampled')} prompts (`{o['prompts']}` from row {first + 1}; no eval prompt), "
        f"labelled by {LABELLERS[o['labeller']]}. Export: {state.get('export', '-')}. "
        f"The rankings of {state.get('train_prompts')} prompts joined the reward model's comparisons (weight "
        f"{o['new_weight']:g}); those of {state.get('heldout_prompts')} prompts were held out to measure both "
        "reward models. Round 2 retrained the reward model from SFT on the old comparisons plus the new ones, "
        "then ran PPO from SFT against it.",
        "",
    ]
    if None not in win:
        verdict = "yes" if win[1] > win[0] else "no"
        diff = win_difference(rd / "eval" / "samples.jsonl")
        noise = ""
        if diff is not None:
            within = "within" if abs(diff[0]) < 2 * diff[1] else "beyond"
            noise = (
                f" The difference is {within} sampling noise: its standard error over the {diff[2]} prompts "
                f"(paired, same prompts and draws) is {diff[1]:.3f}, so {abs(diff[0]) / diff[1]:.1f} standard "
                "errors."
                if diff[1] > 0
                else ""
            )
        lines += [
            f"**Round 2 beats round 1: {verdict}.** Gold win rate vs SFT {win[1]:.3f} against {win[0]:.3f} "
            f"({win[1] - win[0]:+.3f}; sampled, {ev.get('eval_prompts')} held-out prompts"
            + (f"; greedy {greedy[1]:.3f} against {greedy[0]:.3f})." if None not in greedy else ").")
            + noise,
            "",
        ]
    rows = [
        ("reward model", f"`{run / 'reward'}`", f"`{rd / 'reward'}`"),
        (
            f"RM accuracy on the held-out new rankings ({held.get('heldout_comparisons', '-')} comparisons of "
            f"{state.get('heldout_prompts', '-')} prompts)",
            *[_fmt(acc.get(r, {}).get("heldout_accuracy")) for r in ("round1", "round2")],
        ),
    ]
    tags = sorted(
        k[len("heldout_") : -len("_accuracy")]
        for k in held
        if k.endswith("_accuracy") and k != "heldout_accuracy"
    )
    rows += [
        (f"... {tag}", *[_fmt(acc.get(r, {}).get(f"heldout_{tag}_accuracy")) for r in ("round1", "round2")])
        for tag in tags
    ]
    rows += [
        (
            "RM accuracy on the reward stage's eval comparisons",
            *[_fmt(m.get("eval_accuracy")) for m in rm_eval],
        ),
        ("policy (PPO from SFT)", f"`{o['policy']}`", f"`{rd / 'ppo'}`"),
        ("gold win rate vs SFT, sampled", *map(_fmt, win)),
        ("gold win rate vs SFT, greedy", *map(_fmt, greedy)),
        (f"gold mean, sampled (SFT {_fmt(ev.get('gold_mean/sft'))})", *map(_fmt, both("gold_mean"))),
        ("RM win rate vs SFT (round-2 RM), sampled", *map(_fmt, both("win_rate_vs_sft_rm"))),
        ("KL vs SFT", *map(_fmt, both("kl_vs_sft"))),
    ]
    lines += ["| figure | round 1 | round 2 |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    steps = state.get("steps", {})
    lines += ["", "## Wall time of each step", "", "| step | seconds |", "| --- | --- |"]
    lines += [f"| {STEP_NAMES[s]} | {steps[s]:.0f} |" for s in STEP_NAMES if s in steps]
    lines += [
        f"| total | {sum(steps.values()):.0f} |",
        "",
        f"Eval's full table: `{rd / 'eval' / 'results.md'}`.",
    ]
    return "\n".join(lines) + "\n"


def write_report(o: dict[str, Any], state: dict[str, Any], rd: Path) -> Path:
    path = rd / "round.md"
    path.write_text(report_markdown(o, state, rd))
    return path
