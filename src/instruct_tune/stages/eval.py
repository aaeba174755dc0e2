"""Evaluation (InstructGPT's comparisons on held-out prompts): each policy against its SFT start.

    instruct-tune eval --config recipes/configs/tiny/eval.yaml
    python recipes/eval.py --config recipes/configs/tiny/eval.yaml --policy_paths outputs/tiny/ppo outputs/tiny/ppo-ptx

For every held-out prompt, one response from each policy with the same decoding (sampled at the training
temperature with fixed seeds, `samples_per_prompt` draws of them, each judged on its own; greedy reported
beside it); each judge compares each policy's response with the SFT policy's (ties count half,
`instruct_tune.evaluation.metrics`). Judges are chosen by name (`instruct_tune.evaluation.judges`): the reward
model always, the `gold_judge` (default `tiny_gold`: a prompt it cannot parse is an error naming its row) and
any further `judges`.

Reported per policy and decoding: mean reward, each judge's win rate (overall and per task family), mean gold
score (overall and per family), share of perfect answers (gold == 1), exact match and ROUGE-L against the gold
judge's answer, KL to the SFT policy (sampled only: sum over response tokens of log pi(y_t) - log pi_sft(y_t)
on the policy's own samples, logits divided by the sampling temperature, averaged over prompts), response
length in tokens (EOS included), share ending in EOS, and the perplexity of held-out plain text (InstructGPT's
"alignment tax").

The reward model reads a response as a finished assistant turn (the chat template closes it with EOS), so a
response cut at `max_new_tokens` is scored as if it had ended; PPO's missing-EOS penalty is not applied here,
the EOS share is reported beside the reward instead.

Outputs in `output_dir`: `metrics.json` (keys in `instruct_tune.evaluation.reports.metrics_for`), `results.md`
(also printed), `samples.jsonl`, `config.yaml` and the plots `ppo_training.png`, `reward_hist.png` and
`gold_by_family.png`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

import instruct_tune.tiny.judge  # noqa: F401  registers `tiny_gold`, the default gold_judge
from instruct_tune.artifacts import CARD_FILE, append_to_card, is_hub_id, write_metrics
from instruct_tune.checkpoints import write_atomic
from instruct_tune.config import ConfigError, EvalStageConfig, ModelArguments, save_config
from instruct_tune.data import load_source
from instruct_tune.data.messages import last_user_text
from instruct_tune.data.text_rows import text_token_rows
from instruct_tune.evaluation.judges import GOLD, Prompt, check_judgeable, chosen_judges
from instruct_tune.evaluation.metrics import (
    GREEDY,
    SAMPLED,
    SFT,
    Answers,
    EvalPrompts,
    Key,
    Verdicts,
    decoding_metrics,
    generate,
    perplexity,
    score_answers,
    text_nll,
)
from instruct_tune.evaluation.plots import (
    FAMILY_PLOT,
    REWARD_PLOT,
    TRAINING_PLOT,
    plot_families,
    plot_rewards,
    plot_training,
    training_log,
)
from instruct_tune.evaluation.reports import (
    RESULTS_FILE,
    SAMPLES_FILE,
    TITLE,
    card_section,
    metrics_for,
    results_markdown,
    training_cost,
    write_samples,
)
from instruct_tune.models import load_model, load_tokenizer
from instruct_tune.stages.lengths import prompts_in_context
from instruct_tune.stages.run_folder import is_main_process
from instruct_tune.stages.runner import configure_logging

logger = logging.getLogger(__name__)


# --- inputs ---------------------------------------------------------------------------------------------


def load_prompts(args: EvalStageConfig) -> EvalPrompts:
    """The held-out prompts of `dataset_name` (any prompt-bearing format), the first `max_samples` of them."""
    ds, _ = load_source(args.dataset_name, "prompts", split=args.dataset_split)
    if args.max_samples is not None:
        ds = ds.select(range(min(args.max_samples, len(ds))))
    rows = []
    for i, (prompt, task) in enumerate(zip(ds["prompt"], ds["task"], strict=True)):
        messages = [dict(m) for m in prompt]
        rows.append(Prompt(row=i + 1, messages=messages, text=last_user_text(messages), task=str(task)))
    return EvalPrompts(rows)


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
    # "/" and "greedy" would make keys like `greedy/mean_reward/<policy>` ambiguous
    if len(set(names)) < len(names) or SFT in names or GREEDY in names or any("/" in n for n in names):
        raise ConfigError(
            f"policy_names: policies need distinct names other than '{SFT}' and '{GREEDY}', without '/' "
            f"(got {names}); set `policy_names` to label them"
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


# --- the stage ------------------------------------------------------------------------------------------


def run_eval(args: EvalStageConfig) -> Path:
    """Evaluate the policies against the SFT policy; write the eval folder and print the results table."""
    configure_logging(logging.INFO)  # eval logs at INFO from its one process
    if not is_main_process():  # one process does the evaluation under `accelerate launch`
        return Path(args.output_dir)
    names = check_paths(args)
    verdicts = [Verdicts(label, judge, {}) for label, judge in chosen_judges(args)]
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    distinct = load_prompts(args)
    sft_model, sft_tokenizer = load_policy(args.sft_path, "sft_path", args.trust_remote_code)
    # Prompts longer than the context less max_new_tokens are skipped and counted (`eval_prompts_skipped`).
    keep = prompts_in_context(
        sft_tokenizer, distinct.messages, sft_model, args.max_new_tokens, args.dataset_name
    )
    skipped = len(distinct.rows) - len(keep)
    distinct = EvalPrompts([distinct.rows[i] for i in keep])
    # before anything is generated; prompts skipped for length need no judge
    check_judgeable([(v.label, v.judge) for v in verdicts], distinct.rows, args.dataset_name)
    times = args.samples_per_prompt
    # Every answer list below is aligned with `prompts`: the distinct prompts `times` over.
    prompts = distinct.repeated(times)
    logger.info(
        "Evaluating on %d prompts (%s), %d sampled answers each; judges: %s",
        len(distinct.rows),
        ", ".join(distinct.families),
        times,
        ", ".join(v.judge.name for v in verdicts),
    )
    decodings = {SAMPLED: args.temperature, **({GREEDY: 0.0} if args.greedy else {})}
    folders = {SFT: args.sft_path, **dict(zip(names, args.policy_paths, strict=True))}
    answers, ppl = answer_all(args, folders, decodings, sft_model, sft_tokenizer, prompts, distinct)
    del sft_model

    for verdict in verdicts:
        verdict.scores = score_answers(verdict.judge, prompts, answers)
    gold = next((v for v in verdicts if v.label == GOLD), None)
    references = gold.judge.references(prompts.rows) if gold is not None else None
    per_policy: dict[str, dict[str, float]] = {}
    for name in folders:
        values: dict[str, float] = {}
        for decoding in decodings:
            prefix = "" if decoding == SAMPLED else f"{decoding}/"
            key = (name, decoding)
            figures = decoding_metrics(prompts, answers[key], verdicts, key, references)
            values.update({f"{prefix}{k}": v for k, v in figures.items()})
        if name in ppl:
            values["perplexity"] = ppl[name]
        values.update(training_cost(folders[name]))  # the stage that trained it (SFT's own for sft)
        per_policy[name] = values

    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(output_dir, args)
    meta = {"eval_prompts": len(distinct.rows), "samples_per_prompt": times, "gold_judge": gold is not None}
    meta.update(
        {f"judge/{v.label}": v.judge.name for v in verdicts}
    )  # which registered judge made which figures
    meta["eval_prompts_skipped"] = skipped  # longer than the model's context less max_new_tokens
    write_metrics(output_dir, metrics_for(per_policy, names, meta, [v.label for v in verdicts]))
    write_samples(output_dir / SAMPLES_FILE, prompts, answers, verdicts)

    plots = []
    logs = {name: training_log(folder) for name, folder in folders.items() if name != SFT}
    if plot_training(output_dir / TRAINING_PLOT, logs):
        plots.append(TRAINING_PLOT)
    rewards = verdicts[0].scores  # the reward model is the first judge
    plot_rewards(output_dir / REWARD_PLOT, {name: rewards[(name, SAMPLED)] for name in folders})
    plots.append(REWARD_PLOT)
    if gold is not None:
        plot_families(output_dir / FAMILY_PLOT, per_policy, prompts.families)
        plots.append(FAMILY_PLOT)
    report = results_markdown(args, distinct, per_policy, folders, plots, verdicts)
    for name, folder in folders.items():
        if name != SFT and (Path(folder) / CARD_FILE).is_file():
            append_to_card(folder, TITLE, card_section(report, output_dir))
    write_atomic(output_dir / RESULTS_FILE, report)  # last: make's sign of a finished eval folder
    logger.info("Wrote eval folder %s", output_dir)
    print(report)
    return output_dir


def answer_all(
    args: EvalStageConfig,
    folders: Mapping[str, str],
    decodings: Mapping[str, float],
    sft_model: PreTrainedModel,
    sft_tokenizer: PreTrainedTokenizerBase,
    prompts: EvalPrompts,
    distinct: EvalPrompts,
) -> tuple[dict[Key, Answers], dict[str, float]]:
    """Every policy's answers under every decoding (sampled with KL to SFT), and its held-out perplexity."""
    text_ids: list[list[int]] = []
    if args.ptx_eval_dataset:  # the file's last `ptx_eval_rows` rows: PPO-ptx trains on the others
        last = slice(-args.ptx_eval_rows, None) if args.ptx_eval_rows is not None else slice(None)
        text_ids = text_token_rows(sft_tokenizer, args.ptx_eval_dataset, args.ptx_eval_max_length, last)
    times = prompts.draws // distinct.draws
    answers: dict[Key, Answers] = {}
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
            answers[(SFT, SAMPLED)].kl = [0.0] * len(prompts.rows)  # sum of log pi_sft - log pi_sft
        if text_ids:
            ppl[name] = perplexity(*text_nll(model, text_ids, tokenizer.pad_token_id, args.batch_size))
        logger.info("%s: answered in %.1f s", name, time.perf_counter() - started)
        if name != SFT:
            del model
    return answers, ppl
