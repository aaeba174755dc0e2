"""Config of the DPO stage: TRL's `DPOConfig` with the bf16 default chosen per device, and our options."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DPOConfig

from instruct_tune.config.checks import check_max_length, check_number
from instruct_tune.config.errors import ConfigError
from instruct_tune.config.trl_stages import TRLStageDefaults

# How a K-way ranking becomes DPO pairs (instruct_tune.data.dpo_pairs).
DPO_PAIRS = ("all", "best")


@dataclass
class DPOStageConfig(TRLStageDefaults, DPOConfig):
    """TRL's `DPOConfig` for the DPO stage (`instruct_tune.stages.dpo`).

    `per_device_train_batch_size` counts (chosen, rejected) pairs, not prompts: with `dpo_pairs: all` a K=4
    ranking gives 6 of them. The reference is the SFT policy the stage starts from (`model_name_or_path`).
    """

    dpo_pairs: str = field(
        default="all",
        metadata={
            "help": "How a K-way ranking of one prompt becomes DPO pairs. `all`: every (better, worse) pair of "
            "the ranking, C(K,2) of them; `best`: the top-ranked response against each of the others, K-1 "
            "pairs. A plain chosen/rejected row is its one pair either way."
        },
    )
    max_dropped_share: float = field(
        default=0.25,
        metadata={
            "help": "Largest share of the training (or eval) pairs that `max_length` may drop (prompt alone too "
            "long) or cut (a response truncated, EOS lost) before the stage stops; every such pair is counted "
            "in the log and in metrics.json either way (1.0: allow any)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dpo_pairs not in DPO_PAIRS:
            raise ConfigError(
                f"dpo_pairs: {self.dpo_pairs!r} is not one of {', '.join(DPO_PAIRS)} (all: every pair of a "
                "ranking; best: the top-ranked response against each other one)"
            )
        check_max_length("max_length", self.max_length)
        check_number("beta", self.beta, above=0)
        check_number("max_dropped_share", self.max_dropped_share, at_least=0, at_most=1)
