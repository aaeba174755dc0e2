"""Our PPO loop (InstructGPT step 3): rollout, score, per-token KL penalty, GAE, clipped updates, PPO-ptx.

Each step: every process answers `rollout_batch_size` prompts, the frozen reward model scores the answers
(normalised, minus `missing_eos_penalty` where no EOS was written), the reference logprobs give the
per-token KL penalty, GAE turns rewards and values into advantages, and `ppo_epochs` passes of clipped
policy and value losses (plus `ptx_coef` x the LM loss of a pretraining batch) update the policy and value.
Devices, mixed precision and processes come from `accelerate`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_scheduler

from instruct_tune.checkpoints import PPO_STATE_FILE, checkpoint_folders, save_state_atomically, trim_jsonl
from instruct_tune.config import PPOStageConfig
from instruct_tune.models.reward import pad_right
from instruct_tune.models.sampling import Rollout, decode_responses, left_pad
from instruct_tune.ppo import core
from instruct_tune.ppo.models import PPOModels
from instruct_tune.ppo.rollout import sample_rollout
from instruct_tune.ppo.sanity import PolicyGuard

logger = logging.getLogger(__name__)

STATE_FILE = PPO_STATE_FILE
SAMPLES_FILE = "samples.jsonl"


class NonFiniteError(RuntimeError):
    """A loss, score or statistic became NaN/inf: training stops before anything broken is written."""


def check_finite(step: int, **quantities: torch.Tensor | float) -> None:
    """Raise `NonFiniteError` naming the step and the first quantity that is NaN or infinite."""
    for name, value in quantities.items():
        tensor = torch.as_tensor(value)
        if not torch.isfinite(tensor).all():
            raise NonFiniteError(
                f"PPO step {step}: {name} is not finite ({tensor.flatten()[:4].tolist()}...); stopping "
                "without saving. Lower the learning rate, clip rewards (reward_clip) or check the reward model."
            )


@dataclass
class ScoredBatch:
    """A rollout with everything the PPO update needs, aligned on response tokens."""

    rollout: Rollout
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    kl: torch.Tensor
    non_score_reward: torch.Tensor


def response_slice(per_position: torch.Tensor, rollout: Rollout) -> torch.Tensor:
    """Outputs at the positions that predict the response tokens (column P-1 predicts token P)."""
    start = rollout.prompt_length - 1
    return per_position[:, start : start + rollout.response.shape[1]]


def ptx_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the real tokens of a right-padded text batch."""
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def right_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists (text batches); returns `(ids, mask)`."""
    ids = pad_right(sequences, pad_token_id)
    lengths = torch.as_tensor([len(s) for s in sequences])
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    return ids, mask


def _right_pad(
    ids: torch.Tensor, mask: torch.Tensor, length: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    extra = length - ids.shape[1]
    if extra <= 0:
        return ids, mask
    return F.pad(ids, (0, extra), value=pad_id), F.pad(mask, (0, extra), value=0)


class PPOTrainer:
    """Runs PPO on prompt token ids with the models of `build_ppo_models`; see the module docstring."""

    def __init__(
        self,
        args: PPOStageConfig,
        models: PPOModels,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[Sequence[int]],
        *,
        eval_prompts: Sequence[Sequence[int]] = (),
        ptx_rows: Sequence[Sequence[int]] = (),
    ) -> None:
        if not prompts:
            raise ValueError("PPO needs at least one prompt")
        self.args = args
        self.models = models
        self.tokenizer = tokenizer
        self.prompts = list(prompts)
        self.eval_prompts = list(eval_prompts)
        self.ptx_rows = list(ptx_rows)
        self.output_dir = Path(args.output_dir)
        mixed = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
        trackers = [t for t in (args.report_to or []) if t not in ("none", "all")]
        self.accelerator = Accelerator(
            cpu=args.use_cpu,
            mixed_precision=mixed,
            log_with=trackers or None,
            project_dir=str(self.output_dir),
        )
        if trackers:
            self.accelerator.init_trackers("ppo")
        set_seed(args.seed, device_specific=True)

        world = self.accelerator.num_processes
        episodes = args.total_episodes or int(args.num_train_epochs * len(self.prompts))
        self.num_steps = max(1, math.ceil(episodes / (args.rollout_batch_size * world)))
        if args.max_steps and args.max_steps > 0:
            self.num_steps = min(self.num_steps, args.max_steps)
        self.mini_batch_size = args.rollout_batch_size // args.num_mini_batches
        self.micro_batch_size = self.mini_batch_size // args.gradient_accumulation_steps
        updates = self.num_steps * args.ppo_epochs * args.num_mini_batches

        trainable = models.trainable
        # Train mode throughout (every dropout is off): bitsandbytes repacks 4-bit weights for CPU inference on
        # the first eval-mode forward, after which they cannot train.
        trainable.train()
        params = [p for p in trainable.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params,
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            weight_decay=args.weight_decay,
        )
        scheduler = get_scheduler(
            args.lr_scheduler_type,
            optimizer,
            num_warmup_steps=args.get_warmup_steps(updates),
            num_training_steps=updates,
        )
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(trainable, optimizer, scheduler)
        for module in models.frozen_modules():
            module.to(self.accelerator.device).eval()
        self.kl_controller = (
            core.AdaptiveKLController(args.kl_coef, args.target_kl, args.kl_horizon)
            if args.target_kl
            else core.FixedKLController(args.kl_coef)
        )
        self.step = 0
        self.log_history: list[dict[str, Any]] = []
        self.policy_guard = PolicyGuard(args)  # max_kl, min_eos_share (instruct_tune.ppo.sanity)

    # --- data ---------------------------------------------------------------------------------------------

    @property
    def unwrapped(self):  # noqa: ANN201 - PolicyAndValue
        return self.accelerator.unwrap_model(self.model)

    def _prompt_batch(self, step: int) -> list[list[int]]:
        """This process's prompts of `step`: a fresh seeded permutation per pass, so a resume sees the same."""
        batch, world = self.args.rollout_batch_size, self.accelerator.num_processes
        start = (step * world + self.accelerator.process_index) * batch
        rows = []
        for episode in range(start, start + batch):
            epoch, index = divmod(episode, len(self.prompts))
            order = torch.randperm(
                len(self.prompts), generator=torch.Generator().manual_seed(self.args.seed + epoch)
            )
            rows.append(self.prompts[order[index]])
        return rows

    def _ptx_batch(self, step: int, epoch: int, minibatch: int) -> list[list[int]]:
        if not self.ptx_rows:
            return []
        n = self.args.ptx_batch_size
        per_step = self.args.ppo_epochs * self.args.num_mini_batches * n
        start = (step * self.accelerator.num_processes + self.accelerator.process_index) * per_step
        start += (epoch * self.args.num_mini_batches + minibatch) * n
        return [self.ptx_rows[(start + i) % len(self.ptx_rows)] for i in range(n)]

    # --- rollout and scoring ------------------------------------------------------------------------------

    def _sample(self, prompts: Sequence[Sequence[int]], seed: int | None = None) -> Rollout:
        query, query_mask = left_pad(prompts, self.tokenizer.pad_token_id)
        device = self.accelerator.device
        with self.accelerator.autocast():
            return sample_rollout(
                self.unwrapped.policy,
                self.tokenizer,
                query.to(device),
                query_mask.to(device),
                max_new_tokens=self.args.max_new_tokens,
                temperature=self.args.temperature,
                top_p=self.args.top_p,
                generator_seed=seed,
            )

    @torch.no_grad()
    def _forward_scores(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """Policy and reference logprobs, values and scores of a rollout, in chunks."""
        chunk = self.args.forward_batch_size or len(rollout.query)
        parts: dict[str, list[torch.Tensor]] = {
            k: [] for k in ("logprobs", "ref_logprobs", "values", "scores", "entropy")
        }
        temperature = self.args.temperature
        for start in range(0, len(rollout.query), chunk):
            part = rollout.select(torch.arange(start, min(start + chunk, len(rollout.query))))
            ids, mask, length = part.input_ids, part.attention_mask, part.response.shape[1]
            with self.accelerator.autocast():
                logits, values = self.unwrapped(ids, mask, length)
                ref_logits = self.models.ref_logits(ids, mask, length)
                scores = self.models.scores(ids, mask, part.last_index)
            parts["logprobs"].append(core.logprobs_from_logits(logits, part.response, temperature))
            parts["entropy"].append(core.entropy_from_logits(logits, temperature))
            parts["ref_logprobs"].append(core.logprobs_from_logits(ref_logits, part.response, temperature))
            parts["values"].append(values.float())
            parts["scores"].append(scores.float())
        return {k: torch.cat(v) for k, v in parts.items()}

    def _scaled(self, scores: torch.Tensor) -> torch.Tensor:
        std = self.models.reward_std
        if not self.args.scale_scores:
            return scores
        if not std:
            raise ValueError("scale_scores: the reward model's normalisation records no std")
        return scores / std

    def score_rollout(self, rollout: Rollout) -> tuple[ScoredBatch, torch.Tensor]:
        """Rewards, advantages and returns of a rollout; also returns the per-token entropy."""
        args = self.args
        out = self._forward_scores(rollout)
        mask = rollout.response_mask
        scores = self._scaled(out["scores"])
        scores = core.penalize_missing_eos(scores, rollout.has_eos, args.missing_eos_penalty)
        if args.reward_clip:
            scores = scores.clamp(-args.reward_clip, args.reward_clip)
        check_finite(self.step, scores=scores, logprobs=out["logprobs"], values=out["values"])
        rewards, kl, non_score = core.kl_penalized_rewards(
            scores, out["logprobs"], out["ref_logprobs"], mask, self.kl_controller.value
        )
        if args.whiten_rewards:
            rewards = core.masked_whiten(rewards, mask, shift_mean=False)
        values = out["values"] * mask
        advantages, returns = core.gae_advantages(rewards, values, mask, args.gamma, args.lam)
        if args.whiten_advantages:
            advantages = core.masked_whiten(advantages, mask)
        batch = ScoredBatch(
            rollout,
            out["logprobs"] * mask,
            out["ref_logprobs"] * mask,
            values,
            scores,
            rewards,
            advantages,
            returns,
            kl,
            non_score,
        )
        return batch, out["entropy"]

    # --- update -------------------------------------------------------------------------------------------

    def _micro_step(
        self, batch: ScoredBatch, rows: torch.Tensor, ptx: list[list[int]]
    ) -> dict[str, torch.Tensor]:
        args = self.args
        part = batch.rollout.select(rows)
        ids, mask = part.input_ids, part.attention_mask
        n_ppo = len(rows)
        if ptx:
            ptx_ids, ptx_mask = right_pad(ptx, self.tokenizer.pad_token_id)
            ptx_ids, ptx_mask = ptx_ids.to(ids.device), ptx_mask.to(ids.device)
            length = max(ids.shape[1], ptx_ids.shape[1])
            ids, mask = _right_pad(ids, mask, length, self.tokenizer.pad_token_id)
            ptx_ids, ptx_mask = _right_pad(ptx_ids, ptx_mask, length, self.tokenizer.pad_token_id)
            ids, mask = torch.cat([ids, ptx_ids]), torch.cat([mask, ptx_mask])
        if ptx:  # the LM loss needs every position's logits
            logits, values = self.model(ids, mask)
            response_logits, vpred = (
                response_slice(logits[:n_ppo], part),
                response_slice(values[:n_ppo], part),
            )
        else:
            response_logits, vpred = self.model(ids, mask, part.response.shape[1])
        logprobs = core.logprobs_from_logits(response_logits, part.response, args.temperature)
        vpred = vpred.float()
        rmask = part.response_mask
        pg_loss, pg_stats = core.policy_loss(
            logprobs, batch.logprobs[rows], batch.advantages[rows], rmask, args.cliprange
        )
        vf_loss, vf_stats = core.value_loss(
            vpred, batch.values[rows], batch.returns[rows], rmask, args.cliprange_value
        )
        loss = pg_loss + args.vf_coef * vf_loss
        stats = {
            "loss/policy": pg_loss.detach(),
            "loss/value": vf_loss.detach(),
            "policy/clipfrac": pg_stats["clipfrac"],
            "policy/approxkl": pg_stats["approxkl"],
            "policy/ratio": pg_stats["ratio"],
            "val/clipfrac": vf_stats["clipfrac"],
        }
        if ptx:
            lm = ptx_lm_loss(logits[n_ppo:], ids[n_ppo:], mask[n_ppo:])
            loss = loss + args.ptx_coef * lm
            stats["loss/ptx"] = lm.detach()
        check_finite(self.step, loss=loss.detach())
        self.accelerator.backward(loss / args.gradient_accumulation_steps)
        return stats

    def update(self, batch: ScoredBatch) -> dict[str, float]:
        """`ppo_epochs` passes over the batch in minibatches; returns the mean of each statistic."""
        args = self.args
        self.model.train()
        sums: dict[str, float] = {}
        count = 0
        generator = torch.Generator().manual_seed(args.seed * 100003 + self.step)
        size = len(batch.scores)
        for epoch in range(args.ppo_epochs):
            order = torch.randperm(size, generator=generator).to(batch.scores.device)
            for m in range(args.num_mini_batches):
                minibatch = order[m * self.mini_batch_size : (m + 1) * self.mini_batch_size]
                ptx = self._ptx_batch(self.step, epoch, m)
                ptx_per_micro = -(-len(ptx) // args.gradient_accumulation_steps) if ptx else 0
                for a in range(args.gradient_accumulation_steps):
                    rows = minibatch[a * self.micro_batch_size : (a + 1) * self.micro_batch_size]
                    micro_ptx = ptx[a * ptx_per_micro : (a + 1) * ptx_per_micro]
                    last = a == args.gradient_accumulation_steps - 1
                    context = self.accelerator.no_sync(self.model) if not last else nullcontext()
                    with context:
                        stats = self._micro_step(batch, rows, micro_ptx)
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                    count += 1
                if args.max_grad_norm and args.max_grad_norm > 0:
                    norm = self.accelerator.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                    check_finite(self.step, grad_norm=norm)
                    sums["grad_norm"] = (
                        sums.get("grad_norm", 0.0) + float(norm) * args.gradient_accumulation_steps
                    )
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        return {k: v / count for k, v in sums.items()}

    # --- evaluation -------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, prefix: str = "eval", prompts: Sequence[Sequence[int]] | None = None) -> dict[str, float]:
        """Mean score, KL to the reference, length and EOS share of the policy's answers to held-out prompts.

        Sampled at the training temperature with a fixed seed, so the start and end figures compare alike.
        """
        pool = self.eval_prompts if prompts is None else list(prompts)  # `prompts`: this process's, all used
        n = min(self.args.eval_samples, len(pool)) if prompts is None else len(pool)
        if n == 0:
            return {}
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        mine = pool[:n][rank::world] if prompts is None else pool
        sums = torch.zeros(5, device=self.accelerator.device)
        chunk = self.args.rollout_batch_size
        for start in range(0, len(mine), chunk):
            rollout = self._sample(mine[start : start + chunk], seed=self.args.seed + 7919 * start + rank)
            out = self._forward_scores(rollout)
            kl = ((out["logprobs"] - out["ref_logprobs"]) * rollout.response_mask).sum(1)
            scores = core.penalize_missing_eos(
                self._scaled(out["scores"]), rollout.has_eos, self.args.missing_eos_penalty
            )
            sums += torch.stack(
                [
                    scores.sum(),
                    kl.sum(),
                    rollout.response_mask.sum().float(),
                    rollout.has_eos.float().sum(),
                    torch.tensor(float(len(scores)), device=sums.device),
                ]
            )
        sums = self.accelerator.reduce(sums, reduction="sum")
        total = sums[4].clamp(min=1)
        return {
            f"{prefix}_reward": (sums[0] / total).item(),
            f"{prefix}_kl": (sums[1] / total).item(),
            f"{prefix}_response_length": (sums[2] / total).item(),
            f"{prefix}_eos_share": (sums[3] / total).item(),
            f"{prefix}_prompts": int(total.item()),
        }

    # --- checkpoints ----------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Model, optimizer, scheduler, RNG states (accelerate) plus step, beta and log history, written under
        a temporary name and renamed when whole (a kill or a full disk leaves no partial `checkpoint-*`)."""
        folder = self.output_dir / f"checkpoint-{self.step}"
        state = {"step": self.step, "kl_controller": self.kl_controller.state_dict(), "log_history": self.log_history}
        save_state_atomically(self.accelerator, folder, {STATE_FILE: json.dumps(state)})
        if self.accelerator.is_main_process:
            self._rotate_checkpoints()
        self.accelerator.wait_for_everyone()
        return folder

    def _rotate_checkpoints(self) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        for old in checkpoint_folders(self.output_dir)[limit:]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, folder: str | Path) -> None:
        """Continue the run saved in `folder`."""
        folder = Path(folder)
        state_file = folder / STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(f"{folder} is not a PPO checkpoint (no {STATE_FILE})")
        self.accelerator.load_state(str(folder))
        state = json.loads(state_file.read_text())
        self.step = int(state["step"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.log_history = state["log_history"]
        if self.accelerator.is_main_process:  # the steps after the checkpoint are sampled again
            trim_jsonl(self.output_dir / SAMPLES_FILE, self.step)
        logger.info("Resumed PPO from %s at step %d of %d", folder, self.step, self.num_steps)

    # --- the loop -------------------------------------------------------------------------------------

    def _log_samples(self, rollout: Rollout, scores: torch.Tensor) -> None:
        n = self.args.num_samples_logged
        if n <= 0 or not self.accelerator.is_main_process:
            return
        prompts = self.tokenizer.batch_decode(rollout.query[:n], skip_special_tokens=True)
        responses = decode_responses(self.tokenizer, rollout.select(torch.arange(min(n, len(scores)))))
        rows = [
            {"step": self.step, "prompt": p.strip(), "response": r, "score": round(float(s), 4)}
            for p, r, s in zip(prompts, responses, scores[:n].tolist(), strict=False)
        ]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with (self.output_dir / SAMPLES_FILE).open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        table = ["| prompt | response | score |", "| --- | --- | --- |"]
        table += [f"| {r['prompt'][-60:]!r} | {r['response'][:60]!r} | {r['score']:.2f} |" for r in rows]
        logger.info("Samples at step %d:\n%s", self.step, "\n".join(table))

    def _step_stats(
        self,
        batch: ScoredBatch,
        entropy: torch.Tensor,
        train_stats: dict[str, float],
        timings: dict[str, float],
    ) -> dict[str, float]:
        mask = batch.rollout.response_mask
        local = {
            "objective/scores": batch.scores.mean(),
            "objective/kl": batch.kl.sum(1).mean(),
            "objective/non_score_reward": batch.non_score_reward.sum(1).mean(),
            "objective/rlhf_reward": (batch.scores + batch.non_score_reward.sum(1)).mean(),
            "objective/entropy": core.masked_mean(entropy, mask),
            "val/mean": core.masked_mean(batch.values, mask),
            "val/returns": core.masked_mean(batch.returns, mask),
            "response/length": mask.sum(1).float().mean(),
            "response/eos_share": batch.rollout.has_eos.float().mean(),
        }
        keys = sorted(local)
        reduced = self.accelerator.reduce(torch.stack([local[k].float() for k in keys]), reduction="mean")
        stats = {k: float(v) for k, v in zip(keys, reduced.tolist(), strict=True)}
        stats.update(train_stats)
        tokens = float(mask.sum() + batch.rollout.query_mask.sum()) * self.accelerator.num_processes
        stats["speed/generation_tokens_per_s"] = (
            float(mask.sum()) * self.accelerator.num_processes / timings["generate"]
        )
        stats["speed/train_tokens_per_s"] = tokens * self.args.ppo_epochs / timings["train"]
        stats["time/generate_s"] = timings["generate"]  # sampling the rollout
        stats["time/train_s"] = timings["train"]  # scoring it (reward, reference, values) and the PPO epochs
        stats["kl_coef"] = self.kl_controller.value
        stats["lr"] = self.scheduler.get_last_lr()[0]
        stats["episodes"] = self.step * self.args.rollout_batch_size * self.accelerator.num_processes
        stats["step"] = self.step
        return stats

    def train(self, resume_from: str | Path | None = None) -> dict[str, Any]:
        """Run every PPO step (after resuming from `resume_from` when given); returns the final metrics."""
        args = self.args
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        elif self.accelerator.is_main_process:  # a fresh run: no samples of an earlier one
            (self.output_dir / SAMPLES_FILE).unlink(missing_ok=True)
        metrics: dict[str, Any] = {}
        if self.step == 0 and self.eval_prompts:
            metrics.update(self.evaluate("eval_start"))
            logger.info("Before PPO: %s", _fmt(metrics))
        else:
            start_record = next((r for r in self.log_history if "eval_start_reward" in r), {})
            metrics.update(start_record)
        if "eval_start_eos_share" in metrics:
            start = (metrics["eval_start_kl"], metrics["eval_start_eos_share"], metrics["eval_start_prompts"])
            self.policy_guard.check(self.step, "start eval", *start)
        if self.step == 0:
            self.log_history.append(dict(metrics))
        started = time.perf_counter()
        bar = tqdm(
            total=self.num_steps, initial=self.step, desc="PPO", disable=not self.accelerator.is_main_process
        )
        while self.step < self.num_steps:
            t0 = time.perf_counter()
            rollout = self._sample(self._prompt_batch(self.step))
            t1 = time.perf_counter()
            batch, entropy = self.score_rollout(rollout)
            train_stats = self.update(batch)
            t2 = time.perf_counter()
            self.step += 1
            stats = self._step_stats(batch, entropy, train_stats, {"generate": t1 - t0, "train": t2 - t1})
            check_finite(self.step, **{k: v for k, v in stats.items() if isinstance(v, float)})
            responses = args.rollout_batch_size * self.accelerator.num_processes
            figures = (stats["objective/kl"], stats["response/eos_share"], responses)
            self.policy_guard.check(self.step, "rollout", *figures)
            self.kl_controller.update(
                stats["objective/kl"], args.rollout_batch_size * self.accelerator.num_processes
            )
            self.log_history.append(stats)
            self.accelerator.log(stats, step=self.step)
            bar.update(1)
            bar.set_postfix(
                score=f"{stats['objective/scores']:.3f}",
                kl=f"{stats['objective/kl']:.3f}",
                eos=f"{stats['response/eos_share']:.2f}",
                beta=f"{stats['kl_coef']:.3g}",
            )
            if args.logging_steps and self.step % int(args.logging_steps) == 0:
                logger.info("step %d: %s", self.step, _fmt(stats))
            if args.sample_steps and (self.step % args.sample_steps == 0 or self.step == 1):
                self._log_samples(batch.rollout, batch.scores)
            # The last step too: a kill before the run folder is written then redoes no step (and logs no
            # sample twice).
            if args.save_steps and (self.step % int(args.save_steps) == 0 or self.step == self.num_steps):
                self.save_checkpoint()
        bar.close()
        runtime = time.perf_counter() - started
        last = self.log_history[-1] if self.log_history else {}
        metrics.update({k: v for k, v in last.items() if "/" in k or k in ("kl_coef", "episodes")})
        metrics["train_runtime"] = runtime
        metrics["ppo_steps"] = self.step
        end = self.evaluate("eval_end") if self.eval_prompts else {}
        if end:
            logger.info("After PPO: %s", _fmt(end))
            figures = (end["eval_end_kl"], end["eval_end_eos_share"], end["eval_end_prompts"])
            self.policy_guard.check(self.step, "end eval", *figures)
            metrics.update(end)
        elif args.max_kl is not None or args.min_eos_share:  # the last update is seen by no rollout: probe it
            probe = self.evaluate("probe", prompts=self._prompt_batch(self.step))
            figures = (probe["probe_kl"], probe["probe_eos_share"], probe["probe_prompts"])
            self.policy_guard.check(self.step, "after-training probe", *figures)
        return metrics


def _fmt(stats: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items())
