"""Every private internal `instruct_tune.compat` reaches, checked on the installed trl, transformers, peft and
accelerate: a release that moves one fails here, naming the internal and the version (see pyproject.toml)."""

from __future__ import annotations

import inspect
from collections import defaultdict
from importlib.metadata import version
from pathlib import Path

import pytest
import tomllib
import torch
from packaging.requirements import Requirement
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel
from transformers import Trainer as HFTrainer
from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

from instruct_tune import compat
from instruct_tune.config import DataArguments, ModelArguments
from instruct_tune.data.reward_collator import GroupedPreferenceCollator
from instruct_tune.models import load_tokenizer
from instruct_tune.stages.data_sources import train_eval_sets
from instruct_tune.stages.reward_trainer import GroupedRewardTrainer

REPO = Path(__file__).resolve().parents[1]
TINY_DATA = REPO / "data" / "tiny"


def moved(internal: str, library: str) -> str:
    return (
        f"{library} {version(library)} moved an internal: {internal}. instruct_tune.compat reaches it: update "
        f"compat (and pyproject's bound) for this release"
    )


# --- versions ---------------------------------------------------------------------------------------------


def pyproject_bounds() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = (Requirement(line) for line in project["dependencies"])
    return {req.name: req for req in requirements}


@pytest.mark.parametrize("library", compat.REACHED_INTO)
def test_installed_versions_are_inside_pyprojects_bounds(library: str) -> None:
    requirement = pyproject_bounds()[library]
    installed = version(library)
    assert requirement.specifier.contains(installed, prereleases=True), (
        f"{library} {installed} is outside pyproject's bound {requirement.specifier}: instruct_tune.compat reaches "
        f"into its internals and was only checked within that bound"
    )


# --- private hooks overridden ------------------------------------------------------------------------------


def test_overridden_reward_trainer_hooks_are_still_there() -> None:
    problems = compat.hook_problems(RewardTrainer)
    assert not problems, moved("; ".join(problems), "trl")


def test_prepare_inputs_takes_a_batch() -> None:
    params = list(inspect.signature(HFTrainer._prepare_inputs).parameters)
    assert params == ["self", "inputs"], moved(f"Trainer._prepare_inputs{tuple(params)}", "transformers")


# --- trainers built on the tiny model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model_dir)))


@pytest.fixture(scope="module")
def sft_trainer(tiny_model_dir: Path, tiny_sft_file: Path, tokenizer, tmp_path_factory) -> SFTTrainer:
    train, _ = train_eval_sets(
        DataArguments(dataset_name=str(tiny_sft_file), eval_fraction=0, max_train_samples=16), "sft", seed=0
    )
    args = SFTConfig(
        output_dir=str(tmp_path_factory.mktemp("sft")), report_to=[], use_cpu=True, max_length=64,
        per_device_train_batch_size=4, disable_tqdm=True,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)


@pytest.fixture(scope="module")
def reward_trainer(tiny_model_dir: Path, tokenizer, tmp_path_factory) -> GroupedRewardTrainer:
    rankings = tmp_path_factory.mktemp("comparisons") / "train.jsonl"
    with (TINY_DATA / "comparisons.jsonl").open() as src:
        rankings.write_text("".join(line for _, line in zip(range(4), src, strict=False)))
    pairs, _ = train_eval_sets(DataArguments(dataset_name=str(rankings), eval_fraction=0), "preference", seed=0)
    args = RewardConfig(
        output_dir=str(tmp_path_factory.mktemp("reward")), report_to=[], use_cpu=True, max_length=64,
        per_device_train_batch_size=2, disable_tqdm=True,
    )  # fmt: skip
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    return GroupedRewardTrainer(
        model=model,
        args=args,
        train_dataset=pairs,
        data_collator=GroupedPreferenceCollator(pad_token_id=tokenizer.pad_token_id),
        processing_class=tokenizer,
    )


@pytest.mark.parametrize("which", ["sft_trainer", "reward_trainer"])
def test_trl_trainers_hold_the_state_compat_reaches(which: str, request: pytest.FixtureRequest) -> None:
    trainer = request.getfixturevalue(which)
    name = "RewardTrainer" if which == "reward_trainer" else "SFTTrainer"
    expected = {"_total_train_tokens": int, "_tp_size": int, "_metrics": dict, "_signature_columns": (type(None), list)}
    for attribute, kind in expected.items():
        assert isinstance(getattr(trainer, attribute, ...), kind), moved(f"{name}.{attribute}", "trl")
    assert compat.tensor_parallel_size(trainer) == 1, moved(f"{name}._tp_size", "trl")
    for mode in ("train", "eval"):
        assert isinstance(trainer._metrics.get(mode), defaultdict), moved(f"{name}._metrics[{mode!r}]", "trl")


