"""Stage configuration: YAML + flags precedence, strict keys, round trip of the saved config, defaults."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import typing
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, assert_resolved_as_written
from stage_runs import PPO_TYPES, SFT_TYPES
from transformers import TrainingArguments

from instruct_tune.config import (
    ConfigError,
    DataArguments,
    ModelArguments,
    PPOStageConfig,
    PPOTrainingOptions,
    RewardStageConfig,
    SFTStageConfig,
    follow_model_dropout,
    parse_args,
    resolved_config,
    save_config,
)
from instruct_tune.stages.run_folder import RunFolderArguments


def write_yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def base_config(tmp_path: Path, **extra) -> dict:
    return {
        "model_name_or_path": "models/tiny-gpt2",
        # a mixture replaces the single dataset (setting both is refused)
        **({} if "dataset_mixture" in extra else {"dataset_name": "data/tiny/sft.jsonl"}),
        "output_dir": str(tmp_path / "run"),
        "report_to": "none",
        **extra,
    }


# --- YAML and flags ------------------------------------------------------------------------------------


def test_yaml_values_are_used_and_flags_override_them(tmp_path: Path) -> None:
    config = write_yaml(
        tmp_path / "sft.yaml",
        base_config(
            tmp_path, learning_rate=2.0e-3, lora_r=32, max_length=96, eval_fraction=0.1, use_peft=True
        ),
    )
    training, data, model = parse_args(
        *SFT_TYPES,
        args=["--config", config, "--learning_rate", "1e-4", "--lora_r", "4", "--eval_fraction", "0.3"],
    )
    # the flags win over the file ...
    assert training.learning_rate == pytest.approx(1e-4)
    assert model.lora_r == 4
    assert data.eval_fraction == pytest.approx(0.3)
    # ... and what no flag names comes from the file, not from the dataclass defaults
    assert training.max_length == 96
    assert model.use_peft is True
    assert model.model_name_or_path == "models/tiny-gpt2"
    assert data.dataset_name == "data/tiny/sft.jsonl"
    assert training.output_dir == str(tmp_path / "run")


def test_flag_before_config_also_wins(tmp_path: Path) -> None:
    config = write_yaml(
        tmp_path / "sft.yaml", {"output_dir": str(tmp_path), "learning_rate": 2.0e-3, "seed": 3}
    )
    (training,) = parse_args(SFTStageConfig, args=["--learning_rate", "5e-5", "--config", config])
    assert training.learning_rate == pytest.approx(5e-5)
    assert training.seed == 3


def test_without_config_file_dataclass_defaults_apply(tmp_path: Path) -> None:
    training, data, model = parse_args(
        *SFT_TYPES, args=["--output_dir", str(tmp_path), "--report_to", "none"]
    )
    assert training.learning_rate == pytest.approx(SFTStageConfig(output_dir=str(tmp_path)).learning_rate)
    assert data.eval_fraction == pytest.approx(0.02)
    assert data.per_task_metrics is True
    assert model.disable_dropout is True
    assert model.use_peft is False


def test_unknown_yaml_key_names_file_and_suggests_close_key(tmp_path: Path) -> None:
    config = write_yaml(tmp_path / "typo.yaml", base_config(tmp_path, learning_rat=1e-3))
    with pytest.raises(ConfigError) as err:
        parse_args(*SFT_TYPES, args=["--config", config])
    message = str(err.value)
    assert config in message
    assert "`learning_rat`" in message
    assert "did you mean `learning_rate`" in message


def test_unknown_yaml_key_without_close_match_is_still_refused(tmp_path: Path) -> None:
    config = write_yaml(tmp_path / "odd.yaml", base_config(tmp_path, zzqqxx_frobnicate=3))
    with pytest.raises(ConfigError, match="zzqqxx_frobnicate") as err:
        parse_args(*SFT_TYPES, args=["--config", config])
    assert "did you mean" not in str(err.value)


def test_key_of_another_stage_dataclass_is_unknown_here(tmp_path: Path) -> None:
    # lora_r belongs to ModelArguments: parsing with the training config alone must refuse it
    config = write_yaml(tmp_path / "sft.yaml", {"output_dir": str(tmp_path), "lora_r": 8})
    with pytest.raises(ConfigError, match="lora_r"):
        parse_args(SFTStageConfig, args=["--config", config])


def test_env_section_is_allowed_and_applied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSTRUCT_TUNE_TEST_ENV", "0")  # restored (removed) after the test
    config = write_yaml(tmp_path / "sft.yaml", base_config(tmp_path, env={"INSTRUCT_TUNE_TEST_ENV": "42"}))
    parse_args(*SFT_TYPES, args=["--config", config])
    assert os.environ["INSTRUCT_TUNE_TEST_ENV"] == "42"


@pytest.mark.parametrize(
    ("content", "match"),
    [("- a\n- b\n", "mapping"), ("key: [unclosed\n", "not valid YAML")],
)
def test_malformed_config_file_is_a_config_error_naming_it(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=match) as err:
        parse_args(*SFT_TYPES, args=["--config", str(path)])
    assert str(path) in str(err.value)


def test_missing_config_file_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        parse_args(*SFT_TYPES, args=["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(ConfigError, match="needs a file path"):
        parse_args(*SFT_TYPES, args=["--config"])


# --- round trip ----------------------------------------------------------------------------------------


def test_saved_config_parses_back_to_the_same_values(tmp_path: Path) -> None:
    config = write_yaml(
        tmp_path / "sft.yaml",
        base_config(
            tmp_path,
            use_peft=True,
            lora_r=16,
            lora_target_modules=["c_attn", "c_fc"],
            dataset_mixture=[
                {"path": "data/tiny/sft.jsonl", "weight": 0.5, "task": "tiny"},
                {"path": "data/tiny/sft_eval.jsonl", "weight": 2},
            ],
            lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr": 1.0e-5},
            gradient_checkpointing_kwargs={"use_reentrant": False},
            max_length=64,
            warmup_steps=0.03,
        ),
    )
    first = parse_args(*SFT_TYPES, args=["--config", config, "--learning_rate", "3e-4", "--seed", "7"])
    saved = save_config(tmp_path / "run", *first)
    assert saved == tmp_path / "run" / "config.yaml"
    second = parse_args(*SFT_TYPES, args=["--config", str(saved)])

    assert resolved_config(*second) == resolved_config(*first)
    # the flag overrides were saved as resolved values, not lost
    assert second[0].learning_rate == pytest.approx(3e-4)
    assert second[0].seed == 7
    assert second[1].dataset_mixture == first[1].dataset_mixture
    assert second[2].lora_target_modules == ["c_attn", "c_fc"]
    assert second[0].lr_scheduler_kwargs == {"min_lr": 1.0e-5}


def test_saved_config_has_no_secrets_or_launcher_values(tmp_path: Path) -> None:
    training, data, model = parse_args(
        *SFT_TYPES, args=["--output_dir", str(tmp_path), "--hub_token", "hf_secret"]
    )
    saved = yaml.safe_load(save_config(tmp_path, training, data, model).read_text())
    assert "hf_secret" not in (tmp_path / "config.yaml").read_text()
    for key in ("hub_token", "local_rank"):
        assert key not in saved
    assert saved["output_dir"] == str(tmp_path)


# --- defaults and validation ---------------------------------------------------------------------------


def test_unset_bf16_follows_the_device(tmp_path: Path) -> None:
    """Unset bf16 means "where the device supports it": False on a CPU-only machine such as this one."""
    expected = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert SFTStageConfig(output_dir=str(tmp_path), report_to=[]).bf16 is expected
    (training,) = parse_args(SFTStageConfig, args=["--output_dir", str(tmp_path), "--report_to", "none"])
    assert training.bf16 is expected
    # the shipped tiny recipe leaves bf16 unset: it must train on a CPU-only machine
    training, _, _ = parse_args(
        *SFT_TYPES,
        args=["--config", str(REPO / "recipes/configs/tiny/sft.yaml"), "--output_dir", str(tmp_path)],
    )
    assert training.bf16 is expected
    if not torch.cuda.is_available():
        assert training.bf16 is False
    # an explicit value is kept
    (training,) = parse_args(SFTStageConfig, args=["--output_dir", str(tmp_path), "--bf16", "false"])
    assert training.bf16 is False


@pytest.mark.parametrize("flag", ["--load_in_4bit", "--load_in_8bit"])
def test_quantisation_without_peft_is_refused(tmp_path: Path, flag: str) -> None:
    with pytest.raises(ConfigError, match="use_peft"):
        parse_args(*SFT_TYPES, args=["--output_dir", str(tmp_path), flag, "true"])
    with pytest.raises(ConfigError, match="use_peft"):
        ModelArguments(model_name_or_path="x", **{flag.lstrip("-"): True})
    # with use_peft it is QLoRA: accepted
    model = ModelArguments(model_name_or_path="x", use_peft=True, **{flag.lstrip("-"): True})
    assert model.use_peft


def test_4bit_and_8bit_together_are_refused() -> None:
    # TRL's ModelConfig refuses the pair before our own (ConfigError) check runs: either message is fine
    with pytest.raises(ValueError, match="exclusive|4 bit"):
        ModelArguments(model_name_or_path="x", use_peft=True, load_in_4bit=True, load_in_8bit=True)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_eval_fraction_out_of_range_is_refused(fraction: float) -> None:
    with pytest.raises(ConfigError, match="eval_fraction"):
        DataArguments(eval_fraction=fraction)


def test_dataset_mixture_json_string_from_the_command_line(tmp_path: Path) -> None:
    mixture = '[{"path": "a.jsonl", "weight": 0.5, "task": "a"}, {"path": "b.jsonl"}]'
    _, data, _ = parse_args(*SFT_TYPES, args=["--output_dir", str(tmp_path), "--dataset_mixture", mixture])
    assert data.dataset_mixture == [{"path": "a.jsonl", "weight": 0.5, "task": "a"}, {"path": "b.jsonl"}]
    with pytest.raises(ConfigError, match="dataset_mixture"):
        DataArguments(dataset_mixture="[not json")
    with pytest.raises(ConfigError, match="dataset_mixture"):
        DataArguments(dataset_mixture='{"path": "a.jsonl"}')


# --- shipped recipes -----------------------------------------------------------------------------------


def recipe_dataclasses(stage: str) -> tuple[type, ...]:
    """The dataclasses `recipes/<stage>.py` parses its config into: the annotations of its `main`, in order."""
    path = REPO / "recipes" / f"{stage}.py"
    assert path.is_file(), f"recipes/configs/*/{stage}.yaml has no recipe recipes/{stage}.py"
    spec = importlib.util.spec_from_file_location(f"_recipe_{stage}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    hints = typing.get_type_hints(module.main)
    hints.pop("return", None)
    return tuple(hints.values())


RECIPE_CONFIGS = sorted((REPO / "recipes" / "configs").glob("*/*.yaml"))


def test_the_sft_recipe_parses_the_sft_dataclasses() -> None:
    assert REPO / "recipes" / "configs" / "tiny" / "sft.yaml" in RECIPE_CONFIGS
    assert recipe_dataclasses("sft") == (*SFT_TYPES, RunFolderArguments)  # + --overwrite_output_dir


@pytest.mark.parametrize(
    "path", RECIPE_CONFIGS, ids=lambda p: str(p.relative_to(REPO / "recipes" / "configs"))
)
def test_every_recipe_config_parses_with_its_stage_dataclasses(path: Path, tmp_path: Path) -> None:
    """Each shipped config is read by its recipe's own dataclasses, so configs cannot drift from the code."""
    if path.stem == "round":  # not a training stage: the round's own options (label/round.py OPTIONS)
        assert_round_config_resolves_as_written(path)
        return
    parsed = parse_args(
        *recipe_dataclasses(path.stem), args=["--config", str(path), "--output_dir", str(tmp_path)]
    )
    assert_resolved_as_written(yaml.safe_load(path.read_text()), resolved_config(*parsed))


