"""One loader for tokenizers and models of every stage: full, LoRA or QLoRA, causal-LM or reward head.

`model_name_or_path` may be a Hub id, a local checkpoint, or a run folder holding a LoRA adapter (an earlier
stage's output): the adapter is merged into its base, which then serves as the model to train. The base may
itself be a run folder holding an adapter (a reward model trained on top of the SFT policy records the SFT run
folder as its base): the chain is followed to the root checkpoint and merged oldest first.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from trl import get_quantization_config

from instruct_tune.artifacts import is_hub_id
from instruct_tune.compat import auto_model_class, ignoring_load_keys
from instruct_tune.config import ModelArguments
from instruct_tune.models.adapter_base import absolute_source, adapter_base, adapter_chain
from instruct_tune.models.chat_template import ensure_chat_template
from instruct_tune.models.gguf_convert import resolve_gguf
from instruct_tune.models.lora_targets import lora_target_modules
from instruct_tune.models.weight_files import check_weight_files

logger = logging.getLogger(__name__)

Head = Literal["causal", "reward"]

# Existing tokens that checkpoints reserve for padding; one of them is preferred over adding a new token.
_PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>", "<|padding|>")
_NEW_PAD_TOKEN = "<|pad|>"


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Give the tokenizer a pad token distinct from EOS; returns True when a new token had to be added.

    A pad token equal to EOS makes collators that mask padding also mask the real EOS, and the model
    never learns to stop (the most reported fine-tuning bug in TRL and alignment-handbook).
    """
    eos_id = tokenizer.eos_token_id
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != eos_id:
        return False
    vocab = tokenizer.get_vocab()
    for candidate in _PAD_CANDIDATES:
        if candidate in vocab and vocab[candidate] != eos_id:
            tokenizer.pad_token = candidate
            return False
    if tokenizer.unk_token is not None and tokenizer.unk_token_id != eos_id:
        tokenizer.pad_token = tokenizer.unk_token
        return False
    tokenizer.add_special_tokens({"pad_token": _NEW_PAD_TOKEN})
    logger.warning("Tokenizer had no pad token distinct from EOS: added %s", _NEW_PAD_TOKEN)
    return True


def require_source(source: str) -> None:
    """Fail with the path named when `source` is neither an existing folder nor shaped like a Hub id.

    An `owner/name` whose `owner` is a folder here (`models/tiny-typo` beside `models/`) is a mistyped local
    path, not a Hub id.
    """
    if Path(source).exists():
        return
    owner = Path(source).parts[0] if Path(source).parts else ""
    if is_hub_id(source) and not Path(owner).is_dir():
        return
    local = f" ({owner}/ is a local folder, so this names a path in it)" if is_hub_id(source) else ""
    raise FileNotFoundError(
        f"{source}: no such folder{local} (and not a Hub id, which reads owner/name): check the path, or run "
        "the stage that writes it first"
    )


