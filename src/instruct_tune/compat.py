"""Every reach into the private internals of trl, transformers, peft and accelerate, in one place.

The rest of instruct_tune goes through these helpers, so a release that renames or reshapes an internal
breaks here, and `tests/test_compat.py` names the internal and the installed version. Each helper says which
version's internal it touches (the versions `pyproject.toml` pins: trl 1.16, transformers 5.24, peft 0.21,
accelerate 1.15) and why the public API does not do.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn

# The libraries whose internals are reached here: their installed versions must lie in pyproject's bounds.
REACHED_INTO = ("trl", "transformers", "peft", "accelerate")

# --- Trainer state of trl's SFTTrainer / RewardTrainer ---------------------------------------------------


def add_trained_tokens(trainer: Any, n: int) -> None:
    """Add `n` to the running count of trained tokens that TRL logs as `num_tokens`.

    trl 1.16 `SFTTrainer`/`RewardTrainer` keep it in `_total_train_tokens` (set in `__init__`, grown in
    `compute_loss`); no public hook corrects it, and row-packed SFT batches and grouped reward batches count
    their tokens differently from TRL's collators.
    """
    trainer._total_train_tokens += n


def tensor_parallel_size(trainer: Any) -> int:
    """The tensor-parallel group size TRL divides its gathered token counts by.

    trl 1.16 caches it in `_tp_size` (from `accelerator.parallelism_config`) in `__init__`; a correction of
    TRL's count must be divided the same way.
    """
    return trainer._tp_size


def record_token_count(trainer: Any, mode: str) -> None:
    """Log the running trained-token count as `num_tokens` of `mode` ("train"/"eval"), as TRL's own
    `compute_loss` does: trl 1.16 keeps the figures its `log` averages in `_metrics[mode][key]` lists."""
    trainer._metrics[mode]["num_tokens"] = [trainer._total_train_tokens]


def log_trainer_metric(trainer: Any, mode: str, key: str, value: float) -> None:
    """Add one value of `key` to what TRL logs for `mode`: trl 1.16 `SFTTrainer`/`RewardTrainer.log` averages
    each `_metrics[mode][key]` list (a `defaultdict(list)`) into the logs, then clears it."""
    trainer._metrics[mode][key].append(value)


def set_signature_columns(trainer: Any, columns: Sequence[str]) -> None:
    """Keep `columns` of every dataset (unless already chosen): transformers 5.24 `Trainer` drops every column
    outside `_signature_columns` (`remove_unused_columns`), filled lazily by `_set_signature_columns_if_needed`."""
    if trainer._signature_columns is None:
        trainer._signature_columns = list(columns)


def swap_collator(trainer: Any, collator: Any) -> None:
    """Use `collator` for every dataloader the trainer builds from now on.

    trl 1.16 `SFTTrainer.__init__` refuses a custom `data_collator` with padding-free / bfd packing ("Passing a
    custom data collator is not supported when using padding-free."); transformers 5.24 `Trainer` reads
    `self.data_collator` only when it builds a dataloader, so a collator set after construction is used.
    """
    trainer.data_collator = collator


def prepare_inputs(trainer: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """The batch moved to the trainer's device, as `Trainer.prediction_step` does: transformers 5.24
    `Trainer._prepare_inputs(inputs)` (an override of `prediction_step` must call it itself)."""
    return trainer._prepare_inputs(inputs)


# --- Private trainer hooks overridden -------------------------------------------------------------------

# The private methods `DatasetHooks` overrides, each with the parameters (after `self`) it is called with.
PREPARE_DATASET = "_prepare_dataset"
PREPARE_DATASET_PARAMS = ("dataset", "processing_class", "args", "dataset_name")
SET_SIGNATURE_COLUMNS = "_set_signature_columns_if_needed"
OVERRIDDEN_HOOKS = {PREPARE_DATASET: PREPARE_DATASET_PARAMS, SET_SIGNATURE_COLUMNS: ()}


class DatasetHooks:
    """Mixin, listed before `trl.RewardTrainer`: its private dataset hooks answered by public names.

    - trl 1.16 `RewardTrainer` calls `self._prepare_dataset(dataset, processing_class, args, dataset_name)` on
      every train and eval set (in `__init__` and `evaluate`): override `prepare_dataset` (same parameters) to
      tokenise another way. (`SFTTrainer`'s takes other parameters: not for it.)
    - transformers 5.24 `Trainer` keeps only the columns `_set_signature_columns_if_needed` puts in
      `_signature_columns` (TRL's own list by default): set `signature_columns` to keep others.

    `hook_problems(base)` checks that `base` still has both hooks as called here.
    """

    signature_columns: ClassVar[Sequence[str] | None] = None

    def prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        return self.prepare_dataset(dataset, processing_class, args, dataset_name)

    def _set_signature_columns_if_needed(self) -> None:
        if self.signature_columns is None:
            super()._set_signature_columns_if_needed()
        else:
            set_signature_columns(self, self.signature_columns)


def hook_problems(base: type) -> list[str]:
    """What of `OVERRIDDEN_HOOKS` `base` (`trl.RewardTrainer`) lacks: a method gone, or its parameters changed."""
    problems = []
    for name, params in OVERRIDDEN_HOOKS.items():
        method = getattr(base, name, None)
        if not callable(method):
            problems.append(f"{base.__qualname__}.{name} is gone")
            continue
        found = tuple(inspect.signature(method).parameters)[1:]
        if found != params:
            problems.append(f"{base.__qualname__}.{name}{found} no longer takes {params}")
    return problems


# --- PEFT adapter switches ------------------------------------------------------------------------------


def adapter_switch_state(layer: nn.Module) -> tuple[str | list[str], bool]:
    """(active adapter names, whether adapters are off) of a PEFT tuner layer, for `set_adapter_switch`.

    peft 0.21 `BaseTunerLayer` keeps them in `_active_adapter` and `_disable_adapters`; its public
    `set_adapter` / `enable_adapters(False)` also set `requires_grad` of the adapters they switch, which
    would stop the policy and value adapters of PPO's shared base from training together.
    """
    return layer._active_adapter, layer._disable_adapters


def set_adapter_switch(layer: nn.Module, active: str | list[str] | None, disabled: bool) -> None:
    """Set what `adapter_switch_state` reads (`active` None: leave the active names), `requires_grad` untouched."""
    if active is not None:
        layer._active_adapter = active
    layer._disable_adapters = disabled


# --- transformers model classes and configs -------------------------------------------------------------


def auto_model_class(auto_class: type, config: Any) -> type:
    """The model class `auto_class.from_pretrained` builds for `config`: transformers 5.24 auto classes keep
    their config-to-class mapping in `_model_mapping` (there is no public lookup without loading)."""
    return auto_class._model_mapping[type(config)]


@contextmanager
def ignoring_load_keys(
    model_class: type, *, missing: Iterable[str] = (), unexpected: Iterable[str] = ()
) -> Iterator[None]:
    """While loading `model_class`: weights matching `missing` / `unexpected` (regexes) are expected to be
    absent / left over, not reported.

    transformers 5.24 `PreTrainedModel` reads the class attributes `_keys_to_ignore_on_load_missing` and
    `_keys_to_ignore_on_load_unexpected` when it builds a model; `from_pretrained` takes no such argument.
    """
    saved = model_class._keys_to_ignore_on_load_missing, model_class._keys_to_ignore_on_load_unexpected
    model_class._keys_to_ignore_on_load_missing = [*(saved[0] or []), *missing]
    model_class._keys_to_ignore_on_load_unexpected = [*(saved[1] or []), *unexpected]
    try:
        yield
    finally:
        model_class._keys_to_ignore_on_load_missing, model_class._keys_to_ignore_on_load_unexpected = saved


def attn_implementation(model: nn.Module) -> str | None:
    """The attention implementation a loaded model runs ("sdpa", "eager", ...; None without a config):
    transformers 5.24 keeps the resolved one in `config._attn_implementation`."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


# --- trl's fused LM head --------------------------------------------------------------------------------

# The keyword arguments of the forward trl 1.16 `add_fused_lm_head` patches in (`SFTTrainer.__init__` patches
# every model; its `compute_loss` calls `model(**inputs, fused_lm_head=True)`).
FUSED_FORWARD_KWARGS = ("fused_lm_head", "labels", "shift_labels", "num_items_in_batch")
# The fields of its output that `SFTTrainer.compute_loss` reads.
FUSED_OUTPUT_FIELDS = ("loss", "log_probs", "entropy", "is_top1", "label_mask")


def fused_lm_output(**fields: torch.Tensor) -> Any:
    """What a forward patched by `add_fused_lm_head` returns when called with `fused_lm_head=True`: trl 1.16
    `FusedCausalLMOutput`, which only the private module `trl.trainer.utils` exports."""
    from trl.trainer.utils import FusedCausalLMOutput

    return FusedCausalLMOutput(**fields)


# --- accelerate process state ---------------------------------------------------------------------------


def reset_accelerate_state() -> None:
    """Forget accelerate's process state, as transformers 5.24 `TrainingArguments` does when it is built:
    accelerate 1.15 `AcceleratorState._reset_state(reset_partial_state=True)` (no public reset)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def fsdp_on_cpu(args: Any) -> bool:
    """Let an FSDP launch shard the model over CPU processes (gloo), as it does over GPUs; returns whether it
    had to (`recipes/accelerate/fsdp_cpu.yaml`).

    accelerate 1.15 `AcceleratorState.__init__` makes a run FSDP (`ACCELERATE_USE_FSDP`, which `accelerate
    launch` sets from an FSDP config) only when the process type is a multi-device one (MULTI_GPU, MULTI_XPU,
    ...): CPU processes (`use_cpu`, type MULTI_CPU) silently stay DDP, though FSDP2's `fully_shard` runs on CPU
    over gloo. No public option says otherwise. Called after `args` (the Trainer's `TrainingArguments`) set the
    process state up (gloo, CPU device) and before the Trainer builds its `Accelerator`, this marks that state
    (`PartialState._shared_state["distributed_type"]`) multi-device: the Accelerator then takes the FSDP branch
    with the launcher's plugin, as on GPUs, and records FSDP as the process type; device and backend stay CPU
    and gloo.
    """
    import os

    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    if hasattr(args, "device"):
        args.device  # noqa: B018 (sets the process state up now, as the Trainer would: it is read below)
    else:  # PPO's config, no TrainingArguments: the process state its Accelerator would set up
        PartialState(cpu=bool(getattr(args, "use_cpu", False)))
    state = PartialState._shared_state
    if state.get("distributed_type") != DistributedType.MULTI_CPU or AcceleratorState._shared_state:
        return False  # not CPU processes, or an Accelerator already chose
    state["distributed_type"] = DistributedType.MULTI_GPU
    return True


def deepspeed_on_cpu(args: Any = None) -> bool:
    """Set the process state of a DeepSpeed launch (`ACCELERATE_USE_DEEPSPEED`) on a machine without a GPU up
    with gloo; returns whether it did (`recipes/accelerate/zero3_cpu.yaml`).

    accelerate 1.15 finds no backend for processes that are neither on GPUs nor `cpu=True` (which turns DeepSpeed
    off): DeepSpeed then starts its process group (gloo, through its CPU accelerator, `DS_ACCELERATOR=cpu`) but
    accelerate counts 1 process, and each would train on the whole batch. Given the backend, it counts them all.
    `args`: a Trainer stage's `TrainingArguments`, whose process state is set up on first use (its `ddp_backend`
    is set to gloo where unset); None: a loop on a bare `Accelerator` (our PPO), whose state is set up here.
    """
    import os

    from accelerate.state import AcceleratorState, PartialState

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true" or torch.cuda.is_available():
        return False
    if args is not None:
        if getattr(args, "ddp_backend", None) is None:
            args.ddp_backend = "gloo"
        # transformers 5.24 set the process state up when the arguments were built (`_setup_devices`, a cached
        # property) and found no backend: set up again with gloo (DeepSpeed's process group stays as it is).
        args.__dict__.pop("_setup_devices", None)
        reset_accelerate_state()
        args.device  # noqa: B018 (sets the process state up now)
        return True
    if AcceleratorState._shared_state or PartialState._shared_state:
        return False  # the process state is set already
    PartialState(cpu=False, backend="gloo")
    return True


@contextmanager
def zero3_hooks_removed(engine: Any) -> Iterator[None]:
    """A DeepSpeed ZeRO-3 engine's module without its per-module gather/release hooks for the duration, then
    with them registered again, as TRL's `unwrap_model_for_generation` does.

    DeepSpeed 0.19 releases a parameter after each submodule's forward even inside `GatheredParameters`, so a
    LoRA merged into the gathered weights is gone by the unmerge, and each token's forward gathers again.
    The hooks live in `engine.optimizer.parameter_offload` (`forward_hooks`, `backward_hooks`,
    `_register_deepspeed_module`); no public API removes them.
    """
    from deepspeed.runtime.zero.partitioned_param_coordinator import iter_params

    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    if offload is None:
        yield
        return
    for param in iter_params(offload.module, recurse=True):
        param.ds_active_sub_modules.clear()
    for hook in (*offload.forward_hooks, *offload.backward_hooks):
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []
    try:
        yield
    finally:
        offload._register_deepspeed_module(offload.module)
