"""Stage configuration: one dataclass declaration per stage serves YAML files, flags and Python callers.

- `errors`: `ConfigError`, raised by every check.
- `checks`: value checks the dataclasses run when built; `keys`: the unknown-option check.
- `arguments`: `DataArguments` and `ModelArguments`, shared by every training stage.
- `trl_stages`: the SFT and reward configs on TRL's (`TRLStageDefaults`, `follow_model_dropout`).
- `ppo_base` and `ppo`: the PPO stage's own training options and `PPOStageConfig`.
- `eval`: `EvalStageConfig`.
- `parsing`: `parse_args` (`--config file.yaml` plus flags), `resolved_config`, `save_config`.

Nothing here imports the stages, models or PPO code.
"""

from instruct_tune.config.arguments import DataArguments, ModelArguments
from instruct_tune.config.checks import bf16_supported
from instruct_tune.config.errors import ConfigError
from instruct_tune.config.eval import EvalStageConfig
from instruct_tune.config.keys import check_config_keys
from instruct_tune.config.parsing import parse_args, read_yaml_config, resolved_config, save_config
from instruct_tune.config.ppo import PPO_INSTEAD, PPOStageConfig
from instruct_tune.config.ppo_base import PPOTrainingOptions
from instruct_tune.config.trl_stages import (
    RewardStageConfig,
    SFTStageConfig,
    TRLStageDefaults,
    follow_model_dropout,
)

__all__ = [
    "PPO_INSTEAD",
    "ConfigError",
    "DataArguments",
    "EvalStageConfig",
    "ModelArguments",
    "PPOStageConfig",
    "PPOTrainingOptions",
    "RewardStageConfig",
    "SFTStageConfig",
    "TRLStageDefaults",
    "bf16_supported",
    "check_config_keys",
    "follow_model_dropout",
    "parse_args",
    "read_yaml_config",
    "resolved_config",
    "save_config",
]
