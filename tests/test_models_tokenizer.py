"""Tokenizer loading: the pad token (added, replaced or reused; the embeddings resized for it) and the chat
template (added when missing, masks of the assistant turns).

Model loading (LoRA targets, reward head, QLoRA, dropout, adapter folders): `test_models.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import save_random_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, GPT2Config, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from instruct_tune.config import ModelArguments
from instruct_tune.models import (
    DEFAULT_CHAT_TEMPLATE,
    ensure_chat_template,
    ensure_pad_token,
    load_model,
    load_tokenizer,
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
