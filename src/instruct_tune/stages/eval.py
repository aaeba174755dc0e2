"""Evaluation (InstructGPT's comparisons on held-out prompts): each policy against its SFT start.

    instruct-tune eval --config recipes/configs/tiny/eval.yaml
    python recipes/eval.py --config recipes/configs/tiny/eval.yaml --policy_paths outputs/tiny/ppo outputs/tiny/ppo-ptx

Win rate, defined once (DESIGN.md): for every held-out prompt, one response from each policy with the same
decoding (sampled at the training temperature with fixed seeds, `samples_per_prompt` draws of them, each judged
on its own; greedy reported beside it); a judge compares
each policy's response with the SFT policy's; ties count half. Two judges: the reward model (higher
normalised score wins) and, where the task has one, the gold judge (`instruct_tune.tiny.task.gold_compare`;
a dataset has one when every prompt parses as a tiny-task prompt).

Reported per policy and decoding: mean reward, both win rates (overall and per task family), mean gold score
(overall and per family), share of perfect answers (gold == 1), exact match and ROUGE-L against the task's
answer, KL to the SFT policy (sampled only: sum over response tokens of log pi(y_t) - log pi_sft(y_t) on the
policy's own samples, logits divided by the sampling temperature, averaged over prompts), response length in
tokens (EOS included), share ending in EOS, and the perplexity of held-out plain text (InstructGPT's
"alignment tax"). The win rate, perplexity and reference figures come from the `evaluate` modules shipped in
`instruct_tune.metrics`.

The reward model reads a response as a finished assistant turn (the chat template closes it with EOS), so a
response cut at `max_new_tokens` is scored as if it had ended; PPO's missing-EOS penalty is not applied here,
the EOS share is reported beside the reward instead.

Outputs in `output_dir`: `metrics.json` (keys in `metrics_for`), `results.md` (also printed), `samples.jsonl`,
`config.yaml` and the plots `ppo_training.png`, `reward_hist.png` and `gold_by_family.png`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from instruct_tune.artifacts import CARD_FILE, append_to_card, is_hub_id, write_metrics
from instruct_tune.checkpoints import write_atomic
from instruct_tune.config import ConfigError, EvalStageConfig, ModelArguments, save_config
from instruct_tune.data import load_source
from instruct_tune.metrics import load_metric
from instruct_tune.models import load_model, load_tokenizer
from instruct_tune.models.sampling import decode_responses, sample_batches
from instruct_tune.ppo.core import logprobs_from_logits
from instruct_tune.ppo.models import lm_logits
from instruct_tune.stages.lengths import prompts_in_context
from instruct_tune.tiny import task as tiny_task

logger = logging.getLogger(__name__)

SFT = "sft"
SAMPLED, GREEDY = "sampled", "greedy"
RESULTS_FILE, SAMPLES_FILE = "results.md", "samples.jsonl"
EVAL_CARD_SECTION = "Evaluation against the SFT policy"
TRAINING_PLOT, REWARD_PLOT, FAMILY_PLOT = "ppo_training.png", "reward_hist.png", "gold_by_family.png"


# --- inputs ---------------------------------------------------------------------------------------------


@dataclass
class EvalPrompts:
    """The held-out prompts: chat messages, the text of the user's (last) turn, task tags, gold judge."""

    messages: list[list[dict[str, str]]]
    texts: list[str]
    tasks: list[str]
    has_gold: bool
    draws: int = 1  # the distinct prompts are listed this many times over (see `repeated`)

    @property
    def families(self) -> list[str]:
        return sorted(set(self.tasks))

    @property
    def distinct(self) -> int:
        """Number of distinct prompts: row i is prompt i % distinct, draw i // distinct."""
        return len(self.texts) // self.draws

    def repeated(self, times: int) -> EvalPrompts:
        """The prompts `times` over, one copy after another."""
        return EvalPrompts(
            self.messages * times, self.texts * times, self.tasks * times, self.has_gold, self.draws * times
        )


def last_user_text(messages: Sequence[Mapping[str, str]]) -> str:
    """The content of the last user turn of a chat prompt."""
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return users[-1] if users else ""


def has_gold_judge(texts: Sequence[str]) -> bool:
    """Whether the gold judge can score every prompt: each one parses as a tiny-task prompt."""
    try:
        for text in texts:
            tiny_task.parse_prompt(text)
    except ValueError:
        return False
    return bool(texts)