@pytest.mark.parametrize("which", ["sft_trainer", "reward_trainer"])
def test_logged_metrics_and_token_count_reach_trls_log(which: str, request: pytest.FixtureRequest) -> None:
    trainer = request.getfixturevalue(which)
    trainer.model.train()
    before = trainer._total_train_tokens
    compat.add_trained_tokens(trainer, 7)
    compat.record_token_count(trainer, "train")
    compat.log_trainer_metric(trainer, "train", "compat_probe", 1.0)
    compat.log_trainer_metric(trainer, "train", "compat_probe", 3.0)
    trainer.log({"loss": 0.5})
    logged = trainer.state.log_history[-1]
    assert logged.get("compat_probe") == 2.0, moved(f"{type(trainer).__name__} logging _metrics", "trl")
    assert logged.get("num_tokens") == before + 7, moved("num_tokens from _total_train_tokens", "trl")


def test_sft_loss_counts_tokens_where_compat_corrects_them(sft_trainer: SFTTrainer) -> None:
    """TRL's own `compute_loss` grows `_total_train_tokens` by the batch's tokens over `_tp_size`, the count
    `add_trained_tokens` corrects for row-packed batches."""
    trainer = sft_trainer
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    tokens = int(batch["attention_mask"].sum())
    trainer.model.train()
    saved_tp = trainer._tp_size
    try:
        for tp in (1, 2):
            trainer._tp_size = tp
            before = trainer._total_train_tokens
            trainer.compute_loss(trainer.model, dict(batch))
            grown = trainer._total_train_tokens - before
            assert grown == tokens // tp, moved("SFTTrainer.compute_loss counting _total_train_tokens // _tp_size", "trl")
    finally:
        trainer._tp_size = saved_tp


def test_reward_dataset_hooks_are_called(reward_trainer: GroupedRewardTrainer) -> None:
    """TRL calls `_prepare_dataset` (answered by `prepare_dataset`); transformers fills `_signature_columns`
    through `_set_signature_columns_if_needed` when it builds a dataloader."""
    columns = reward_trainer.train_dataset.column_names
    assert {"input_ids", "better", "worse"} <= set(columns), moved("RewardTrainer calling _prepare_dataset", "trl")
    batch = next(iter(reward_trainer.get_train_dataloader()))
    assert "better" in batch
    assert reward_trainer._signature_columns == list(GroupedRewardTrainer.signature_columns), moved(
        "Trainer calling _set_signature_columns_if_needed / reading _signature_columns", "transformers"
    )


def test_sft_refuses_a_collator_with_packing_so_compat_swaps_it(
    tiny_model_dir: Path, sft_trainer: SFTTrainer, tokenizer, tmp_path: Path
) -> None:
    args = SFTConfig(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, max_length=64, packing=True,
        packing_strategy="bfd", per_device_train_batch_size=2, disable_tqdm=True,
    )  # fmt: skip
    train = sft_trainer.train_dataset
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="custom data collator"):
        SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer, data_collator=lambda b: b)
    # (A TRL that takes the collator makes swap_collator unnecessary: this test then says so.)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    original, seen = trainer.data_collator, []

    def collator(features):
        seen.append(len(features))
        return original(features)

    compat.swap_collator(trainer, collator)
    batch = next(iter(trainer.get_train_dataloader()))
    assert seen and "input_ids" in batch, moved("Trainer reading data_collator when it builds a dataloader", "transformers")


# --- TRL's fused LM head ------------------------------------------------------------------------------------


def test_fused_lm_head_forward_and_output(sft_trainer: SFTTrainer, tokenizer) -> None:
    """`SFTTrainer` patches its model's forward (`add_fused_lm_head`) and calls it with `fused_lm_head=True`;
    `models.lm_head` answers those calls with `compat.fused_lm_output`."""
    model = sft_trainer.model
    params = inspect.signature(model.forward, follow_wrapped=False).parameters
    missing = [k for k in compat.FUSED_FORWARD_KWARGS if k not in params]
    assert not missing, moved(f"add_fused_lm_head's forward keywords {missing}", "trl")
    assert "fused_lm_head=True" in inspect.getsource(SFTTrainer.compute_loss), moved(
        "SFTTrainer.compute_loss calling model(..., fused_lm_head=True)", "trl"
    )
    ids = torch.tensor([tokenizer("What is 2 + 3? 5")["input_ids"]])
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids, fused_lm_head=True)
    fields = {name: getattr(out, name, None) for name in compat.FUSED_OUTPUT_FIELDS}
    absent = [name for name, value in fields.items() if value is None]
    assert not absent, moved(f"FusedCausalLMOutput fields {absent}", "trl")
    ours = compat.fused_lm_output(**fields)
    assert type(ours) is type(out), moved("trl.trainer.utils.FusedCausalLMOutput", "trl")


