"""Model loading: LoRA targets per architecture, reward head, trust_remote_code, QLoRA, dropout, adapter folders.

Tokenizer loading (pad token, chat template): `test_models_tokenizer.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import save_random_model
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

from instruct_tune.config import ModelArguments, SFTStageConfig
from instruct_tune.models import adapter_base, load_model, load_tokenizer, lora_config


def lora_module_names(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


# --- LoRA targets per architecture ---------------------------------------------------------------------


def _configs(vocab: int) -> dict[str, tuple[object, list[str], int]]:
    """model_type -> (config, expected LoRA-wrapped module leaf names, wrapped modules per layer)."""
    llama_like = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    llama_targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return {
        # GPT-2's c_proj exists in attention and MLP: 4 wrapped modules per layer for 3 names
        "gpt2": (
            GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64),
            ["c_attn", "c_proj", "c_fc"],
            4,
        ),
        "gpt_neox": (
            GPTNeoXConfig(
                vocab_size=vocab,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=64,
            ),
            ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
            4,
        ),
        "gptj": (
            GPTJConfig(vocab_size=vocab, n_embd=32, n_layer=1, n_head=2, rotary_dim=8, n_positions=64),
            ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
            6,
        ),
        "opt": (
            OPTConfig(
                vocab_size=vocab,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                ffn_dim=64,
                max_position_embeddings=64,
                word_embed_proj_dim=32,
            ),
            ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
            6,
        ),
        "llama": (LlamaConfig(**llama_like), llama_targets, 7),
        "qwen2": (Qwen2Config(**llama_like), llama_targets, 7),
        "mistral": (MistralConfig(**llama_like), llama_targets, 7),
    }


ARCHITECTURES = ["gpt2", "gpt_neox", "gptj", "opt", "llama", "qwen2", "mistral"]


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_lora_wraps_the_expected_modules_of_each_architecture(
    model_type: str, tiny_tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    config, expected, per_layer = _configs(len(tiny_tokenizer))[model_type]
    assert config.model_type == model_type
    model_dir = save_random_model(config, tiny_tokenizer, tmp_path / model_type)
    args = ModelArguments(model_name_or_path=str(model_dir), use_peft=True, lora_r=4, lora_alpha=8)
    model = load_model(args, load_tokenizer(args))

    assert isinstance(model, PeftModel)
    wrapped = lora_module_names(model)
    assert {name.rsplit(".", 1)[-1] for name in wrapped} == set(expected)
    assert len(wrapped) == per_layer * config.num_hidden_layers
    # every wrapped module sits inside a transformer block: no embeddings, no LM head
    assert not any("lm_head" in name or "embed" in name for name in wrapped)

    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    total = sum(p.numel() for p in model.parameters())
    assert 0 < sum(trainable.values()) < total
    assert all("lora_" in name for name in trainable)

    ids = torch.tensor([tiny_tokenizer("What is 2 + 31?")["input_ids"]])
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tiny_tokenizer))
    assert torch.isfinite(logits).all()


def test_lora_config_choices() -> None:
    args = ModelArguments(model_name_or_path="x", use_peft=True, lora_r=8, lora_alpha=16)
    causal = lora_config(args, "gpt2", "causal")
    assert causal.task_type == "CAUSAL_LM"
    assert set(causal.target_modules) == {"c_attn", "c_proj", "c_fc"}
    assert causal.modules_to_save is None
    assert (causal.r, causal.lora_alpha) == (8, 16)
    # an architecture with no entry gets every linear layer
    assert lora_config(args, "some_new_arch", "causal").target_modules == "all-linear"
    # explicit targets win over the table
    explicit = ModelArguments(model_name_or_path="x", use_peft=True, lora_target_modules=["c_attn", "c_fc"])
    assert set(lora_config(explicit, "gpt2", "causal").target_modules) == {"c_attn", "c_fc"}
    reward = lora_config(args, "gpt2", "reward")
    assert reward.task_type == "SEQ_CLS"
    assert reward.modules_to_save == ["score"]


# --- reward head ---------------------------------------------------------------------------------------


def test_reward_head_is_trained_and_saved_with_the_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    args = ModelArguments(model_name_or_path=str(tiny_model_dir), use_peft=True, lora_r=4)
    tokenizer = load_tokenizer(args)
    model = load_model(args, tokenizer, head="reward")
    assert isinstance(model, PeftModel)
    assert model.peft_config["default"].task_type == "SEQ_CLS"

    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("score" in name for name in trainable)
    assert any("lora_" in name for name in trainable)

    # give the head known values, as training would, and check they travel with the adapter
    torch.manual_seed(1)
    score = model.base_model.model.score.modules_to_save["default"]
    with torch.no_grad():
        score.weight.normal_()
    model.eval()
    texts = ["What is 2 + 31? 33", "Reverse this list: sad, pink, walk"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        rewards = model(**batch).logits
        alone = torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in texts])
    assert rewards.shape == (2, 1)
    torch.testing.assert_close(rewards, alone, atol=1e-4, rtol=1e-4)  # padding is found through pad_token_id

    model.save_pretrained(tmp_path / "rm")
    saved = load_file(tmp_path / "rm" / "adapter_model.safetensors")
    score_keys = [key for key in saved if "score" in key]
    assert score_keys, sorted(saved)
    torch.testing.assert_close(saved[score_keys[0]], score.weight.detach())

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    base.config.pad_token_id = tokenizer.pad_token_id
    reloaded = PeftModel.from_pretrained(base, tmp_path / "rm").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, rewards, atol=1e-5, rtol=1e-5)


# --- trust_remote_code ---------------------------------------------------------------------------------


def test_remote_code_is_not_run_by_default(tiny_tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    assert SFTStageConfig(output_dir=str(tmp_path), report_to=[]).trust_remote_code is False
    repo = tmp_path / "custom"
    repo.mkdir()
    auto_map = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"}
    (repo / "config.json").write_text(json.dumps({"model_type": "x-custom", "auto_map": auto_map}))
    code = (
        "import pathlib\n"
        "pathlib.Path(__file__).with_name('EXECUTED').write_text('ran')\n"
        "from transformers import PretrainedConfig\n"
        "class XConfig(PretrainedConfig):\n    model_type = 'x-custom'\n"
    )
    (repo / "configuration_x.py").write_text(code)
    (repo / "modeling_x.py").write_text(code)
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(ModelArguments(model_name_or_path=str(repo)), tiny_tokenizer)
    assert not (repo / "EXECUTED").exists()


# --- QLoRA ---------------------------------------------------------------------------------------------


def test_qlora_puts_lora_over_4bit_layers_and_trains(tiny_model_dir: Path) -> None:
    import bitsandbytes as bnb

    args = ModelArguments(model_name_or_path=str(tiny_model_dir), use_peft=True, load_in_4bit=True, lora_r=4)
    tokenizer = load_tokenizer(args)
    model = load_model(args, tokenizer)
    n_layer = model.config.n_layer

    wrapped = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(wrapped) == 4 * n_layer
    assert all(isinstance(m.get_base_layer(), bnb.nn.Linear4bit) for m in wrapped)
    quantised = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantised) == len(wrapped)  # every 4-bit layer carries LoRA
    assert all(not p.requires_grad for m in quantised for p in m.parameters())

    model.train()
    batch = tokenizer(
        ["What is 2 + 31? 33", "Reverse this list: sad, pink"], return_tensors="pt", padding=True
    ).to(model.device)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = model(**batch, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    lora_b = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert len(lora_b) == len(wrapped)
    for name, grad in lora_b.items():
        assert grad is not None, name
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name


# --- dropout -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dropout_model_dir(
    tiny_tokenizer: PreTrainedTokenizerBase, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    config = GPT2Config(
        vocab_size=len(tiny_tokenizer),
        n_embd=32,
        n_layer=1,
        n_head=2,
        n_positions=64,
        resid_pdrop=0.3,
        embd_pdrop=0.3,
        attn_pdrop=0.3,
    )
    return save_random_model(config, tiny_tokenizer, tmp_path_factory.mktemp("dropout") / "gpt2")


def _two_train_forwards(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> float:
    model.train()
    batch = tokenizer(["Reverse this list: sad, pink, walk, open, head"], return_tensors="pt")
    with torch.no_grad():
        return (model(**batch).logits - model(**batch).logits).abs().max().item()


@pytest.mark.parametrize("use_peft", [False, True])
def test_disable_dropout_zeroes_every_model_dropout(dropout_model_dir: Path, use_peft: bool) -> None:
    args = ModelArguments(
        model_name_or_path=str(dropout_model_dir), disable_dropout=True, use_peft=use_peft, lora_dropout=0.0
    )
    tokenizer = load_tokenizer(args)
    model = load_model(args, tokenizer)
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts
    assert all(m.p == 0.0 for m in dropouts)
    assert _two_train_forwards(model, tokenizer) == 0.0  # training-mode forward is deterministic


def test_dropout_is_kept_when_not_disabled(dropout_model_dir: Path) -> None:
    args = ModelArguments(model_name_or_path=str(dropout_model_dir), disable_dropout=False)
    tokenizer = load_tokenizer(args)
    model = load_model(args, tokenizer)
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.3}
    assert _two_train_forwards(model, tokenizer) > 0.0


# --- adapter folder as a model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_dir(make_adapter_folder) -> Path:
    """A run-folder-like LoRA adapter over the tiny model, with non-zero (as if trained) LoRA weights."""
    return make_adapter_folder("adapter", seed=2, std=0.2)


def _logits(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    model.eval()
    batch = tokenizer(
        ["What is 2 + 31?", "Repeat the word grass 2 times."], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        return model(**batch).logits


def test_adapter_folder_is_merged_into_its_base(tiny_model_dir: Path, adapter_dir: Path) -> None:
    assert adapter_base(adapter_dir) == str(tiny_model_dir)
    assert adapter_base(tiny_model_dir) is None

    args = ModelArguments(model_name_or_path=str(adapter_dir))
    tokenizer = load_tokenizer(args)
    merged = load_model(args, tokenizer)
    assert not isinstance(merged, PeftModel)
    assert not lora_module_names(merged)

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    got, want, plain = _logits(merged, tokenizer), _logits(reference, tokenizer), _logits(base, tokenizer)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (got - plain).abs().max() > 1e-2  # the adapter really changes the model

    # a new adapter trained on top starts from the merged model (its LoRA B is zero)
    stacked = load_model(
        ModelArguments(model_name_or_path=str(adapter_dir), use_peft=True, lora_r=4), tokenizer
    )
    assert isinstance(stacked, PeftModel)
    torch.testing.assert_close(_logits(stacked, tokenizer), want, atol=1e-4, rtol=0)


def test_adapter_folder_cannot_be_loaded_in_4bit(
    adapter_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    args = ModelArguments(model_name_or_path=str(adapter_dir), use_peft=True, load_in_4bit=True)
    with pytest.raises(ValueError, match="cannot be merged into a 4-bit base"):
        load_model(args, tiny_tokenizer)


def test_a_missing_local_folder_is_named_not_sent_to_the_hub() -> None:
    with pytest.raises(FileNotFoundError, match="outputs/no-such-run/sft: no such folder"):
        load_tokenizer(ModelArguments(model_name_or_path="outputs/no-such-run/sft"))
