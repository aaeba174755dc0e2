"""Tokenizer and model loading: pad token, chat template, LoRA targets per architecture, reward head, QLoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from instruct_tune.config import ModelArguments, SFTStageConfig
from instruct_tune.models import (
    DEFAULT_CHAT_TEMPLATE,
    adapter_base,
    ensure_chat_template,
    ensure_pad_token,
    load_model,
    load_tokenizer,
    lora_config,
)

EOS = "<|endoftext|>"
TEXTS = [
    "What is 2 + 31? 33",
    "Reverse this list: sad, pink, walk, open, head",
    "Put these numbers in order from smallest to largest: 44, 42, 79, 9, 96",
    "Repeat the word grass 2 times. grass grass",
] * 5


CHATS = [
    [{"role": "user", "content": "What is 2 + 31?"}, {"role": "assistant", "content": "33"}],
    [
        {"role": "system", "content": "You sort lists."},
        {"role": "user", "content": "Sort: 4, 1, 3"},
        {"role": "assistant", "content": "1, 3, 4"},
        {"role": "user", "content": "Now reverse this list: sad, pink"},
        {"role": "assistant", "content": "pink, sad"},
    ],
]


def gpt2_like_tokenizer(*extra_special: str, unk: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer shaped like GPT-2's: one special token (EOS = BOS), no pad, no template."""
    backend = Tokenizer(models.BPE(unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    special = [EOS, *extra_special, *([unk] if unk else [])]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TEXTS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, bos_token=EOS, unk_token=unk)


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def save_random_model(config, tokenizer: PreTrainedTokenizerBase, out: Path, *, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def lora_module_names(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


# --- pad token -----------------------------------------------------------------------------------------


def test_pad_token_is_added_to_a_gpt2_like_tokenizer() -> None:
    tok = gpt2_like_tokenizer()
    assert tok.pad_token is None
    size = len(tok)
    assert ensure_pad_token(tok) is True
    assert tok.pad_token == "<|pad|>"
    assert tok.pad_token_id == size  # one new token, at the end of the vocabulary
    assert tok.pad_token_id != tok.eos_token_id
    assert len(tok) == size + 1
    # a second call finds the pad already distinct: nothing more is added
    assert ensure_pad_token(tok) is False
    assert len(tok) == size + 1


def test_pad_equal_to_eos_is_replaced() -> None:
    tok = gpt2_like_tokenizer()
    tok.pad_token = tok.eos_token  # the common "fix" that masks the real EOS
    assert tok.pad_token_id == tok.eos_token_id
    assert ensure_pad_token(tok) is True
    assert tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id


def test_existing_pad_candidate_is_reused_instead_of_adding(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    tok = gpt2_like_tokenizer("[PAD]", unk="<unk>")
    size = len(tok)
    assert ensure_pad_token(tok) is False
    assert tok.pad_token == "[PAD]"  # a reserved pad token wins over unk
    assert len(tok) == size

    tiny = AutoTokenizer.from_pretrained(tiny_tokenizer.name_or_path)
    tiny.pad_token = tiny.eos_token
    size = len(tiny)
    assert ensure_pad_token(tiny) is False
    assert tiny.pad_token == "<|pad|>"
    assert tiny.pad_token_id != tiny.eos_token_id
    assert len(tiny) == size


def test_unk_is_used_as_pad_when_no_candidate_exists() -> None:
    tok = gpt2_like_tokenizer(unk="<unk>")
    size = len(tok)
    assert ensure_pad_token(tok) is False
    assert tok.pad_token == "<unk>"
    assert tok.pad_token_id == tok.unk_token_id != tok.eos_token_id
    assert len(tok) == size


def test_distinct_pad_is_kept(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer.name_or_path)
    pad_id = tok.pad_token_id
    assert pad_id is not None and pad_id != tok.eos_token_id
    assert ensure_pad_token(tok) is False
    assert tok.pad_token_id == pad_id


def test_load_model_resizes_embeddings_for_an_added_pad(tmp_path: Path) -> None:
    tok = gpt2_like_tokenizer()
    vocab = len(tok)
    config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    model_dir = save_random_model(config, tok, tmp_path / "gpt2-like")
    args = ModelArguments(model_name_or_path=str(model_dir))

    tokenizer = load_tokenizer(args)
    assert len(tokenizer) == vocab + 1
    model = load_model(args, tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == vocab + 1
    assert model.get_output_embeddings().weight.shape[0] == vocab + 1
    assert model.config.pad_token_id == tokenizer.pad_token_id == vocab
    assert model.generation_config.pad_token_id == vocab

    # a right-padded batch runs and the padding does not change the real tokens' logits
    batch = tokenizer(["What is 2 + 31?", "Reverse"], return_tensors="pt", padding=True)
    assert (batch["input_ids"] == vocab).any()
    with torch.no_grad():
        padded = model(**batch).logits[1, : int(batch["attention_mask"][1].sum())]
        alone = model(**tokenizer(["Reverse"], return_tensors="pt")).logits[0]
    torch.testing.assert_close(padded, alone, atol=1e-4, rtol=1e-4)


def test_load_model_does_not_resize_when_pad_exists(tiny_model_dir: Path) -> None:
    args = ModelArguments(model_name_or_path=str(tiny_model_dir))
    tokenizer = load_tokenizer(args)
    rows = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    model = load_model(args, tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == rows
    assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id


# --- chat template -------------------------------------------------------------------------------------


@pytest.fixture(params=["tiny", "gpt2-like"])
def templateless_dir(request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A tokenizer folder with no chat template: the tiny tokenizer with it removed, or a GPT-2-like one."""
    if request.param == "tiny":
        tok = AutoTokenizer.from_pretrained(tiny_model_dir)
        tok.chat_template = None
    else:
        tok = gpt2_like_tokenizer()
    out = tmp_path / request.param
    tok.save_pretrained(out)
    assert not (out / "chat_template.jinja").exists()
    assert not json.loads((out / "tokenizer_config.json").read_text()).get("chat_template")
    return out


def test_default_chat_template_is_added_when_missing(templateless_dir: Path) -> None:
    assert not AutoTokenizer.from_pretrained(templateless_dir).chat_template
    tok = load_tokenizer(ModelArguments(model_name_or_path=str(templateless_dir)))
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id


def test_existing_chat_template_is_kept() -> None:
    tok = gpt2_like_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert ensure_chat_template(tok) is False
    assert tok.chat_template == "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    bare = gpt2_like_tokenizer()
    assert ensure_chat_template(bare) is True
    assert bare.chat_template == DEFAULT_CHAT_TEMPLATE


@pytest.mark.parametrize("chat", CHATS, ids=["single-turn", "multi-turn"])
def test_generation_prompt_is_a_token_prefix_of_the_full_chat(
    templateless_dir: Path, chat: list[dict]
) -> None:
    tok = load_tokenizer(ModelArguments(model_name_or_path=str(templateless_dir)))
    prompt = tok.apply_chat_template(chat[:-1], add_generation_prompt=True, tokenize=True)["input_ids"]
    full = tok.apply_chat_template(chat, tokenize=True)["input_ids"]
    assert len(full) > len(prompt)
    assert full[: len(prompt)] == prompt
    # what follows the prompt is exactly the completion and the EOS token
    assert tok.decode(full[len(prompt) :]) == chat[-1]["content"] + tok.eos_token


@pytest.mark.parametrize("chat", CHATS, ids=["single-turn", "multi-turn"])
def test_assistant_turns_end_with_eos_and_are_masked_in(templateless_dir: Path, chat: list[dict]) -> None:
    tok = load_tokenizer(ModelArguments(model_name_or_path=str(templateless_dir)))
    out = tok.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    assert ids[-1] == tok.eos_token_id
    assert mask[-1] == 1
    prompt_len = len(
        tok.apply_chat_template(chat[:-1], add_generation_prompt=True, tokenize=True)["input_ids"]
    )
    assert all(mask[prompt_len:])
    # the masked tokens are the assistant contents, each followed by EOS, and nothing else
    assistant_ids = [token for token, m in zip(ids, mask, strict=True) if m]
    expected = "".join(m["content"] + tok.eos_token for m in chat if m["role"] == "assistant")
    assert tok.decode(assistant_ids) == expected
    assert assistant_ids.count(tok.eos_token_id) == sum(m["role"] == "assistant" for m in chat)


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