# --- PEFT adapter switches ----------------------------------------------------------------------------------


def test_adapter_switch_changes_a_lora_layers_output() -> None:
    torch.manual_seed(0)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights=False)
    model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), config)
    model.add_adapter("other", config)
    layer = next(m for m in model.modules() if isinstance(m, BaseTunerLayer))
    for attribute in ("_active_adapter", "_disable_adapters"):
        assert hasattr(layer, attribute), moved(f"BaseTunerLayer.{attribute}", "peft")
    assert compat.adapter_switch_state(layer) == (layer.active_adapter, layer.disable_adapters), moved(
        "BaseTunerLayer.active_adapter / disable_adapters as _active_adapter / _disable_adapters", "peft"
    )
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    x = torch.randn(3, 4)
    with torch.no_grad():
        base, default = layer.base_layer(x), layer(x)
        saved = compat.adapter_switch_state(layer)
        compat.set_adapter_switch(layer, None, disabled=True)
        off = layer(x)
        compat.set_adapter_switch(layer, ["other"], disabled=False)
        other = layer(x)
        compat.set_adapter_switch(layer, *saved)
        back = layer(x)
    assert torch.equal(off, base), moved("LoraLayer.forward reading _disable_adapters", "peft")
    assert not torch.allclose(other, default), moved("LoraLayer.forward reading _active_adapter", "peft")
    assert torch.equal(back, default)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == grads


# --- transformers model classes -----------------------------------------------------------------------------


def test_load_keys_to_ignore_quiet_a_missing_head(tiny_model_dir: Path) -> None:
    for attribute in ("_keys_to_ignore_on_load_missing", "_keys_to_ignore_on_load_unexpected"):
        assert hasattr(PreTrainedModel, attribute), moved(f"PreTrainedModel.{attribute}", "transformers")
    config = AutoConfig.from_pretrained(tiny_model_dir)
    model_class = compat.auto_model_class(AutoModelForSequenceClassification, config)
    assert model_class.__name__ == "GPT2ForSequenceClassification", moved("_BaseAutoModelClass._model_mapping", "transformers")
    saved = model_class._keys_to_ignore_on_load_missing, model_class._keys_to_ignore_on_load_unexpected

    def missing() -> list[str]:
        _, info = model_class.from_pretrained(tiny_model_dir, num_labels=1, output_loading_info=True)
        return [key for key in info["missing_keys"] if key.startswith("score.")]

    assert missing(), "a causal checkpoint loaded with a reward head should miss `score`"
    with compat.ignoring_load_keys(model_class, missing=[r"^score\."], unexpected=[r"^lm_head\."]):
        assert r"^lm_head\." in model_class._keys_to_ignore_on_load_unexpected
        assert not missing(), moved("from_pretrained honouring _keys_to_ignore_on_load_missing", "transformers")
    assert (model_class._keys_to_ignore_on_load_missing, model_class._keys_to_ignore_on_load_unexpected) == saved


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attn_implementation_is_read_off_the_config(tiny_model_dir: Path, implementation: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=implementation)
    assert compat.attn_implementation(model) == implementation, moved("PretrainedConfig._attn_implementation", "transformers")
    assert compat.attn_implementation(nn.Linear(1, 1)) is None


# --- accelerate (last: it forgets the process state the trainers above were built in) ----------------------


def test_reset_accelerate_state_forgets_the_process_state() -> None:
    from accelerate.state import AcceleratorState, PartialState

    PartialState()
    assert PartialState._shared_state
    compat.reset_accelerate_state()
    assert not AcceleratorState._shared_state and not PartialState._shared_state, moved(
        "AcceleratorState._reset_state(reset_partial_state=True)", "accelerate"
    )


def test_a_multi_device_process_state_makes_accelerate_choose_fsdp(monkeypatch: pytest.MonkeyPatch) -> None:
    """What `compat.fsdp_on_cpu` relies on: the process type kept in `PartialState._shared_state`, read by
    `AcceleratorState` to choose FSDP (`ACCELERATE_USE_FSDP`) with the plugin it is given."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, TorchDynamoPlugin

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    compat.reset_accelerate_state()
    try:
        PartialState(cpu=True)
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU  # what fsdp_on_cpu writes
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
        state = AcceleratorState(fsdp_plugin=plugin, dynamo_plugin=TorchDynamoPlugin(), _from_accelerator=True)
        assert state.distributed_type == DistributedType.FSDP and state.fsdp_plugin is plugin, moved(
            "PartialState._shared_state['distributed_type'] read by AcceleratorState.__init__", "accelerate"
        )
        assert state.device.type == "cpu"
    finally:
        compat.reset_accelerate_state()
