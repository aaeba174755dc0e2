"""Reward model on comparisons (InstructGPT step 2), on `trl.RewardTrainer`.

    accelerate launch recipes/reward.py --config recipes/configs/tiny/reward.yaml

**Grouping.** InstructGPT trains on all C(K,2) comparisons of a K-way ranking as one batch element, because
spreading them over the epoch as independent pairs makes each response appear K-1 times and the model
overfits. Here every preference source (pairs or rankings; the data layer expands a ranking into its pairs
sharing a `group_id`) is regrouped into one row per prompt: its distinct responses and the (better, worse)
index pairs among them. A batch holds whole prompts; each response is scored once per forward pass, and the
loss is InstructGPT's

    loss = 1/G * sum_g [ -1/P_g * sum_{(w,l) in g} log sigmoid(r(x_g, y_w) - r(x_g, y_l) - m_wl) ]

over the G prompts of the batch, P_g = C(K,2) pairs of prompt g (1 for a plain chosen/rejected pair): each
prompt counts once and its pairs are averaged, so a 9-way ranking weighs as much as a single pair. `m_wl` is
the optional margin (`use_margin`: the data's `margin` column, or score differences of rankings given by
`scores`, times `margin_scale`); off by default.

**Reward at EOS.** Prompt and response are rendered with the chat template the SFT stage used (the
assistant turn ends with EOS) and the scalar head is read at that last token. With `policy_path` (the SFT run
folder) the two tokenizers' chat templates must be equal, or the stage stops naming both.

**Normalisation.** After training, the reward model scores reference responses, samples of the SFT policy on
`normalization_prompts` at temperature 1 (or, without a policy, the chosen responses of the eval set), and
stores bias = -mean in `reward_normalization.json` so they score mean 0, as InstructGPT did.
`instruct_tune.models.reward.load_reward_model` applies it wherever the reward model is used.

**Evaluation.** Pairwise accuracy and mean margin (r_better - r_worse) on the held-out comparisons
(`eval_accuracy`, `eval_margin`, `eval_<task>_accuracy`), and a calibration table (accuracy by bucket of
|r_a - r_b| beside the predicted sigmoid(|r_a - r_b|)) in `calibration.json`, `calibration.md` and the card.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn
from transformers import AutoConfig, PreTrainedTokenizerBase, set_seed
from trl import RewardTrainer

from instruct_tune.artifacts import append_to_card
from instruct_tune.config import ConfigError, DataArguments, ModelArguments, RewardStageConfig
from instruct_tune.data import load_source
from instruct_tune.models import adapter_chain, load_model, load_tokenizer
from instruct_tune.models.reward import (
    NORMALIZATION_FILE,
    RewardModel,
    init_reward_head,
    pad_right,
    reward_input_ids,
    write_normalization,
)
from instruct_tune.models.sampling import context_length, prompts_that_fit, sample_texts
from instruct_tune.models.template_compare import chat_template_difference, render_probe
from instruct_tune.stages.data_sources import data_sources, eval_set_description, task_tags, train_eval_sets
from instruct_tune.stages.guards import NonFiniteGuard, check_loaded_weights, check_metrics, check_weights
from instruct_tune.stages.lengths import fit_max_length, model_context
from instruct_tune.stages.run_folder import RunFolderArguments, open_run_folder
from instruct_tune.stages.runner import (
    configure_logging,
    end_run,
    finish_run,
    run_training,
    take_push_request,
)

logger = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
CALIBRATION_MD = "calibration.md"


# --- data: one row per prompt ------------------------------------------------------------------------------


def _response_text(messages: Sequence[Mapping[str, str]]) -> str:
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise ValueError(f"a preference response must be one assistant turn (got {len(messages)} messages)")
    return messages[0]["content"]


def group_comparisons(pairs: Dataset) -> Dataset:
    """Regroup preference pairs into one row per prompt (`group_id`; a row without one is its own group).

    Output rows: `prompt`, `responses` (distinct texts), `better`/`worse` (indices into `responses`, one entry
    per pair), `margin` (per pair, 0.0 where the data gives none), `task`, `group_id`.
    """
    columns = pairs.to_dict()  # one conversion of each column: row-wise access into Arrow is slow
    group_ids = columns.get("group_id", list(range(len(pairs))))
    margins = columns.get("margin", [None] * len(pairs))
    tasks = columns.get("task", [None] * len(pairs))
    groups: dict[Any, dict[str, Any]] = {}
    for i, (group_id, prompt, chosen, rejected) in enumerate(
        zip(group_ids, columns["prompt"], columns["chosen"], columns["rejected"], strict=True)
    ):
        group = groups.get(group_id)
        if group is None:
            group = groups[group_id] = {
                "prompt": prompt,
                "responses": [],
                "better": [],
                "worse": [],
                "margin": [],
                "task": tasks[i],
                "group_id": group_id,
                "_index": {},
            }
        elif prompt != group["prompt"]:
            raise ValueError(f"group_id {group_id}: pairs with different prompts cannot be one ranking")
        index = group["_index"]
        for text in (_response_text(chosen), _response_text(rejected)):
            if text not in index:
                index[text] = len(group["responses"])
                group["responses"].append(text)
        group["better"].append(index[_response_text(chosen)])
        group["worse"].append(index[_response_text(rejected)])
        group["margin"].append(0.0 if margins[i] is None else float(margins[i]))
    rows = [{k: v for k, v in group.items() if k != "_index"} for group in groups.values()]
    if all(row["task"] is None for row in rows):
        for row in rows:
            del row["task"]
    return Dataset.from_list(rows)


def tokenize_groups(
    groups: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int | None, what: str = "train"
) -> Dataset:
    """Add `input_ids` (one list per response) and `length` (tokens of the prompt's responses together).

    Responses over `max_length` tokens are dropped with their pairs, and prompts left without a pair;
    `what` names the set (train or eval) in the messages.
    """

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        prompts = [p for p, rs in zip(batch["prompt"], batch["responses"], strict=True) for _ in rs]
        flat = reward_input_ids(tokenizer, prompts, [r for rs in batch["responses"] for r in rs])
        out: dict[str, list] = {key: [] for key in ("input_ids", "better", "worse", "margin", "length")}
        start = 0
        for responses, better, worse, margin in zip(
            batch["responses"], batch["better"], batch["worse"], batch["margin"], strict=True
        ):
            ids = flat[start : start + len(responses)]
            start += len(responses)
            keep = [i for i, seq in enumerate(ids) if max_length is None or len(seq) <= max_length]
            new_index = {old: new for new, old in enumerate(keep)}
            pairs = [
                (new_index[win], new_index[lose], m)
                for win, lose, m in zip(better, worse, margin, strict=True)
                if win in new_index and lose in new_index
            ]
            out["input_ids"].append([ids[i] for i in keep])
            out["better"].append([p[0] for p in pairs])
            out["worse"].append([p[1] for p in pairs])
            out["margin"].append([p[2] for p in pairs])
            # the sort key of `train_sampling_strategy: group_by_length`
            out["length"].append(sum(len(ids[i]) for i in keep))
        return out

    n_pairs = sum(len(b) for b in groups["better"])
    tokenized = groups.map(tokenize, batched=True, batch_size=512, desc="Tokenizing comparisons")
    tokenized = tokenized.filter(lambda row: len(row["better"]) > 0)
    kept = sum(len(b) for b in tokenized["better"])
    if kept < n_pairs:
        logger.warning(
            "%s set: dropped %d of %d comparisons with a response over max_length=%s tokens (%d of %d prompts left)",
            what,
            n_pairs - kept,
            n_pairs,
            max_length,
            len(tokenized),
            len(groups),
        )
    if len(tokenized) == 0:
        raise ConfigError(
            f"{what} set: no comparison fits in max_length={max_length} tokens (prompt and response together): "
            "raise max_length (up to the model's context) or give shorter comparisons"
        )
    return tokenized


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Tokens all `sequences` start with, leaving at least one token of each (its reward token) unshared."""
    limit = min(len(ids) for ids in sequences) - 1
    n = 0
    while n < limit and all(ids[n] == sequences[0][n] for ids in sequences):
        n += 1
    return n


def pack_group(sequences: Sequence[Sequence[int]]) -> tuple[list[int], list[int], list[int], list[int]]:
    """One row for the K responses of a prompt: the shared prompt tokens once, then each response's tokens.

    Returns the row's token ids, position ids (each response continues from the end of the prefix), segment
    ids (0 for the prefix, k for response k) and the position of each response's last (EOS) token.
    """
    n = shared_prefix_length(sequences) if len(sequences) > 1 else len(sequences[0]) - 1
    ids, positions, segments, ends = list(sequences[0][:n]), list(range(n)), [0] * n, []
    for k, seq in enumerate(sequences, start=1):
        ids.extend(seq[n:])
        positions.extend(range(n, len(seq)))
        segments.extend([k] * (len(seq) - n))
        ends.append(len(ids) - 1)
    return ids, positions, segments, ends


def packed_attention_mask(segment_ids: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Boolean (R, 1, T, T) mask of packed rows: causal; a token sees only its own prompt's tokens, and
    there a response sees the prompt (segment 0) and itself only.

    Padding (group and segment -1, at the end of a row) sees only padding, so no attention row is empty.
    """
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    same_group = group_ids[:, :, None] == group_ids[:, None, :]
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]
    return (causal & same_group & ((key == 0) | (key == query)))[:, None]


@dataclass
class GroupedPreferenceCollator:
    """Batch whole prompts: all their responses, and their pairs as indices into the batch's responses.

    Always returns `better`, `worse` (response indices), `pair_weight` (1/P_g for each pair of prompt g, so
    the weights of one prompt sum to 1) and, with `use_margin`, `margin`. With `share_prompt` a prompt's
    responses are packed behind one copy of the prompt, and several prompts share a row of up to
    `row_length` tokens (`input_ids`, `position_ids`, `segment_ids`, `group_ids`, `reward_index`: flat
    positions of the reward tokens); otherwise one right-padded row per response (`input_ids`,
    `attention_mask`), as `trl.RewardTrainer` does.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    use_margin: bool = False
    margin_scale: float = 1.0
    share_prompt: bool = True
    # Packed rows hold several prompts up to this many tokens (or the longest prompt's row), so short prompts
    # do not pay for the padding of long ones. Attention in a row costs its length squared, most of it masked
    # between prompts: on the tiny default (CPU) a step over rows of 128 took 30% less time than over rows of
    # 256 at 8 prompts a batch, 10% less at 16.
    row_length: int = 128

    def __call__(self, groups: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        better, worse, weight, margin = [], [], [], []
        offset = 0
        for group in groups:
            n_pairs = len(group["better"])
            better.extend(offset + i for i in group["better"])
            worse.extend(offset + i for i in group["worse"])
            weight.extend([1.0 / n_pairs] * n_pairs)
            margin.extend(group["margin"])
            offset += len(group["input_ids"])
        batch = self._packed(groups) if self.share_prompt else self._per_response(groups)
        batch.update(
            better=torch.tensor(better, dtype=torch.long),
            worse=torch.tensor(worse, dtype=torch.long),
            pair_weight=torch.tensor(weight, dtype=torch.float),
        )
        if self.use_margin:
            batch["margin"] = self.margin_scale * torch.tensor(margin, dtype=torch.float)
        return batch

    def _per_response(self, groups: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences = [ids for group in groups for ids in group["input_ids"]]
        input_ids = pad_right(sequences, self.pad_token_id, self.pad_to_multiple_of)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(sequences):
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def _packed(self, groups: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        packed = [pack_group(group["input_ids"]) for group in groups]
        # First-fit decreasing: prompts (each with all its responses) into as few rows as possible.
        capacity = max(self.row_length, max(len(p[0]) for p in packed))
        rows: list[list[int]] = []
        fill: list[int] = []
        for g in sorted(range(len(packed)), key=lambda g: -len(packed[g][0])):
            size = len(packed[g][0])
            row = next((r for r, used in enumerate(fill) if used + size <= capacity), None)
            if row is None:
                rows.append([])
                fill.append(0)
                row = len(rows) - 1
            rows[row].append(g)
            fill[row] += size
        length = max(fill)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(rows), length)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)  # padding reads position 0: always in range
        segment_ids = torch.full(shape, -1, dtype=torch.long)
        group_ids = torch.full(shape, -1, dtype=torch.long)
        start: dict[int, int] = {}  # prompt -> flat index of its first token
        for r, members in enumerate(rows):
            offset = 0
            for local, g in enumerate(members):
                ids, positions, segments, _ = packed[g]
                span = slice(offset, offset + len(ids))
                input_ids[r, span] = torch.tensor(ids)
                position_ids[r, span] = torch.tensor(positions)
                segment_ids[r, span] = torch.tensor(segments)
                group_ids[r, span] = local
                start[g] = r * length + offset
                offset += len(ids)
        # Responses in batch order (the order of `better`/`worse`), wherever their prompt was placed.
        reward_index = torch.tensor([start[g] + end for g in range(len(packed)) for end in packed[g][3]])
        return {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "segment_ids": segment_ids,
            "group_ids": group_ids,
            "reward_index": reward_index,
        }


def group_ranking_loss(
    rewards: torch.Tensor,
    better: torch.Tensor,
    worse: torch.Tensor,
    pair_weight: torch.Tensor,
    margin: torch.Tensor | None = None,
) -> torch.Tensor:
    """InstructGPT's RM loss: -1/C(K,2) * sum of log sigmoid(r_w - r_l - m) per prompt, averaged over prompts.

    `pair_weight` is 1/P_g for each pair of prompt g, so it sums to the number of prompts.
    """
    diff = rewards[better] - rewards[worse]
    if margin is not None:
        diff = diff - margin
    return -(pair_weight * F.logsigmoid(diff)).sum() / pair_weight.sum()


# Attention implementations that take a custom 4D mask: boolean (sdpa) or additive (eager).
PACKED_ATTENTION = ("sdpa", "eager")


def attention_implementation(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def packed_rewards(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rewards of every response of packed rows: the score head's output at each response's EOS token.

    The sequence-classification head pools at one token per row; a hook on it (`score`) collects its
    output at every position instead, and `reward_index` picks the responses' last tokens.
    """
    allowed = packed_attention_mask(inputs["segment_ids"], inputs["group_ids"])
    if attention_implementation(model) == "eager":
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)
    else:
        mask = allowed
    name = _score_module_name(model)
    if name is None:
        raise ValueError("the reward model has no `score` head: train with `share_prompt: false`")
    head = model.get_submodule(name)
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _module, _args, output: captured.append(output))
    try:
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=mask,
            position_ids=inputs["position_ids"],
            use_cache=False,
        )
    finally:
        handle.remove()
    per_token = captured[-1][..., 0].reshape(-1)
    return per_token[inputs["reward_index"]].to(outputs.logits.dtype)


def _score_module_name(model: nn.Module) -> str | None:
    """Name of the outermost `score` module (PEFT wraps the head; the wrapper's output is the trained one)."""
    names = [name for name, _ in model.named_modules() if name.split(".")[-1] == "score"]
    return min(names, key=len) if names else None


def can_share_prompt(model: nn.Module) -> bool:
    """Whether packed rows work for this model: a `score` head and an attention taking custom 4D masks."""
    return _score_module_name(model) is not None and attention_implementation(model) in PACKED_ATTENTION


class GroupedRewardTrainer(NonFiniteGuard, RewardTrainer):
    """`trl.RewardTrainer` over one row per prompt: own tokenisation, collator and loss; the rest is TRL's.

    A NaN/inf loss or logged figure stops training (`instruct_tune.stages.guards`).
    """

    guard_stage = "reward"

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "input_ids" in dataset.column_names:
            return dataset
        if "responses" not in dataset.column_names:
            dataset = group_comparisons(dataset)
        return tokenize_groups(dataset, processing_class, args.max_length, dataset_name)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["input_ids", "better", "worse", "margin", "length"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        better, worse = inputs.pop("better"), inputs.pop("worse")
        pair_weight, margin = inputs.pop("pair_weight"), inputs.pop("margin", None)
        if "segment_ids" in inputs:
            rewards = packed_rewards(model, inputs)
            real_tokens = (inputs["segment_ids"] >= 0).sum()
        else:
            rewards = model(**inputs, use_cache=False).logits.squeeze(-1)
            real_tokens = inputs["attention_mask"].sum()
        loss = group_ranking_loss(rewards, better, worse, pair_weight, margin)
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * torch.mean(rewards**2)
        outputs = {"rewards": rewards}

        if mode == "train":
            self._total_train_tokens += self.accelerator.gather_for_metrics(real_tokens).sum().item()
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():
            diff = rewards[better] - rewards[worse]
            stats = {
                "mean_reward": rewards.mean(),
                "accuracy": (diff > 0).float().mean(),
                "margin": diff.mean(),
            }
            for key, value in stats.items():
                self._metrics[mode][key].append(self.accelerator.gather_for_metrics(value).mean().item())
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Evaluation during training reports the loss and the logged accuracy/margin; the rewards of a batch
        # vary in number between processes, so they are not gathered (the final eval scores every pair).
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


# --- evaluation -----------------------------------------------------------------------------------------


@torch.no_grad()
def pair_differences(
    rm: RewardModel, groups: Dataset, batch_size: int = 64
) -> tuple[torch.Tensor, list[Any]]:
    """r(better) - r(worse) of every comparison of tokenised `groups`, with each comparison's task tag."""
    rows = groups.to_dict()
    rewards = rm.raw_score_ids([ids for row in rows["input_ids"] for ids in row], batch_size=batch_size)
    better, worse, tasks = [], [], []
    offset = 0
    for i, responses in enumerate(rows["input_ids"]):
        better.extend(offset + b for b in rows["better"][i])
        worse.extend(offset + w for w in rows["worse"][i])
        tasks.extend([rows["task"][i] if "task" in rows else None] * len(rows["better"][i]))
        offset += len(responses)
    return rewards[better] - rewards[worse], tasks


def _accuracy(diffs: torch.Tensor) -> float:
    """Share of comparisons ordered right; an exact tie counts half."""
    return ((diffs > 0).float() + 0.5 * (diffs == 0).float()).mean().item()


def comparison_metrics(diffs: torch.Tensor, tasks: Sequence[Any], prefix: str = "eval") -> dict[str, float]:
    """`<prefix>_accuracy`, `<prefix>_margin` and the same per task tag (when there are several tags)."""
    metrics = {f"{prefix}_accuracy": _accuracy(diffs), f"{prefix}_margin": diffs.mean().item()}
    for name in task_tags(tasks):
        mask = torch.tensor([t == name for t in tasks])
        metrics[f"{prefix}_{name}_accuracy"] = _accuracy(diffs[mask])
        metrics[f"{prefix}_{name}_margin"] = diffs[mask].mean().item()
    return metrics


def calibration_table(diffs: torch.Tensor, buckets: int = 5) -> list[dict[str, float]]:
    """Accuracy by equal-count bucket of |r_a - r_b|, beside the predicted P = mean sigmoid(|r_a - r_b|).

    A calibrated reward model (Bradley-Terry) has accuracy close to the prediction in every bucket.
    """
    gaps = diffs.abs()
    order = torch.argsort(gaps)
    rows = []
    n = len(diffs)
    for b in range(min(buckets, n)):
        idx = order[b * n // buckets : (b + 1) * n // buckets]
        if len(idx) == 0:
            continue
        rows.append(
            {
                "min_gap": gaps[idx].min().item(),
                "max_gap": gaps[idx].max().item(),
                "n": len(idx),
                "accuracy": _accuracy(diffs[idx]),
                "predicted": torch.sigmoid(gaps[idx]).mean().item(),
            }
        )
    return rows


def calibration_markdown(table: Sequence[Mapping[str, float]]) -> str:
    lines = [
        "| abs(r_a - r_b) | comparisons | accuracy | predicted sigmoid(abs(r_a - r_b)) |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['min_gap']:.3g} - {r['max_gap']:.3g} | {r['n']} | {r['accuracy']:.3f} | {r['predicted']:.3f} |"
        for r in table
    ]
    return "\n".join(lines)


# --- normalisation --------------------------------------------------------------------------------------


def check_chat_template(tokenizer: PreTrainedTokenizerBase, source: str, policy_path: str) -> None:
    """Refuse a reward model whose chat template (or EOS) differs from the policy's it will score."""
    policy_tokenizer = load_tokenizer(ModelArguments(model_name_or_path=policy_path))
    # Compared by rendering: templates that differ only by a Jinja comment are the same template.
    difference = chat_template_difference(tokenizer, policy_tokenizer)
    if difference is None and policy_tokenizer.eos_token != tokenizer.eos_token:
        difference = render_probe(tokenizer, 0), render_probe(policy_tokenizer, 0)
    if difference is not None:
        raise ConfigError(
            f"chat templates differ: the reward model's tokenizer ({source}) renders a chat as "
            f"{difference[0]!r}, the policy's ({policy_path}) as {difference[1]!r}. The reward model must read "
            "responses as the policy writes them: initialise it from the SFT run folder or pass its "
            "tokenizer with `tokenizer_name_or_path`."
        )


def sample_policy(
    policy_path: str,
    prompts: Sequence[Sequence[Mapping[str, str]]],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    max_length: int | None = None,
) -> tuple[list[int], list[str]]:
    """One sampled response per prompt from the policy run folder (the sampler of every stage, seeded).

    Prompts with no room for `max_new_tokens` within `max_length` and the policy's context are skipped;
    returns the indices of the prompts answered and their responses.
    """
    model_args = ModelArguments(model_name_or_path=policy_path)
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, tokenizer, head="causal").to(device).eval()
    limits = [n for n in (context_length(model), max_length) if n is not None]
    kept = prompts_that_fit(tokenizer, prompts, min(limits) - max_new_tokens if limits else None)
    texts, _ = sample_texts(
        model,
        tokenizer,
        [prompts[i] for i in kept],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
    )
    return kept, texts


def reference_responses(
    args: RewardStageConfig, eval_groups: Dataset | None, device: torch.device
) -> tuple[list[Any], list[str], str]:
    """The responses whose mean reward is set to 0: policy samples, or the eval set's chosen responses."""
    if args.policy_path:
        if args.normalization_prompts:
            prompt_set, _ = load_source(args.normalization_prompts, "prompts")
            prompts, where = prompt_set["prompt"], args.normalization_prompts
        elif eval_groups is not None:
            prompts, where = eval_groups["prompt"], "the eval comparisons' prompts"
        else:
            raise ConfigError("normalisation: set `normalization_prompts` (no eval set to take prompts from)")
        if len(prompts) > args.normalization_samples:
            chosen = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed))
            prompts = [prompts[i] for i in sorted(chosen[: args.normalization_samples].tolist())]
        kept, responses = sample_policy(
            args.policy_path,
            prompts,
            max_new_tokens=args.normalization_max_new_tokens,
            temperature=args.normalization_temperature,
            seed=args.seed,
            device=device,
            max_length=args.max_length,
        )
        skipped = len(prompts) - len(kept)
        limit = f"max_length {args.max_length} and the policy's context, with normalization_max_new_tokens room"
        if not kept:
            raise ConfigError(f"normalisation: none of the {len(prompts)} prompts of {where} fits {limit}")
        if skipped:
            logger.warning(
                "Normalisation: skipped %d of %d prompts of %s longer than %s", skipped, len(prompts), where, limit
            )
        temperature = args.normalization_temperature
        source = f"samples of {args.policy_path} (T={temperature:g}) on {len(kept)} of {where}" + (
            f" ({skipped} longer prompts skipped)" if skipped else ""
        )
        return [prompts[i] for i in kept], responses, source
    if eval_groups is None:
        raise ConfigError(
            "normalisation needs `policy_path` or an eval set (its chosen responses are the reference)"
        )
    prompts, responses = [], []
    for row in eval_groups.select(range(min(len(eval_groups), args.normalization_samples))):
        for i in sorted(set(row["better"])):  # every response chosen in some comparison of the prompt
            prompts.append(row["prompt"])
            responses.append(row["responses"][i])
    return prompts, responses, f"chosen responses of {len(set(map(str, prompts)))} eval prompts"


def normalize(
    rm: RewardModel, prompts: Sequence[Any], responses: Sequence[str], source: str
) -> dict[str, Any]:
    """Set `rm.bias` so the reference responses score mean 0; returns the normalisation record."""
    raw = rm.raw_score(prompts, responses)
    mean = raw.mean().item()
    std = raw.std().item() if len(raw) > 1 else 0.0
    rm.bias, rm.std = -mean, std
    record = {"bias": -mean, "mean": mean, "std": std, "n": len(raw), "source": source}
    rm.normalization = record
    return record


# --- the stage ------------------------------------------------------------------------------------------


def _head_is_new(model_name_or_path: str) -> bool:
    """Whether the checkpoint brings no trained reward head (a causal LM or an SFT run folder)."""
    root, adapters = adapter_chain(model_name_or_path)
    for adapter in adapters:
        if json.loads((Path(adapter) / "adapter_config.json").read_text()).get("task_type") == "SEQ_CLS":
            return False
    architectures = AutoConfig.from_pretrained(root).architectures or []
    return not any(name.endswith("ForSequenceClassification") for name in architectures)


def run_reward(
    training_args: RewardStageConfig,
    data_args: DataArguments,
    model_args: ModelArguments,
    run_options: RunFolderArguments | None = None,
) -> Path:
    """Train the reward model, evaluate and normalise it, and write its run folder; returns the folder."""
    configure_logging(training_args)
    push_to = take_push_request(training_args)
    set_seed(training_args.seed)
    training_args.disable_dropout = model_args.disable_dropout
    tokenizer = load_tokenizer(model_args, trust_remote_code=training_args.trust_remote_code)
    source = model_args.model_name_or_path  # read after the loader: a GGUF source is now its converted folder
    if training_args.max_length is not None:
        context = model_context(source, trust_remote_code=training_args.trust_remote_code)
        fit_max_length("reward", training_args, context, source)
    if training_args.policy_path:
        check_chat_template(tokenizer, model_args.tokenizer_name_or_path or source, training_args.policy_path)
    run_folder = open_run_folder("reward", training_args, (training_args, data_args, model_args), run_options)

    train_pairs, eval_pairs = train_eval_sets(data_args, "preference", seed=training_args.seed)
    if training_args.use_margin and "margin" not in train_pairs.column_names:
        raise ConfigError(
            "use_margin: the training data has no margins (a `margin` column or ranking `scores`)"
        )
    if eval_pairs is None and not training_args.policy_path:
        raise ConfigError(
            "normalisation needs `policy_path` (the SFT run folder) or an eval set (its chosen responses are "
            "the reference): set one of them, or `eval_fraction` > 0"
        )
    train, eval_set = group_comparisons(train_pairs), group_comparisons(eval_pairs) if eval_pairs else None
    logger.info(
        "Reward data: %d comparisons of %d prompts for training, %s for eval",
        len(train_pairs),
        len(train),
        f"{len(eval_pairs)} of {len(eval_set)} prompts" if eval_set else "none",
    )

    model = load_model(
        model_args,
        tokenizer,
        head="reward",
        trust_remote_code=training_args.trust_remote_code,
        gradient_checkpointing=training_args.gradient_checkpointing,
    )
    if _head_is_new(source):
        std = init_reward_head(model, seed=training_args.seed)
        logger.info("Reward head initialised N(0, %.3g)", std)
    check_loaded_weights(model, "reward", source)
    if hasattr(model, "peft_config"):
        # The adapter is trained on `source` (e.g. the SFT run folder, merged): record it as the base, so
        # loading the reward run folder merges the SFT adapter first.
        model.peft_config["default"].base_model_name_or_path = source

    share_prompt = training_args.share_prompt and can_share_prompt(model)
    if training_args.share_prompt and not share_prompt:
        logger.warning(
            "share_prompt: %s attention takes no custom mask; scoring each response in its own row",
            attention_implementation(model),
        )
    trainer = GroupedRewardTrainer(
        model=model,
        args=training_args,
        data_collator=GroupedPreferenceCollator(
            pad_token_id=tokenizer.pad_token_id,
            pad_to_multiple_of=training_args.pad_to_multiple_of,
            use_margin=training_args.use_margin,
            margin_scale=training_args.margin_scale,
            share_prompt=share_prompt,
        ),
        train_dataset=train,
        eval_dataset=eval_set,
        processing_class=tokenizer,
    )
    metrics = run_training(trainer, run_folder)
    check_weights(trainer.model, "reward", f"after step {trainer.state.global_step}")

    rm = RewardModel(trainer.accelerator.unwrap_model(trainer.model), tokenizer)
    calibration: list[dict[str, float]] = []
    normalization: dict[str, Any] | None = None
    if trainer.is_world_process_zero():
        if trainer.eval_dataset is not None:
            diffs, tasks = pair_differences(
                rm, trainer.eval_dataset, training_args.per_device_eval_batch_size
            )
            metrics.update(comparison_metrics(diffs, tasks if data_args.per_task_metrics else []))
            metrics["eval_comparisons"] = len(diffs)
            calibration = calibration_table(diffs, training_args.calibration_buckets)
        prompts, responses, where = reference_responses(training_args, trainer.eval_dataset, rm.device)
        normalization = normalize(rm, prompts, responses, where)
        metrics.update({"reward_bias": normalization["bias"], "reward_std": normalization["std"]})
        trainer.log_metrics("all", metrics)
    check_metrics(metrics, "reward", trainer.state.global_step)  # bias and std included

    output_dir = finish_run(
        trainer,
        stage="reward",
        configs=(training_args, data_args, model_args),
        source=source,
        datasets=[s.path for s in data_sources(data_args)],
        metrics=metrics,
        eval_data=eval_set_description(data_args),
    )
    if trainer.is_world_process_zero():
        assert normalization is not None
        append_to_card(
            output_dir,
            "Normalisation",
            f"Scores are shifted by bias {normalization['bias']:+.4f} so that {normalization['source']} "
            f"score mean 0 (std {normalization['std']:.4f}, n={normalization['n']}); stored in "
            f"`{NORMALIZATION_FILE}`.",
        )
        if calibration:
            (output_dir / CALIBRATION_FILE).write_text(json.dumps(calibration, indent=2) + "\n")
            table = calibration_markdown(calibration)
            (output_dir / CALIBRATION_MD).write_text(f"# Reward model calibration\n\n{table}\n")
            append_to_card(output_dir, "Calibration (eval comparisons)", table)
        write_normalization(output_dir, normalization)  # last: make's sign of a finished reward folder
    end_run(trainer.accelerator, output_dir, push_to, training_args)
    return output_dir