def assert_round_config_resolves_as_written(path: Path) -> None:
    """recipes/round.py reads the round's YAML through its options: every key known, every value as written."""
    from instruct_tune.label import round as label_round

    assert (REPO / "recipes" / "round.py").is_file(), "recipes/configs/*/round.yaml has no recipes/round.py"
    written = yaml.safe_load(path.read_text())
    parser = label_round.add_arguments(argparse.ArgumentParser())
    options = label_round.resolve(parser.parse_args(["--config", str(path)]))
    assert written and {k: options[k] for k in written} == written


PPO_REFUSED = [
    ("optim", "adafactor", "`optim` (PPO always trains with AdamW"),
    ("gradient_checkpointing", "true", "`gradient_checkpointing` (not supported by the PPO stage)"),
    ("per_device_train_batch_size", "3", "`per_device_train_batch_size` (PPO's batch is rollout_batch_size"),
    ("lr_scheduler_kwargs", '{"min_lr": 0.1}', "`lr_scheduler_kwargs` (PPO builds its scheduler from"),
    ("hub_token", "hf_x", "`hub_token` (the push authenticates with HF_TOKEN"),
]
TINY_PPO = str(REPO / "recipes/configs/tiny/ppo.yaml")


@pytest.mark.parametrize(("option", "value", "named"), PPO_REFUSED, ids=[r[0] for r in PPO_REFUSED])
def test_ppo_refuses_trainer_options_it_does_not_read(option: str, value: str, named: str, tmp_path: Path) -> None:
    """A Trainer option our PPO loop ignores is an unknown option, wherever it is set, with what PPO reads."""
    with pytest.raises(ConfigError, match=re.escape(f"command line: unknown option(s) {named}")):
        parse_args(*PPO_TYPES, args=["--config", TINY_PPO, f"--{option}", value])
    config = write_yaml(tmp_path / "ppo.yaml", {**yaml.safe_load(Path(TINY_PPO).read_text()), option: value})
    with pytest.raises(ConfigError, match=re.escape(f"{config}: unknown option(s) {named}")):
        parse_args(*PPO_TYPES, args=["--config", config])
    with pytest.raises(ConfigError, match=re.escape(f"PPOStageConfig: unknown option(s) {named}")):
        PPOStageConfig(output_dir=str(tmp_path), **{option: value})
    assert parse_args(*PPO_TYPES, args=["--config", TINY_PPO])[0].learning_rate > 0


