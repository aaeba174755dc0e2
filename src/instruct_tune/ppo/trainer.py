"""Our PPO loop (InstructGPT step 3): rollout, score, per-token KL penalty, GAE, clipped updates, PPO-ptx.

Each step: every process answers `rollout_batch_size` prompts through its `RolloutBackend`, the frozen reward
model scores the answers (normalised, minus `missing_eos_penalty` where no EOS was written), the reference
logprobs give the per-token KL penalty, the `AdvantageEstimator` (default: KL in the reward, GAE) turns rewards
and values into advantages, and `ppo_epochs` passes of clipped policy and value losses (plus `ptx_coef` x the
LM loss of a pretraining batch) update the policy and value; then the backend syncs its weights.
Devices, mixed precision and processes come from `accelerate`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from instruct_tune.checkpoints import trim_jsonl
from instruct_tune.compat import deepspeed_on_cpu, fsdp_on_cpu, reset_accelerate_state
from instruct_tune.config import PPOStageConfig
from instruct_tune.models.sampling import Rollout
from instruct_tune.ppo import checkpointing, core, schedule
from instruct_tune.ppo.advantages import AdvantageEstimator, AdvantageInputs, KLPenalizedGAE
from instruct_tune.ppo.models import PPOModels
from instruct_tune.ppo.reporting import SAMPLES_FILE, fmt, log_samples, step_stats
from instruct_tune.ppo.rollout import RolloutBackend, make_rollout_backend, rollout_on
from instruct_tune.ppo.sanity import NonFiniteError, PolicyGuard, check_finite
from instruct_tune.ppo.scoring import ScoredBatch, forward_rollout
from instruct_tune.ppo.sharding import gathered_weights
from instruct_tune.ppo.update import micro_batch_loss, optimizer_and_scheduler

logger = logging.getLogger(__name__)

STATE_FILE = checkpointing.STATE_FILE

__all__ = ["SAMPLES_FILE", "STATE_FILE", "NonFiniteError", "PPOTrainer", "ScoredBatch", "check_finite"]


class PPOTrainer:
    """Runs PPO on prompt token ids with the models of `build_ppo_models`; see the module docstring.

    `rollout_backend` samples the rollouts (default: the one `args.rollout_backend` names, `make_rollout_backend`);
    `advantage_estimator` turns scored rollouts into advantages (default: `KLPenalizedGAE` of `args`).
    """

    def __init__(
        self,
        args: PPOStageConfig,
        models: PPOModels,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[Sequence[int]],
        *,
        eval_prompts: Sequence[Sequence[int]] = (),
        ptx_rows: Sequence[Sequence[int]] = (),
        rollout_backend: RolloutBackend | None = None,
        advantage_estimator: AdvantageEstimator | None = None,
    ) -> None:
        if not prompts:
            raise ValueError("PPO needs at least one prompt")
        # scale_scores: the full normalisation, (raw + bias) / scale; otherwise its shift only, raw + bias.
        if args.scale_scores and not models.normalization.std:
            raise ValueError("scale_scores: the reward model's normalisation records no std")
        self.normalization = models.normalization if args.scale_scores else models.normalization.shift_only()
        self.args = args
        self.models = models
        self.tokenizer = tokenizer
        self.prompts = list(prompts)
        self.eval_prompts = list(eval_prompts)
        self.ptx_rows = list(ptx_rows)
        self.output_dir = Path(args.output_dir)
        mixed = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
        trackers = [t for t in (args.report_to or []) if t not in ("none", "all")]
        # A fresh accelerate state, as building `TrainingArguments` gives the Trainer stages: a stage run
        # earlier in this process (tests, notebooks) would leave its state and refuse another mixed precision.
        reset_accelerate_state()
        if fsdp_on_cpu(args):  # `accelerate launch --config_file recipes/accelerate/fsdp_cpu.yaml`
            logger.info("FSDP over CPU processes (gloo)")
        # `recipes/accelerate/zero3_cpu.yaml`: DeepSpeed's CPU processes (`cpu=True` would turn DeepSpeed off).
        deepspeed_cpu = deepspeed_on_cpu()
        if deepspeed_cpu:
            logger.info("DeepSpeed over CPU processes (gloo)")
        self.accelerator = Accelerator(
            cpu=args.use_cpu and not deepspeed_cpu,
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

        self.deepspeed = self.accelerator.state.deepspeed_plugin is not None
        if self.deepspeed:
            self._deepspeed_config(world)
            stage = self.accelerator.state.deepspeed_plugin.zero_stage
            logger.info("DeepSpeed ZeRO-%s over %d processes (%s)", stage, world, self.accelerator.state.backend)
        trainable = models.trainable
        # Train mode throughout (every dropout is off): bitsandbytes repacks 4-bit weights for CPU inference on
        # the first eval-mode forward, after which they cannot train.
        trainable.train()
        optimizer, scheduler = optimizer_and_scheduler(trainable, args, updates)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(trainable, optimizer, scheduler)
        checkpointing.keep_trainable_weights_only(self.accelerator)
        for module in models.frozen_modules():
            module.to(self.accelerator.device).eval()
        self.rollout_backend: RolloutBackend = rollout_backend or make_rollout_backend(
            args, self.unwrapped.policy, tokenizer, self.accelerator.device
        )
        self.advantage_estimator: AdvantageEstimator = advantage_estimator or KLPenalizedGAE.from_args(args)
        self.kl_controller = (
            core.AdaptiveKLController(args.kl_coef, args.target_kl, args.kl_horizon)
            if args.target_kl
            else core.FixedKLController(args.kl_coef)
        )
        self.step = 0
        self.log_history: list[dict[str, Any]] = []
        self.policy_guard = PolicyGuard(args)  # max_kl, min_eos_share (instruct_tune.ppo.sanity)

    def _deepspeed_config(self, world: int) -> None:
        """Fill the launcher's DeepSpeed config with the loop's batch (no dataloader tells accelerate), its
        gradient accumulation and clipping (DeepSpeed's engine does both), and our torch AdamW."""
        args = self.args
        config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        config["train_micro_batch_size_per_gpu"] = self.micro_batch_size
        config["gradient_accumulation_steps"] = args.gradient_accumulation_steps
        config["train_batch_size"] = self.micro_batch_size * args.gradient_accumulation_steps * world
        config["gradient_clipping"] = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else 0.0
        config["zero_allow_untested_optimizer"] = True  # torch's AdamW, not DeepSpeed's compiled Adam
        self.accelerator.gradient_accumulation_steps = args.gradient_accumulation_steps  # `accumulate` counts them

    # --- data ---------------------------------------------------------------------------------------------

    @property
    def unwrapped(self):  # noqa: ANN201 - PolicyAndValue
        return self.accelerator.unwrap_model(self.model)

    def whole_weights(self) -> AbstractContextManager:
        """The rollout phase's weights: under FSDP2 gathered once for all its forwards (`ppo.sharding`)."""
        return gathered_weights(self.model)

    def _prompt_batch(self, step: int) -> list[Sequence[int]]:
        """This process's prompts of `step` (`instruct_tune.ppo.schedule`)."""
        acc = self.accelerator
        return schedule.prompt_batch(self.prompts, step, self.args, acc.num_processes, acc.process_index)

    def _ptx_batch(self, step: int, epoch: int, minibatch: int) -> list[Sequence[int]]:
        acc, rows = self.accelerator, self.ptx_rows
        return schedule.ptx_batch(
            rows, step, epoch, minibatch, self.args, acc.num_processes, acc.process_index
        )

    # --- rollout and scoring ------------------------------------------------------------------------------

    def _sample(self, prompts: Sequence[Sequence[int]], seed: int | None = None) -> Rollout:
        with self.accelerator.autocast():
            rollout = self.rollout_backend.generate(prompts, seed=seed)
        return rollout_on(rollout, self.accelerator.device)

    def _forward(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """Policy and reference logprobs, entropy, values and raw reward scores of a rollout."""
        return forward_rollout(
            self.unwrapped,
            self.models,
            rollout,
            temperature=self.args.temperature,
            chunk=self.args.forward_batch_size,
            autocast=self.accelerator.autocast,
        )

    def _scores(self, raw: torch.Tensor, rollout: Rollout) -> torch.Tensor:
        """Normalised scores (see `normalization`), minus `missing_eos_penalty` where no EOS was written."""
        scores = self.normalization.apply(raw)
        return core.penalize_missing_eos(scores, rollout.has_eos, self.args.missing_eos_penalty)

    def score_rollout(self, rollout: Rollout) -> tuple[ScoredBatch, torch.Tensor]:
        """Rewards, advantages and returns of a rollout; also returns the per-token entropy."""
        args = self.args
        out = self._forward(rollout)
        mask = rollout.response_mask
        scores = self._scores(out["scores"], rollout)
        if args.reward_clip:
            scores = scores.clamp(-args.reward_clip, args.reward_clip)
        check_finite(self.step, scores=scores, logprobs=out["logprobs"], values=out["values"])
        values = out["values"] * mask
        inputs = AdvantageInputs(
            scores, out["logprobs"], out["ref_logprobs"], values, mask, self.kl_controller.value
        )
        estimate = self.advantage_estimator.estimate(inputs)
        batch = ScoredBatch(
            rollout,
            out["logprobs"] * mask,
            out["ref_logprobs"] * mask,
            values,
            scores,
            estimate.rewards,
            estimate.advantages,
            estimate.returns,
            estimate.kl,
            estimate.non_score_reward,
        )
        return batch, out["entropy"]

    # --- update -------------------------------------------------------------------------------------------

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
                    with self._accumulating(last):
                        loss, stats = micro_batch_loss(
                            self.model,
                            batch,
                            rows,
                            micro_ptx,
                            args,
                            pad_token_id=self.tokenizer.pad_token_id,
                            needs_values=self.advantage_estimator.needs_values,
                        )
                        check_finite(self.step, loss=loss.detach())
                        # DeepSpeed divides by its gradient_accumulation_steps itself (`_deepspeed_config`).
                        scale = 1 if self.deepspeed else args.gradient_accumulation_steps
                        self.accelerator.backward(loss / scale)
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

    def _accumulating(self, last: bool) -> AbstractContextManager:
        """A micro-batch's backward: no gradient sync but after the last of a minibatch (DeepSpeed: its engine
        steps there, through `accumulate`; optimizer and scheduler steps of the loop are then no-ops)."""
        if self.deepspeed:
            return self.accelerator.accumulate(self.model)
        return self.accelerator.no_sync(self.model) if not last else nullcontext()

    # --- evaluation -------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(
        self, prefix: str = "eval", prompts: Sequence[Sequence[int]] | None = None
    ) -> dict[str, float]:
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
        with self.whole_weights():
            self._evaluate_into(sums, mine, chunk, rank)
        sums = self.accelerator.reduce(sums, reduction="sum")
        total = sums[4].clamp(min=1)
        return {
            f"{prefix}_reward": (sums[0] / total).item(),
            f"{prefix}_kl": (sums[1] / total).item(),
            f"{prefix}_response_length": (sums[2] / total).item(),
            f"{prefix}_eos_share": (sums[3] / total).item(),
            f"{prefix}_prompts": int(total.item()),
        }

    def _evaluate_into(self, sums: torch.Tensor, prompts: Sequence[Sequence[int]], chunk: int, rank: int) -> None:
        """Add score, KL, length, EOS and count sums of the answers to `prompts` into `sums`."""
        for start in range(0, len(prompts), chunk):
            rollout = self._sample(prompts[start : start + chunk], seed=self.args.seed + 7919 * start + rank)
            out = self._forward(rollout)
            kl = ((out["logprobs"] - out["ref_logprobs"]) * rollout.response_mask).sum(1)
            scores = self._scores(out["scores"], rollout)
            sums += torch.stack(
                [
                    scores.sum(),
                    kl.sum(),
                    rollout.response_mask.sum().float(),
                    rollout.has_eos.float().sum(),
                    torch.tensor(float(len(scores)), device=sums.device),
                ]
            )

    # --- checkpoints ----------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Model, optimizer, scheduler, RNG states (accelerate) plus step, beta and log history, written whole
        or not at all (`instruct_tune.ppo.checkpointing`)."""
        state = {
            "step": self.step,
            "kl_controller": self.kl_controller.state_dict(),
            "log_history": self.log_history,
        }
        return checkpointing.save_checkpoint(
            self.accelerator, self.output_dir, self.step, state, self.args.save_total_limit
        )

    def load_checkpoint(self, folder: str | Path) -> None:
        """Continue the run saved in `folder`."""
        state = checkpointing.load_checkpoint(self.accelerator, folder, self.model)
        self.step = int(state["step"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.log_history = state["log_history"]
        self.rollout_backend.sync_weights()  # the policy's weights are the checkpoint's now
        if self.accelerator.is_main_process:  # the steps after the checkpoint are sampled again
            trim_jsonl(self.output_dir / SAMPLES_FILE, self.step)
        logger.info("Resumed PPO from %s at step %d of %d", folder, self.step, self.num_steps)

    # --- the loop -------------------------------------------------------------------------------------

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
            logger.info("Before PPO: %s", fmt(metrics))
        else:
            start_record = next((r for r in self.log_history if "eval_start_reward" in r), {})
            metrics.update(start_record)
        if "eval_start_eos_share" in metrics:
            start = (metrics["eval_start_kl"], metrics["eval_start_eos_share"], metrics["eval_start_prompts"])
            self.policy_guard.check(self.step, "start eval", *start)
        if self.step == 0:
            self.log_history.append(dict(metrics))
        started = time.perf_counter()
        quiet = bool(self.args.disable_tqdm) or not self.accelerator.is_main_process
        bar = tqdm(total=self.num_steps, initial=self.step, desc="PPO", disable=quiet)
        while self.step < self.num_steps:
            t0 = time.perf_counter()
            with self.whole_weights():
                rollout = self._sample(self._prompt_batch(self.step))
                t1 = time.perf_counter()
                batch, entropy = self.score_rollout(rollout)
            train_stats = self.update(batch)
            self.rollout_backend.sync_weights()
            t2 = time.perf_counter()
            self.step += 1
            timings = {"generate": t1 - t0, "train": t2 - t1}
            with_values = self.advantage_estimator.needs_values
            stats = step_stats(
                self.accelerator, batch, entropy, train_stats, timings, args.ppo_epochs, with_values
            )
            world = self.accelerator.num_processes
            stats.update(kl_coef=self.kl_controller.value, lr=self.scheduler.get_last_lr()[0])
            stats.update(episodes=self.step * args.rollout_batch_size * world, step=self.step)
            check_finite(self.step, **{k: v for k, v in stats.items() if isinstance(v, float)})
            responses = args.rollout_batch_size * self.accelerator.num_processes
            figures = (stats["objective/kl"], stats["response/eos_share"], responses)
            self.policy_guard.check(self.step, "rollout", *figures)
            self.kl_controller.update(stats["objective/kl"], responses)
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
                logger.info("step %d: %s", self.step, fmt(stats))
            if args.sample_steps and (self.step % args.sample_steps == 0 or self.step == 1):
                n = args.num_samples_logged
                if n > 0 and self.accelerator.is_main_process:
                    log_samples(self.tokenizer, batch.rollout, batch.scores, self.step, n, self.output_dir)
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
            logger.info("After PPO: %s", fmt(end))
            figures = (end["eval_end_kl"], end["eval_end_eos_share"], end["eval_end_prompts"])
            self.policy_guard.check(self.step, "end eval", *figures)
            metrics.update(end)
        elif args.max_kl is not None or args.min_eos_share:  # the last update is seen by no rollout: probe it
            probe = self.evaluate("probe", prompts=self._prompt_batch(self.step))
            figures = (probe["probe_kl"], probe["probe_eos_share"], probe["probe_prompts"])
            self.policy_guard.check(self.step, "after-training probe", *figures)
        return metrics
