"""One reward normalisation for every consumer: the reward stage fits it, PPO, eval and later stages apply it.

    norm = RewardNormalization.fit(raw_scores_of_reference_responses, source="samples of outputs/tiny/sft")
    norm.apply(raw)          # (raw + bias) / scale: the reference responses score mean 0, std 1
    norm.write(run_folder)   # reward_normalization.json; RewardNormalization.read(run_folder) gives it back

InstructGPT shifts the reward so that SFT samples score 0 on average; lm-human-preferences also divides by
their std (its "gain"), which keeps PPO's KL coefficient meaningful across reward models. Bias and scale travel
together so that eval's rewards and PPO's are in the same units. The file keeps the keys older run folders
have (`bias`, `mean`, `std`, `n`, `source`); `scale` defaults to `std` where a file has none.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

NORMALIZATION_FILE = "reward_normalization.json"

logger = logging.getLogger(__name__)


class NormalizationError(ValueError):
    """A reward_normalization.json that cannot be used."""


@dataclass(frozen=True)
class RewardNormalization:
    """normalised = (raw + bias) / scale; `mean`/`std` are the raw reference scores' statistics."""

    bias: float = 0.0
    scale: float = 1.0
    mean: float = 0.0
    std: float = 0.0  # 0: no reference scores measured (PPO's `scale_scores` refuses such a normalisation)
    n: int = 0
    source: str = "none"

    @classmethod
    def fit(cls, raw: torch.Tensor, source: str) -> RewardNormalization:
        """The normalisation under which `raw` (reference responses' scores) has mean 0 and std 1."""
        # float32, as the scores come: the figures of earlier run folders to the last digit (PPO's trajectory
        # follows the bias and scale, and a float64 mean moved a seed-42 run's final KL from 0.70 to 0.86)
        raw = raw.detach().float().flatten()
        if raw.numel() == 0:
            raise NormalizationError(f"normalisation: no reference scores from {source}")
        mean = raw.mean().item()
        std = raw.std().item() if raw.numel() > 1 else 0.0
        return cls(
            bias=-mean, scale=std if std > 0 else 1.0, mean=mean, std=std, n=raw.numel(), source=source
        )

    @classmethod
    def identity(cls, source: str = "none") -> RewardNormalization:
        """Raw scores unchanged: a reward model without a normalisation file."""
        return cls(source=source)

    @classmethod
    def load(cls, folder: str | Path) -> RewardNormalization:
        """The run folder's normalisation; without one, raw scores (the identity), with a warning."""
        found = cls.read(folder)
        if found is not None:
            return found
        logger.warning("%s has no %s: raw scores are used, not normalised", folder, NORMALIZATION_FILE)
        return cls.identity(f"none: {folder} has no normalisation")

    def apply(self, raw: torch.Tensor) -> torch.Tensor:
        """Normalised scores: (raw + bias) / scale."""
        return (raw + self.bias) / self.scale

    def shift_only(self) -> RewardNormalization:
        """The same bias with scale 1 (PPO's `scale_scores: false` ablation: rewards in raw-score units)."""
        return replace(self, scale=1.0)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(
        cls, record: Mapping[str, Any], where: str = "reward_normalization.json"
    ) -> RewardNormalization:
        """Read a record; `scale` defaults to `std` (files written before scale was stored)."""
        try:
            bias = float(record["bias"])
        except (KeyError, TypeError, ValueError) as err:
            raise NormalizationError(f"{where}: needs a numeric `bias` ({err})") from None
        std = float(record.get("std") or 0.0)
        scale = float(record.get("scale") or std or 1.0)
        if not scale > 0:
            raise NormalizationError(f"{where}: scale {scale} must be > 0")
        return cls(
            bias=bias,
            scale=scale,
            mean=float(record.get("mean", -bias)),
            std=std,
            n=int(record.get("n", 0)),
            source=str(record.get("source", "unknown")),
        )

    @classmethod
    def read(cls, folder: str | Path) -> RewardNormalization | None:
        """The run folder's normalisation, or None when it has none."""
        file = Path(folder) / NORMALIZATION_FILE
        if not file.is_file():
            return None
        try:
            record = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise NormalizationError(f"{file}: not JSON ({err})") from None
        return cls.from_dict(record, str(file))

    def write(self, folder: str | Path) -> Path:
        """Write `reward_normalization.json` atomically: the reward stage writes it last, and make reads it
        as the sign of a finished reward folder."""
        from instruct_tune.checkpoints import write_atomic

        return write_atomic(Path(folder) / NORMALIZATION_FILE, json.dumps(self.as_dict(), indent=2) + "\n")