def test_ppo_config_is_not_trainer_arguments_and_declares_only_what_ppo_reads() -> None:
    assert not issubclass(PPOStageConfig, TrainingArguments)
    own = {f.name for f in dataclasses.fields(PPOStageConfig)} - {f.name for f in dataclasses.fields(PPOTrainingOptions)}
    trainer_names = {f.name for f in dataclasses.fields(PPOTrainingOptions)} & {
        f.name for f in dataclasses.fields(TrainingArguments)
    }
    assert trainer_names == {f.name for f in dataclasses.fields(PPOTrainingOptions)}  # same names as Trainer's
    assert {"optim", "per_device_train_batch_size", "gradient_checkpointing", "hub_token"}.isdisjoint(trainer_names)
    assert {"rollout_batch_size", "kl_coef", "reward_model_path"} <= own


def test_ppo_training_options_read_as_trainer_arguments_do(tmp_path: Path) -> None:
    """The helpers and defaults the PPO stage reads give what `TrainingArguments` gives for the same values."""
    for warmup in (0, 0.1, 0.5, 3):
        ours = PPOStageConfig(output_dir=str(tmp_path), warmup_steps=warmup, report_to="tensorboard")
        theirs = TrainingArguments(output_dir=str(tmp_path), warmup_steps=warmup, report_to="tensorboard")
        assert ours.get_warmup_steps(37) == theirs.get_warmup_steps(37), warmup
        assert ours.report_to == theirs.report_to == ["tensorboard"]
        assert ours.get_process_log_level() == theirs.get_process_log_level()
        assert ours.should_log == theirs.should_log
        assert ours.lr_scheduler_type == theirs.lr_scheduler_type
    defaults = PPOStageConfig()
    for f in dataclasses.fields(PPOTrainingOptions):
        if f.name not in ("output_dir", "report_to", "lr_scheduler_type", "disable_tqdm"):  # normalised when built
            assert getattr(defaults, f.name) == getattr(TrainingArguments(), f.name), f.name
    assert PPOStageConfig(report_to="none").report_to == []
    with pytest.raises(ConfigError, match="lr_scheduler_type: reduce_lr_on_plateau steps on an eval metric"):
        PPOStageConfig(output_dir=str(tmp_path), lr_scheduler_type="reduce_lr_on_plateau")
    with pytest.raises(ConfigError, match="lr_scheduler_type: .*cosinus"):
        PPOStageConfig(output_dir=str(tmp_path), lr_scheduler_type="cosinus")
    with pytest.raises(ConfigError, match="save_steps: 0.5 is not a whole number >= 0"):
        PPOStageConfig(output_dir=str(tmp_path), save_steps=0.5)


