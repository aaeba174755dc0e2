"""Eval's reports: the flat `metrics.json` mapping, the results tables, the model-card section, samples.jsonl."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from instruct_tune.artifacts import read_metrics
from instruct_tune.config import EvalStageConfig
from instruct_tune.evaluation.metrics import (
    GOLD,
    RM,
    SAMPLED,
    SFT,
    AnswerSets,
    EvalPrompts,
    Verdicts,
    mean_key,
)

RESULTS_FILE, SAMPLES_FILE = "results.md", "samples.jsonl"
TITLE = "Evaluation against the SFT policy"

# Deprecated (one release): headline keys of the first policy, named "ppo" whatever its label
# (`win_rate_vs_sft_gold`, `mean_reward_ppo`, `kl_ppo_vs_sft`...). Read `<figure>/<policy>` instead.
HEADLINE = ("win_rate_vs_sft_gold", "win_rate_vs_sft_rm")
PER_SYSTEM = ("mean_reward", "gold_mean", "perplexity")


def metrics_for(
    per_policy: Mapping[str, Mapping[str, float]],
    names: Sequence[str],
    meta: Mapping[str, Any],
    labels: Sequence[str] = (RM, GOLD),
) -> dict[str, Any]:
    """The flat `metrics.json` mapping.

    - `<policy>/<metric>` for every policy, `sft` included, with sampled decoding, and
      `<policy>/greedy/<metric>` with greedy decoding; per family `<policy>/gold/<family>`,
      `<policy>/reward/<family>`, `<policy>/win_rate_vs_sft_<judge>/<family>`; `<policy>/perplexity`.
    - Headline keys by policy name: `<figure>/<policy>` and `greedy/<figure>/<policy>`, for each judge label
      in `labels` its mean (`mean_reward`, `gold_mean`, `<label>_mean`) for every policy and
      `win_rate_vs_sft_<label>` for the policies of `names`; `kl_vs_sft/<policy>` and `perplexity/<policy>`.
    - Deprecated, for one release: the first policy's headline keys named "ppo" whatever its label
      (`headline_policy` records it): `win_rate_vs_sft_gold`, `win_rate_vs_sft_rm`, `kl_ppo_vs_sft`,
      `mean_reward_sft`, `mean_reward_ppo`, `gold_mean_sft`, `gold_mean_ppo`, `perplexity_sft`,
      `perplexity_ppo`, and the same under `greedy/` (no KL, no perplexity).
    """
    out: dict[str, Any] = dict(meta)
    for name, values in per_policy.items():
        out.update({f"{name}/{key}": value for key, value in values.items()})
    means = [mean_key(label) for label in labels] + ["perplexity"]
    compared = [f"win_rate_vs_sft_{label}" for label in labels] + ["kl_vs_sft"]
    for prefix in ("", "greedy/"):
        for name, values in per_policy.items():
            for figure in means + (compared if name in names else []):
                if f"{prefix}{figure}" in values:  # perplexity and KL exist for sampling only
                    out[f"{prefix}{figure}/{name}"] = values[f"{prefix}{figure}"]
        out.update(_deprecated_headline(per_policy, names[0], prefix))
    out["headline_policy"] = names[0]
    return out


def _deprecated_headline(per_policy: Mapping[str, Mapping[str, float]], first: str, prefix: str) -> dict:
    out = {}
    head, sft = per_policy[first], per_policy[SFT]
    for key in HEADLINE:
        if f"{prefix}{key}" in head:
            out[f"{prefix}{key}"] = head[f"{prefix}{key}"]
    for key in PER_SYSTEM:
        for system, values in (("sft", sft), ("ppo", head)):
            if f"{prefix}{key}" in values and not (prefix and key == "perplexity"):
                out[f"{prefix}{key}_{system}"] = values[f"{prefix}{key}"]
    if f"{prefix}kl_vs_sft" in head:
        out[f"{prefix}kl_ppo_vs_sft"] = head[f"{prefix}kl_vs_sft"]
    return out


# What each policy's training cost, read from its run folder's metrics.json (`training_cost`): the stage's
# training wall time, the completions it sampled (PPO's `episodes`, GRPO/RLOO's `train_episodes`; none for DPO,
# which samples nothing) and the training process's peak resident memory.
COSTS = (("train_runtime", "train s", 0), ("train_episodes", "episodes", 0), ("peak_rss_mib", "peak RSS MiB", 0))


def training_cost(folder: str | Path) -> dict[str, float]:
    """`train_runtime`, `train_episodes` and `peak_rss_mib` of a policy run folder, those it recorded."""
    recorded = read_metrics(folder)
    if "train_episodes" not in recorded and "episodes" in recorded:  # PPO logs its episode count as `episodes`
        recorded["train_episodes"] = recorded["episodes"]
    return {key: float(recorded[key]) for key, _, _ in COSTS if isinstance(recorded.get(key), int | float)}


def _cell(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def results_table(
    per_policy: Mapping[str, Mapping[str, float]],
    families: Sequence[str],
    has_gold: bool,
    prefix: str,
    extra_labels: Sequence[str] = (),
) -> str:
    """A Markdown table, one row per policy (SFT first), for one decoding (`prefix` "" or "greedy/")."""
    columns = ["policy", "mean reward", "win rate vs SFT (RM)"]
    if has_gold:
        columns += ["win rate vs SFT (gold)", "gold mean", *[f"gold {f}" for f in families], "perfect"]
    for label in extra_labels:
        columns += [f"mean {label}", f"win rate vs SFT ({label})"]
    columns += ["KL to SFT", "length", "EOS share", "perplexity"]
    costs = not prefix and any(key in m for m in per_policy.values() for key, _, _ in COSTS)
    if costs:  # the training cost, once (beside the sampled figures)
        columns += [label for _, label, _ in COSTS]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for name, m in per_policy.items():
        row = [name, _cell(m.get(f"{prefix}mean_reward")), _cell(m.get(f"{prefix}win_rate_vs_sft_rm"))]
        if has_gold:
            row += [_cell(m.get(f"{prefix}win_rate_vs_sft_gold")), _cell(m.get(f"{prefix}gold_mean"))]
            row += [_cell(m.get(f"{prefix}gold/{f}")) for f in families]
            row += [_cell(m.get(f"{prefix}perfect_share"))]
        for label in extra_labels:
            row += [
                _cell(m.get(f"{prefix}{mean_key(label)}")),
                _cell(m.get(f"{prefix}win_rate_vs_sft_{label}")),
            ]
        row += [
            _cell(m.get(f"{prefix}kl_vs_sft")),
            _cell(m.get(f"{prefix}response_length"), 1),
            _cell(m.get(f"{prefix}eos_share")),
            _cell(m.get("perplexity"), 2),
        ]
        if costs:
            row += [_cell(m.get(key), digits) for key, _, digits in COSTS]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def results_markdown(
    args: EvalStageConfig,
    prompts: EvalPrompts,
    per_policy: Mapping[str, Mapping[str, float]],
    folders: Mapping[str, str],
    plots: Sequence[str],
    verdicts: Sequence[Verdicts],
) -> str:
    """`results.md`: where the figures come from, a table per decoding, notes and the plots."""
    sources = "\n".join(f"- `{name}`: `{folder}`" for name, folder in folders.items())
    labels = [v.label for v in verdicts]
    has_gold, extras = GOLD in labels, [label for label in labels if label not in (RM, GOLD)]
    # the gold judge first, then the extra judges, the reward model last
    order = sorted(verdicts, key=lambda v: (v.label != GOLD, v.label == RM))
    named = [v.judge.description for v in order]
    judge = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]
    parts = [
        f"# {TITLE}",
        "",
        f"{len(prompts.texts)} held-out prompts from `{args.dataset_name}`, "
        f"{_answers_per_prompt(args.samples_per_prompt)} per policy; "
        f"judged by {judge} against the SFT policy's response to the same prompt (ties count half). "
        f"Reward model: `{args.reward_model_path}`. Up to {args.max_new_tokens} new tokens.",
        "",
        sources,
        "",
        f"## Sampled (temperature {args.temperature}, seed {args.seed})",
        "",
        results_table(per_policy, prompts.families, has_gold, "", extras),
    ]
    if args.greedy:
        parts += [
            "",
            "## Greedy",
            "",
            results_table(per_policy, prompts.families, has_gold, "greedy/", extras),
        ]
    notes = [
        "KL: mean over prompts of sum over response tokens of log pi - log pi_sft, on the policy's own samples.",
        "Length: response tokens, EOS included. Perplexity: "
        + (
            f"last {args.ptx_eval_rows or 'all'} rows of `{args.ptx_eval_dataset}`, up to {args.ptx_eval_max_length} tokens each."
            if args.ptx_eval_dataset
            else "not measured (no `ptx_eval_dataset`)."
        ),
    ]
    if any(key in m for m in per_policy.values() for key, _, _ in COSTS):
        notes.append(
            "Train s, episodes, peak RSS: from each policy's run folder (`metrics.json`): the training stage's "
            "wall time, the completions it sampled (none for SFT and DPO) and its process's peak resident memory."
        )
    parts += ["", *notes]
    if plots:
        parts += ["", "## Plots", "", *[f"![{Path(p).stem}]({p})" for p in plots]]
    return "\n".join(parts) + "\n"


def _answers_per_prompt(times: int) -> str:
    if times == 1:
        return "one response"
    return (
        f"{times} sampled responses (each against the SFT policy's response of the same draw) and one greedy"
    )


def card_section(report: str, output_dir: Path) -> str:
    """The results report as a section of a policy's model card: tables and notes, without the plots."""
    body = report.split("\n## Plots", 1)[0]
    body = body.replace(f"# {TITLE}\n", "", 1).replace("\n## ", "\n### ")
    return f"{body.strip()}\n\nFrom `{output_dir / RESULTS_FILE}` (plots there)."


def write_samples(
    path: Path, prompts: EvalPrompts, answers: AnswerSets, verdicts: Sequence[Verdicts]
) -> None:
    """One JSON line per (policy, decoding, prompt, sample): the response and each judge's score of it
    (`reward`, `gold`, `<label>`).

    A row names its prompt `index` and `sample` draw (`prompts` may be repeated); a greedy answer is written
    once."""
    distinct = prompts.distinct
    fields = [("reward" if v.label == RM else v.label, v) for v in verdicts]
    with path.open("w") as out:
        for (name, decoding), run in answers.items():
            for i, text in enumerate(run.texts):
                sample = i // distinct
                if decoding != SAMPLED and sample > 0:
                    break
                row: dict[str, Any] = {
                    "policy": name,
                    "decoding": decoding,
                    "index": i % distinct,
                    "sample": sample,
                    "task": prompts.tasks[i],
                    "prompt": prompts.texts[i],
                    "response": text,
                    "ended_with_eos": run.ended[i],
                    "length": run.lengths[i],
                }
                row.update({field: verdict.scores[(name, decoding)][i] for field, verdict in fields})
                if run.kl is not None:
                    row["kl"] = run.kl[i]
                out.write(json.dumps(row) + "\n")
