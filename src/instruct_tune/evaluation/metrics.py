"""Eval's figures: responses and their KL to SFT, judges' scores and win rates, held-out text perplexity.

Win rate, defined once (DESIGN.md): each policy's response to a prompt is compared with the SFT policy's
response to the same prompt and draw under the same decoding, by each judge's score (the higher wins, within
the judge's `tie_tolerance` a tie counting half). A judge's figures are named by its label
(`instruct_tune.evaluation.judges.chosen_judges`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from instruct_tune.evaluation.judges import GOLD, RM, Judge, Prompt
from instruct_tune.metrics import load_metric
from instruct_tune.models.forward import lm_logits
from instruct_tune.models.sampling import decode_responses, sample_batches
from instruct_tune.ppo.core import logprobs_from_logits

SFT = "sft"
SAMPLED, GREEDY = "sampled", "greedy"
Key = tuple[str, str]  # (policy name, decoding)


@dataclass
class EvalPrompts:
    """The held-out prompts, listed `draws` times over (row i is distinct prompt i % distinct)."""

    rows: list[Prompt]
    draws: int = 1

    @property
    def messages(self) -> list[list[dict[str, str]]]:
        return [p.messages for p in self.rows]

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.rows]

    @property
    def tasks(self) -> list[str]:
        return [p.task for p in self.rows]

    @property
    def families(self) -> list[str]:
        return sorted(set(self.tasks))

    @property
    def distinct(self) -> int:
        return len(self.rows) // self.draws

    def repeated(self, times: int) -> EvalPrompts:
        """The prompts `times` over, one copy after another."""
        return EvalPrompts(self.rows * times, self.draws * times)


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


AnswerSets = Mapping[Key, Answers]  # every policy's answers under every decoding: what judges score, reports list


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


# --- judging ---------------------------------------------------------------------------------------------


@dataclass
class Verdicts:
    """One judge's scores of every answer, by (policy, decoding); `label` names its figures."""

    label: str
    judge: Judge
    scores: dict[Key, list[float]]


def score_answers(
    judge: Judge, prompts: EvalPrompts, answers: AnswerSets
) -> dict[Key, list[float]]:
    """`judge`'s score of every answer, in one call; each distinct (prompt, response, EOS) is scored once, so
    equal responses of two policies get exactly equal scores (a tie)."""
    n = prompts.distinct  # a prompt's draws share its index, so a repeated answer is scored once
    unique: dict[tuple[int, str, bool], int] = {}
    for run in answers.values():
        for i, (text, ended) in enumerate(zip(run.texts, run.ended, strict=True)):
            unique.setdefault((i % n, text, ended), len(unique))
    triples = list(unique)
    values = judge.score(
        [prompts.rows[i] for i, _, _ in triples], [t for _, t, _ in triples], [e for *_, e in triples]
    )
    if len(values) != len(triples):
        raise ValueError(f"judge {judge.name!r} gave {len(values)} scores for {len(triples)} responses")
    return {
        key: [
            float(values[unique[(i % n, t, e)]])
            for i, (t, e) in enumerate(zip(run.texts, run.ended, strict=True))
        ]
        for key, run in answers.items()
    }


def mean_key(label: str) -> str:
    """The key of a judge's mean score: `mean_reward`, `gold_mean`, else `<label>_mean`."""
    return {RM: "mean_reward", GOLD: "gold_mean"}.get(label, f"{label}_mean")


def family_key(label: str, family: str) -> str:
    """The key of a judge's mean score on one task family: `reward/<f>`, `gold/<f>`, else `<label>/<f>`."""
    return f"{'reward' if label == RM else label}/{family}"


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def _by_family(values: Sequence[float], tasks: Sequence[str]) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for value, task in zip(values, tasks, strict=True):
        groups.setdefault(task, []).append(value)
    return {task: _mean(v) for task, v in sorted(groups.items())}


def judge_figures(
    label: str,
    scores: Sequence[float],
    sft_scores: Sequence[float],
    tasks: Sequence[str],
    tie_tolerance: float,
) -> dict[str, float]:
    """One judge's mean score and win rate against SFT, overall and per task family."""
    won = load_metric("win_rate").compute(
        scores_a=list(scores), scores_b=list(sft_scores), groups=list(tasks), tie_tolerance=tie_tolerance
    )
    out = {mean_key(label): _mean(scores), f"win_rate_vs_sft_{label}": won["win_rate"]}
    out.update({family_key(label, f): v for f, v in _by_family(scores, tasks).items()})
    out.update({f"win_rate_vs_sft_{label}/{f}": v for f, v in won["win_rate_by_group"].items()})
    return out


def decoding_metrics(
    prompts: EvalPrompts,
    run: Answers,
    verdicts: Sequence[Verdicts],
    key: Key,
    references: Sequence[str] | None = None,
) -> dict[str, float]:
    """The figures of one policy under one decoding (`key`), each judge's against the SFT policy's answers
    under the same decoding; with the gold judge's `references`, exact match and ROUGE-L against them."""
    sft_key = (SFT, key[1])
    out = {
        "response_length": _mean(run.lengths),
        "eos_share": _mean([float(e) for e in run.ended]),
    }
    if run.kl is not None:
        out["kl_vs_sft"] = _mean(run.kl)
    for verdict in verdicts:
        scores = verdict.scores[key]
        figures = judge_figures(
            verdict.label, scores, verdict.scores[sft_key], prompts.tasks, verdict.judge.tie_tolerance
        )
        out.update(figures)
        if verdict.label == GOLD:
            out["perfect_share"] = _mean([float(g == 1.0) for g in scores])
    if references is not None:
        match = load_metric("reference_match").compute(predictions=run.texts, references=list(references))
        out.update({"exact_match": match["exact_match"], "rouge_l": match["rouge_l"]})
    return out