def load_prompts(args: EvalStageConfig) -> EvalPrompts:
    """The held-out prompts of `dataset_name` (any prompt-bearing format), the first `max_samples` of them."""
    ds, _ = load_source(args.dataset_name, "prompts", split=args.dataset_split)
    if args.max_samples is not None:
        ds = ds.select(range(min(args.max_samples, len(ds))))
    messages = [[dict(m) for m in prompt] for prompt in ds["prompt"]]
    texts = [last_user_text(m) for m in messages]
    return EvalPrompts(messages, texts, [str(t) for t in ds["task"]], has_gold_judge(texts))


def check_paths(args: EvalStageConfig) -> list[str]:
    """Refuse missing options and folders before loading anything; returns the policy names."""
    for option in ("sft_path", "reward_model_path"):
        if not getattr(args, option):
            raise ConfigError(f"{option}: not set (give the run folder)")
    if not args.policy_paths:
        raise ConfigError(
            "policy_paths: not set (give one or more policy run folders, e.g. outputs/tiny/ppo)"
        )
    folders = [("sft_path", args.sft_path), ("reward_model_path", args.reward_model_path)]
    folders += [("policy_paths", path) for path in args.policy_paths]
    for option, path in folders:
        if not Path(path).exists() and not is_hub_id(path):
            raise ConfigError(f"{option}: {path} does not exist")
    names = list(args.policy_names or [Path(p.rstrip("/")).name for p in args.policy_paths])
    if len(set(names)) < len(names) or SFT in names:
        raise ConfigError(
            f"policy_names: policies need distinct names other than '{SFT}' (got {names}); "
            "set `policy_names` to label them"
        )
    return names


def load_policy(
    path: str, option: str, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A policy ready to generate: its adapter chain merged (PPO adapter -> SFT -> base), on the device."""
    model_args = ModelArguments(model_name_or_path=path)
    try:
        tokenizer = load_tokenizer(model_args, trust_remote_code=trust_remote_code)
        model = load_model(model_args, tokenizer, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ConfigError(f"{option}: cannot load {path} ({err})") from err
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer


def check_tokenizers(sft: PreTrainedTokenizerBase, policy: PreTrainedTokenizerBase, path: str) -> None:
    """The KL compares token ids: a policy must use the SFT policy's vocabulary and EOS."""
    if sft.get_vocab() != policy.get_vocab() or sft.eos_token != policy.eos_token:
        raise ConfigError(
            f"policy_paths: {path} does not use the SFT policy's tokenizer (vocabulary or EOS differ)"
        )


# --- generation, KL and perplexity ----------------------------------------------------------------------


@dataclass
class Answers:
    """One policy's responses to the prompts under one decoding."""

    texts: list[str] = field(default_factory=list)
    ended: list[bool] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    kl: list[float] | None = None

    def repeated(self, times: int) -> Answers:
        """These answers `times` over, aligned with `EvalPrompts.repeated` (a greedy answer never changes)."""
        kl = self.kl * times if self.kl is not None else None
        return Answers(self.texts * times, self.ended * times, self.lengths * times, kl)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[dict[str, str]]],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int,
    reference: PreTrainedModel | None = None,
) -> Answers:
    """One response per prompt (temperature 0: greedy), in batches seeded `seed + first row` like `sample_texts`.

    With `reference` (the SFT model), also the KL of each response: sum over its tokens (EOS included) of
    log pi(y_t) - log pi_ref(y_t), both at `temperature`, on the policy's own sample.
    """
    answers = Answers(kl=[] if reference is not None else None)
    batches = sample_batches(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
    )
    for rollout in batches:
        answers.texts += decode_responses(tokenizer, rollout)
        answers.ended += rollout.has_eos.tolist()
        answers.lengths += rollout.response_mask.sum(1).tolist()
        if reference is not None:
            length = rollout.response.shape[1]
            inputs = (rollout.input_ids, rollout.attention_mask, length)
            logp = logprobs_from_logits(lm_logits(model, *inputs, packed=True), rollout.response, temperature)
            ref_logp = logprobs_from_logits(
                lm_logits(reference, *inputs, packed=True), rollout.response, temperature
            )
            answers.kl += ((logp - ref_logp) * rollout.response_mask).sum(1).tolist()
    return answers