def test_saved_ppo_config_parses_back_to_the_same_values(tmp_path: Path) -> None:
    first = parse_args(*PPO_TYPES, args=["--config", TINY_PPO, "--output_dir", str(tmp_path), "--warmup_steps", "0.1"])
    saved = save_config(tmp_path / "run", *first)
    second = parse_args(*PPO_TYPES, args=["--config", str(saved)])
    assert resolved_config(*second) == resolved_config(*first)
    assert second[0].report_to == ["tensorboard"] and second[0].lr_scheduler_type.value == "linear"


def test_unknown_flag_is_named_with_the_closest_option(tmp_path: Path) -> None:
    # (a unique prefix such as `--learning_rat` is argparse's abbreviation of `--learning_rate`, accepted)
    with pytest.raises(ConfigError, match=r"command line: unknown option\(s\) `learnig_rate` \(did you mean `learning_rate`"):
        parse_args(*SFT_TYPES, args=["--output_dir", str(tmp_path), "--learnig_rate=1e-3"])
    with pytest.raises(ConfigError, match="command line: arguments no stage dataclass reads: \\['stray'\\]"):
        parse_args(*SFT_TYPES, args=["--output_dir", str(tmp_path), "stray"])


# --- dropout: one option, ModelArguments.disable_dropout -------------------------------------------------


@pytest.mark.parametrize("stage", [SFTStageConfig, RewardStageConfig])
def test_disable_dropout_is_one_option_that_trl_configs_follow(stage: type, tmp_path: Path) -> None:
    """TRL's RewardConfig declares its own `disable_dropout`: the stage configs leave the option to
    `ModelArguments`, and `follow_model_dropout` gives its value to the TRL trainer."""
    training, _, model = parse_args(
        stage, DataArguments, ModelArguments, args=["--output_dir", str(tmp_path), "--disable_dropout", "false"]
    )
    assert model.disable_dropout is False
    assert "disable_dropout" not in {f.name for f in dataclasses.fields(stage) if f.init}
    assert training.disable_dropout is True  # TRL's default, until the stage follows the model arguments
    follow_model_dropout(training, model)
    assert training.disable_dropout is False
    assert "disable_dropout" not in resolved_config(training) and resolved_config(model)["disable_dropout"] is False