def load_tokenizer(model_args: ModelArguments, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer with a pad token distinct from EOS and a chat template.

    A GGUF source (a `.gguf` path, or `gguf_file`) is converted first and `model_args` pointed at the folder.
    """
    resolve_gguf(model_args)
    source = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    if source is None:
        raise ValueError("model_name_or_path is not set: give a Hub id, a local checkpoint or a run folder")
    require_source(source)
    if model_args.model_name_or_path and model_args.model_name_or_path != source:
        require_source(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(
        source, revision=model_args.model_revision, trust_remote_code=trust_remote_code
    )
    ensure_pad_token(tokenizer)
    if ensure_chat_template(tokenizer):
        logger.info("%s has no chat template: using instruct_tune's default", source)
    return tokenizer


def _kbit_device_map() -> dict[str, int] | None:
    """Quantised weights go whole to this process's GPU; on CPU they stay where they are loaded."""
    if not torch.cuda.is_available():
        return None
    from accelerate import PartialState

    return {"": PartialState().local_process_index}


def _dtype(name: str | None) -> torch.dtype | str | None:
    if name in (None, "auto"):
        return name
    return getattr(torch, name)


def _disable_dropout(model: torch.nn.Module) -> None:
    """Zero every dropout of the model: `nn.Dropout` modules and the float rates that attention layers
    (Llama, Qwen, Mistral...) pass straight to SDPA, plus the config's rates so a saved model agrees."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "attn_dropout", "dropout", "dropout_rate"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    for key, value in (vars(config) if config is not None else {}).items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, 0.0)


def lora_config(model_args: ModelArguments, model_type: str, head: Head) -> LoraConfig:
    """The LoRA config of `model_args`, with target modules chosen for the architecture when not given."""
    targets = model_args.lora_target_modules or lora_target_modules(model_type)
    if isinstance(targets, str) and targets != "all-linear":
        # TRL's ModelConfig turns a one-item list into a string, which PEFT would read as a full-path regex.
        targets = [targets]
    modules_to_save = model_args.lora_modules_to_save
    if head == "reward" and not modules_to_save:
        modules_to_save = ["score"]  # the value head is new: train it fully and save it with the adapter
    return LoraConfig(
        task_type="SEQ_CLS" if head == "reward" else "CAUSAL_LM",
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets,
        modules_to_save=modules_to_save,
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
        bias="none",
    )


def _adapter_holds_head(adapters: list[str]) -> bool:
    """Whether one of the adapter folders saves a trained reward head (`score` in its modules_to_save)."""
    for adapter in adapters:
        config = json.loads((Path(adapter) / "adapter_config.json").read_text())
        if config.get("task_type") == "SEQ_CLS" and "score" in (config.get("modules_to_save") or []):
            return True
    return False


@contextmanager
def _head_comes_later(auto_class: type, checkpoint: str, expected: bool, **config_kwargs) -> Iterator[None]:
    """While loading a causal-LM checkpoint as a reward model whose head an adapter brings: the missing
    `score` head (and an untied `lm_head` left over) are expected, not reported as problems."""
    if not expected:
        yield
        return
    config = AutoConfig.from_pretrained(checkpoint, **config_kwargs)
    model_class = auto_model_class(auto_class, config)
    with ignoring_load_keys(model_class, missing=[r"^score\."], unexpected=[r"^lm_head\."]):
        yield


def load_model(
    model_args: ModelArguments,
    tokenizer: PreTrainedTokenizerBase,
    *,
    head: Head = "causal",
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
) -> PreTrainedModel | PeftModel:
    """Load the model of `model_args` ready to train: LoRA-wrapped when `use_peft`, 4-bit for QLoRA.

    A run folder holding an adapter is loaded as its base with the adapter merged in; the new adapter (if
    any) is trained on top of that. A GGUF source is converted first (see `load_tokenizer`).
    """
    resolve_gguf(model_args)
    source = model_args.model_name_or_path
    base, adapters = adapter_chain(source) if source is not None else (None, [])
    base = base if adapters else None
    quantization = get_quantization_config(model_args)
    if base is not None and quantization is not None:
        raise ValueError(
            f"{source} is a LoRA adapter: it cannot be merged into a 4-bit base. Run `instruct-tune merge "
            f"{source}` first and quantise the merged model, or train without load_in_4bit."
        )
    auto_class = AutoModelForCausalLM if head == "causal" else AutoModelForSequenceClassification
    kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": _dtype(model_args.dtype),
    }
    if head == "reward":
        kwargs["num_labels"] = 1
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = _kbit_device_map()
    # An absolute path, so that the adapters saved from this model name a base that loads from anywhere.
    checkpoint = absolute_source(base or source)
    for folder in (checkpoint, *adapters):
        check_weight_files(folder)  # a truncated weights file is named before the loaders trip over it
    with _head_comes_later(
        auto_class,
        checkpoint,
        head == "reward" and _adapter_holds_head(adapters),
        revision=model_args.model_revision,
        trust_remote_code=trust_remote_code,
    ):
        model = auto_class.from_pretrained(checkpoint, **{k: v for k, v in kwargs.items() if v is not None})

    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    for adapter in adapters:
        adapter_config = PeftConfig.from_pretrained(adapter)
        # An SFT (causal-LM) adapter merged into a reward model: PEFT's task wrapper for causal LMs needs a
        # generation API the sequence classifier lacks; the task-agnostic wrapper merges the same weights.
        adapter_config.task_type = None
        model = PeftModel.from_pretrained(model, adapter, config=adapter_config).merge_and_unload()
        logger.info("Merged adapter %s into its base %s", adapter, base)
    if adapters:
        model.requires_grad_(True)  # PEFT loads adapters for inference, freezing every weight
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if model_args.disable_dropout:
        _disable_dropout(model)

    if not model_args.use_peft:
        return model
    if quantization is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return get_peft_model(model, lora_config(model_args, model.config.model_type, head))