def text_rows(
    tokenizer: PreTrainedTokenizerBase, path: str, last_rows: int | None, max_length: int
) -> list[list[int]]:
    """Token ids of the held-out text (`text` rows, the last `last_rows` of them), each ending in EOS."""
    ds, _ = load_source(path, "text")
    if last_rows is not None:
        ds = ds.select(range(max(0, len(ds) - last_rows), len(ds)))
    ids = tokenizer(list(ds["text"]), add_special_tokens=False)["input_ids"]
    return [(row + [tokenizer.eos_token_id])[:max_length] for row in ids if row]


@torch.no_grad()
def text_nll(
    model: PreTrainedModel, rows: Sequence[Sequence[int]], pad_token_id: int, batch_size: int
) -> tuple[list[float], list[int]]:
    """Summed negative log-likelihood of tokens 2..n of each row given its prefix, and their count."""
    device = next(model.parameters()).device
    nll: list[float] = []
    tokens: list[int] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(r) for r in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(batch):
            ids[i, : len(row)] = torch.as_tensor(row)
            mask[i, : len(row)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        logp = torch.gather(F.log_softmax(logits.float(), -1), 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        target = mask[:, 1:].float()
        nll += (-(logp * target).sum(1)).tolist()
        tokens += target.sum(1).long().tolist()
    return nll, tokens


def perplexity(nll: Sequence[float], tokens: Sequence[int]) -> float:
    """Token-level perplexity through the shipped `perplexity` metric module."""
    return float(load_metric("perplexity").compute(nll=list(nll), tokens=list(tokens))["perplexity"])


def score_all(
    rm: Any, prompts: EvalPrompts, answers: Mapping[tuple[str, str], Answers], batch_size: int
) -> dict[tuple[str, str], list[float]]:
    """Normalised reward of every answer; each distinct (prompt, response) is scored once, so equal
    responses of two policies get exactly equal scores (a tie)."""
    n = prompts.distinct  # a prompt's draws share its index, so a repeated answer is scored once
    unique: dict[tuple[int, str], int] = {}
    for run in answers.values():
        for i, text in enumerate(run.texts):
            unique.setdefault((i % n, text), len(unique))
    pairs = list(unique)
    values = rm.score([prompts.messages[i] for i, _ in pairs], [t for _, t in pairs], batch_size).tolist()
    return {key: [values[unique[(i % n, t)]] for i, t in enumerate(run.texts)] for key, run in answers.items()}


# --- metrics --------------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def _by_family(values: Sequence[float], tasks: Sequence[str]) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for value, task in zip(values, tasks, strict=True):
        groups.setdefault(task, []).append(value)
    return {task: _mean(v) for task, v in sorted(groups.items())}


def gold_scores(prompts: EvalPrompts, run: Answers) -> list[float]:
    return [
        tiny_task.gold_score(p, t, e) for p, t, e in zip(prompts.texts, run.texts, run.ended, strict=True)
    ]


def decoding_metrics(
    prompts: EvalPrompts, run: Answers, rewards: list[float], sft: Answers, sft_rewards: list[float]
) -> dict[str, float]:
    """The figures of one policy under one decoding, against the SFT policy's answers under the same one."""
    win_rate = load_metric("win_rate")
    rm = win_rate.compute(scores_a=rewards, scores_b=sft_rewards, groups=prompts.tasks)
    out = {
        "mean_reward": _mean(rewards),
        "win_rate_vs_sft_rm": rm["win_rate"],
        "response_length": _mean(run.lengths),
        "eos_share": _mean([float(e) for e in run.ended]),
    }
    if run.kl is not None:
        out["kl_vs_sft"] = _mean(run.kl)
    out.update({f"reward/{f}": v for f, v in _by_family(rewards, prompts.tasks).items()})
    out.update({f"win_rate_vs_sft_rm/{f}": v for f, v in rm["win_rate_by_group"].items()})
    if not prompts.has_gold:
        return out
    gold = gold_scores(prompts, run)
    outcomes = [
        tiny_task.gold_compare(p, a, b, ea, eb)
        for p, a, b, ea, eb in zip(prompts.texts, run.texts, sft.texts, run.ended, sft.ended, strict=True)
    ]
    judged = load_metric("win_rate", "outcomes").compute(outcomes=outcomes, groups=prompts.tasks)
    references = [tiny_task.parse_prompt(p).answer for p in prompts.texts]
    match = load_metric("reference_match").compute(predictions=run.texts, references=references)
    out.update(
        {
            "win_rate_vs_sft_gold": judged["win_rate"],
            "gold_mean": _mean(gold),
            "perfect_share": _mean([float(g == 1.0) for g in gold]),
            "exact_match": match["exact_match"],
            "rouge_l": match["rouge_l"],
        }
    )
    out.update({f"gold/{f}": v for f, v in _by_family(gold, prompts.tasks).items()})
    out.update({f"win_rate_vs_sft_gold/{f}": v for f, v in judged["win_rate_by_group"].items()})
    return out


HEADLINE = ("win_rate_vs_sft_gold", "win_rate_vs_sft_rm")
PER_SYSTEM = ("mean_reward", "gold_mean", "perplexity")


def metrics_for(
    per_policy: Mapping[str, Mapping[str, float]], first: str, meta: Mapping[str, Any]
) -> dict[str, Any]:
    """The flat `metrics.json` mapping.

    - `<policy>/<metric>` for every policy, `sft` included, with sampled decoding, and
      `<policy>/greedy/<metric>` with greedy decoding; per family `<policy>/gold/<family>`,
      `<policy>/reward/<family>`, `<policy>/win_rate_vs_sft_gold/<family>`, `<policy>/win_rate_vs_sft_rm/<family>`;
      `<policy>/perplexity` (independent of decoding).
    - Headline keys for the first of `policy_paths` (named "ppo" in the keys whatever its label, which
      `headline_policy` records): `win_rate_vs_sft_gold`, `win_rate_vs_sft_rm`, `kl_ppo_vs_sft`,
      `mean_reward_sft`, `mean_reward_ppo`, `gold_mean_sft`, `gold_mean_ppo`, `perplexity_sft`,
      `perplexity_ppo`, and the same under `greedy/` (no KL, no perplexity).
    """
    out: dict[str, Any] = dict(meta)
    for name, values in per_policy.items():
        out.update({f"{name}/{key}": value for key, value in values.items()})
    for prefix in ("", "greedy/"):
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
    out["headline_policy"] = first
    return out


# --- report ---------------------------------------------------------------------------------------------


def _cell(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def results_table(
    per_policy: Mapping[str, Mapping[str, float]], families: Sequence[str], has_gold: bool, prefix: str
) -> str:
    """A Markdown table, one row per policy (SFT first), for one decoding (`prefix` "" or "greedy/")."""
    columns = ["policy", "mean reward", "win rate vs SFT (RM)"]
    if has_gold:
        columns += ["win rate vs SFT (gold)", "gold mean", *[f"gold {f}" for f in families], "perfect"]
    columns += ["KL to SFT", "length", "EOS share", "perplexity"]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for name, m in per_policy.items():
        row = [name, _cell(m.get(f"{prefix}mean_reward")), _cell(m.get(f"{prefix}win_rate_vs_sft_rm"))]
        if has_gold:
            row += [_cell(m.get(f"{prefix}win_rate_vs_sft_gold")), _cell(m.get(f"{prefix}gold_mean"))]
            row += [_cell(m.get(f"{prefix}gold/{f}")) for f in families]
            row += [_cell(m.get(f"{prefix}perfect_share"))]
        row += [
            _cell(m.get(f"{prefix}kl_vs_sft")),
            _cell(m.get(f"{prefix}response_length"), 1),
            _cell(m.get(f"{prefix}eos_share")),
            _cell(m.get("perplexity"), 2),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def results_markdown(
    args: EvalStageConfig,
    prompts: EvalPrompts,
    per_policy: Mapping[str, Mapping[str, float]],
    folders: Mapping[str, str],
    plots: Sequence[str],
) -> str:
    sources = "\n".join(f"- `{name}`: `{folder}`" for name, folder in folders.items())
    judge = "the gold judge of the tiny task and the reward model" if prompts.has_gold else "the reward model"
    parts = [
        "# Evaluation against the SFT policy",
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
        results_table(per_policy, prompts.families, prompts.has_gold, ""),
    ]
    if args.greedy:
        parts += [
            "",
            "## Greedy",
            "",
            results_table(per_policy, prompts.families, prompts.has_gold, "greedy/"),
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
    parts += ["", *notes]
    if plots:
        parts += ["", "## Plots", "", *[f"![{Path(p).stem}]({p})" for p in plots]]
    return "\n".join(parts) + "\n"


def _answers_per_prompt(times: int) -> str:
    if times == 1:
        return "one response"
    return f"{times} sampled responses (each against the SFT policy's response of the same draw) and one greedy"


def card_section(report: str, output_dir: Path) -> str:
    """The results report as a section of a policy's model card: tables and notes, without the plots."""
    body = report.split("\n## Plots", 1)[0]
    body = body.replace("# Evaluation against the SFT policy\n", "", 1).replace("\n## ", "\n### ")
    return f"{body.strip()}\n\nFrom `{output_dir / RESULTS_FILE}` (plots there)."


def training_log(folder: str) -> list[dict[str, Any]]:
    """The per-step log of a PPO run folder (`trainer_state.json` entries that have a `step`)."""
    path = Path(folder) / "trainer_state.json"
    if not path.is_file():
        return []
    history = json.loads(path.read_text()).get("log_history", [])
    return [entry for entry in history if "step" in entry]


def plot_training(path: Path, logs: Mapping[str, list[dict[str, Any]]]) -> bool:
    """objective/scores and objective/kl over PPO steps, one line per policy; False when no log has them."""
    keys = ("objective/scores", "objective/kl")
    logs = {name: log for name, log in logs.items() if any(k in e for e in log for k in keys)}
    if not logs:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key in zip(axes, keys, strict=True):
        for name, log in logs.items():
            points = [(e["step"], e[key]) for e in log if key in e]
            ax.plot([s for s, _ in points], [v for _, v in points], marker=".", label=name)
        ax.set_xlabel("PPO step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_rewards(path: Path, rewards: Mapping[str, list[float]]) -> None:
    """Histogram of the reward-model scores of each policy's sampled responses."""
    plt = _pyplot()
    values = [v for vs in rewards.values() for v in vs]
    low, high = min(values), max(values)
    bins = [low + (high - low + 1e-9) * i / 30 for i in range(31)]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, vs in rewards.items():
        ax.hist(vs, bins=bins, histtype="step", linewidth=1.5, label=f"{name} (mean {_mean(vs):.2f})")
    ax.set_xlabel("reward (normalised: SFT samples average 0)")
    ax.set_ylabel("responses")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_families(path: Path, per_policy: Mapping[str, Mapping[str, float]], families: Sequence[str]) -> None:
    """Mean gold score per task family and policy (sampled), grouped bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.8 / len(per_policy)
    for i, (name, m) in enumerate(per_policy.items()):
        xs = [j + i * width for j in range(len(families))]
        ax.bar(xs, [m.get(f"gold/{f}", 0.0) for f in families], width=width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(families))], families)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean gold score (sampled)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _configure_logging() -> None:
    package_logger = logging.getLogger("instruct_tune")
    if not package_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[instruct_tune] %(message)s"))
        package_logger.addHandler(handler)
        package_logger.setLevel(logging.INFO)


# --- the stage ------------------------------------------------------------------------------------------


def run_eval(args: EvalStageConfig) -> Path:
    """Evaluate the policies against the SFT policy; write the eval folder and print the results table."""
    _configure_logging()
    if int(os.environ.get("RANK", "0")) != 0:  # one process does the evaluation under `accelerate launch`
        return Path(args.output_dir)
    names = check_paths(args)
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    distinct = load_prompts(args)
    sft_model, sft_tokenizer = load_policy(args.sft_path, "sft_path", args.trust_remote_code)
    # Prompts longer than the context less max_new_tokens are skipped and counted (`eval_prompts_skipped`).
    keep = prompts_in_context(
        sft_tokenizer, distinct.messages, sft_model, args.max_new_tokens, args.dataset_name
    )
    skipped = len(distinct.texts) - len(keep)
    texts = [distinct.texts[i] for i in keep]
    messages, tasks = [distinct.messages[i] for i in keep], [distinct.tasks[i] for i in keep]
    distinct = EvalPrompts(messages, texts, tasks, has_gold_judge(texts))
    times = args.samples_per_prompt
    # Every answer list below is aligned with `prompts`: the distinct prompts `times` over.
    prompts = distinct.repeated(times)
    logger.info(
        "Evaluating on %d prompts (%s), %d sampled answers each; gold judge: %s",
        len(distinct.texts),
        ", ".join(distinct.families),
        times,
        "yes" if distinct.has_gold else "no (reward model only)",
    )
    decodings = {SAMPLED: args.temperature, **({GREEDY: 0.0} if args.greedy else {})}
    folders = {SFT: args.sft_path, **dict(zip(names, args.policy_paths, strict=True))}

    text_ids = (
        text_rows(sft_tokenizer, args.ptx_eval_dataset, args.ptx_eval_rows, args.ptx_eval_max_length)
        if args.ptx_eval_dataset
        else []
    )
    answers: dict[tuple[str, str], Answers] = {}
    ppl: dict[str, float] = {}
    for name, folder in folders.items():
        started = time.perf_counter()
        if name == SFT:
            model, tokenizer = sft_model, sft_tokenizer
        else:
            model, tokenizer = load_policy(folder, "policy_paths", args.trust_remote_code)
            check_tokenizers(sft_tokenizer, tokenizer, folder)
        for decoding, temperature in decodings.items():
            reference = sft_model if decoding == SAMPLED and name != SFT else None
            run = generate(
                model,
                tokenizer,
                (prompts if decoding == SAMPLED else distinct).messages,
                max_new_tokens=args.max_new_tokens,
                temperature=temperature,
                seed=args.seed,
                batch_size=args.batch_size,
                reference=reference,
            )
            answers[(name, decoding)] = run if decoding == SAMPLED else run.repeated(times)
        if name == SFT:
            answers[(SFT, SAMPLED)].kl = [0.0] * len(prompts.texts)  # sum of log pi_sft - log pi_sft
        if text_ids:
            ppl[name] = perplexity(*text_nll(model, text_ids, tokenizer.pad_token_id, args.batch_size))
        logger.info("%s: answered in %.1f s", name, time.perf_counter() - started)
        if name != SFT:
            del model

    del sft_model
    from instruct_tune.models.reward import load_reward_model

    rm = load_reward_model(args.reward_model_path, trust_remote_code=args.trust_remote_code)
    rewards = score_all(rm, prompts, answers, args.batch_size)
    del rm

    per_policy: dict[str, dict[str, float]] = {}
    for name in folders:
        values: dict[str, float] = {}
        for decoding in decodings:
            prefix = "" if decoding == SAMPLED else f"{decoding}/"
            figures = decoding_metrics(
                prompts,
                answers[(name, decoding)],
                rewards[(name, decoding)],
                answers[(SFT, decoding)],
                rewards[(SFT, decoding)],
            )
            values.update({f"{prefix}{k}": v for k, v in figures.items()})
        if name in ppl:
            values["perplexity"] = ppl[name]
        per_policy[name] = values

    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(output_dir, args)
    meta = {"eval_prompts": len(distinct.texts), "samples_per_prompt": times, "gold_judge": prompts.has_gold}
    meta["eval_prompts_skipped"] = skipped  # longer than the model's context less max_new_tokens
    write_metrics(output_dir, metrics_for(per_policy, names[0], meta))
    write_samples(output_dir / SAMPLES_FILE, prompts, answers, rewards)

    plots = []
    logs = {name: training_log(folder) for name, folder in folders.items() if name != SFT}
    if plot_training(output_dir / TRAINING_PLOT, logs):
        plots.append(TRAINING_PLOT)
    plot_rewards(output_dir / REWARD_PLOT, {name: rewards[(name, SAMPLED)] for name in folders})
    plots.append(REWARD_PLOT)
    if prompts.has_gold:
        plot_families(output_dir / FAMILY_PLOT, per_policy, prompts.families)
        plots.append(FAMILY_PLOT)
    report = results_markdown(args, distinct, per_policy, folders, plots)
    for name, folder in folders.items():
        if name != SFT and (Path(folder) / CARD_FILE).is_file():
            append_to_card(folder, EVAL_CARD_SECTION, card_section(report, output_dir))
    write_atomic(output_dir / RESULTS_FILE, report)  # last: make's sign of a finished eval folder
    logger.info("Wrote eval folder %s", output_dir)
    print(report)
    return output_dir


def write_samples(
    path: Path,
    prompts: EvalPrompts,
    answers: Mapping[tuple[str, str], Answers],
    rewards: Mapping[tuple[str, str], list[float]],
) -> None:
    """One JSON line per (policy, decoding, prompt, sample): the response and its scores.

    A row names its prompt `index` and `sample` draw (`prompts` may be repeated); a greedy answer is written
    once."""
    distinct = prompts.distinct
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
                    "reward": rewards[(name, decoding)][i],
                }
                if prompts.has_gold:
                    row["gold"] = tiny_task.gold_score(prompts.texts[i], text, run.ended[i])
                if run.kl is not None:
                    row["kl"] = run.kl[i]
                out.write(json.dumps(row) + "\n")
