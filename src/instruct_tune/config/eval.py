"""Options of the evaluation stage (`instruct_tune.stages.eval`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from instruct_tune.config.checks import check_count
from instruct_tune.config.errors import ConfigError


@dataclass
class EvalStageConfig:
    """Options of the evaluation stage: policies against their SFT start on held-out prompts.

    Every policy answers every prompt once with the same decoding and seeds (sampled at `temperature`, and
    greedy when `greedy`); the reward model, the `gold_judge` and any `judges` (registered judges, by name)
    compare each answer with the SFT policy's (ties half). See `instruct_tune.stages.eval` for the metrics.
    """

    output_dir: str = field(default="outputs/tiny/eval", metadata={"help": "Where metrics, tables and plots go."})
    sft_path: str | None = field(
        default=None, metadata={"help": "SFT run folder (or checkpoint): the baseline and the KL reference."}
    )
    policy_paths: list[str] = field(
        default_factory=list,
        metadata={"help": "Policy run folders to evaluate (PPO, PPO-ptx...); the first gives the headline keys."},
    )
    policy_names: list[str] | None = field(
        default=None, metadata={"help": "A label per policy (default: each folder's name)."}
    )
    reward_model_path: str | None = field(
        default=None, metadata={"help": "Reward stage run folder (scores are normalised)."}
    )
    gold_judge: str | None = field(
        default="tiny_gold",
        metadata={
            "help": "Registered judge giving the gold figures (gold mean and win rate, perfect share, exact "
            "match): every prompt must be one it can judge. null (--gold_judge none): the reward model alone."
        },
    )
    judges: list[str] = field(
        default_factory=list,
        metadata={"help": "More registered judges, each reported as `<name>_mean` and `win_rate_vs_sft_<name>`."},
    )
    dataset_name: str = field(
        default="data/tiny/heldout_prompts.jsonl",
        metadata={"help": "Held-out prompts: any prompt-bearing file, folder or Hub dataset id."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to read from `dataset_name`."})
    max_samples: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    ptx_eval_dataset: str | None = field(
        default=None,
        metadata={"help": "Held-out plain text (`text` rows) for the perplexity of each policy (null: skip)."},
    )
    ptx_eval_rows: int | None = field(
        default=None, metadata={"help": "Use only the last N rows of `ptx_eval_dataset` (null: all)."}
    )
    ptx_eval_max_length: int = field(default=128, metadata={"help": "Perplexity texts are cut to this many tokens."})
    max_new_tokens: int = field(default=64, metadata={"help": "Longest response generated."})
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature (the PPO training one); the KL uses it too."}
    )
    samples_per_prompt: int = field(
        default=1,
        metadata={
            "help": "Sampled answers per prompt and policy (batch seeds differ): every figure averages over all "
            "of them, so a win rate on N prompts carries less sampling noise. Greedy answers once."
        },
    )
    greedy: bool = field(default=True, metadata={"help": "Also answer greedily and report it beside sampling."})
    batch_size: int = field(default=64, metadata={"help": "Prompts (or texts) per forward or generate call."})
    seed: int = field(default=42, metadata={"help": "Sampling seed: batch i is sampled with seed + i x batch_size."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run model code shipped with checkpoints."})

    def __post_init__(self) -> None:
        if isinstance(self.policy_paths, str):
            self.policy_paths = [self.policy_paths]
        if isinstance(self.policy_names, str):
            self.policy_names = [self.policy_names]
        if isinstance(self.judges, str):
            self.judges = [self.judges]
        if isinstance(self.gold_judge, str) and self.gold_judge.lower() in ("", "none", "null"):
            self.gold_judge = None
        if self.policy_names is not None and len(self.policy_names) != len(self.policy_paths):
            raise ConfigError(
                f"policy_names: {len(self.policy_names)} names for {len(self.policy_paths)} policy_paths"
            )
        for name in ("max_new_tokens", "batch_size", "ptx_eval_max_length", "samples_per_prompt"):
            check_count(name, getattr(self, name))
        for name in ("max_samples", "ptx_eval_rows"):
            check_count(name, getattr(self, name), optional=True)
        if self.temperature <= 0:
            raise ConfigError(f"temperature: {self.temperature} must be > 0 (`greedy` adds greedy decoding)")
