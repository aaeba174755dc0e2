"""The vLLM rollout backend's vLLM-free parts: sampling options, engine weights, rollout layout, config checks.

vLLM itself (and a GPU) is not needed: what the backend feeds vLLM and makes of its tokens is tested here
against the HF path on real tiny models; the engine is exercised by `bench/gpu_check.py` on a GPU machine.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from instruct_tune.config import ConfigError, ModelArguments, PPOStageConfig
from instruct_tune.config.ppo import check_rollout_models
from instruct_tune.models import load_tokenizer
from instruct_tune.models.sampling import Rollout, encode_prompts, truncate_after_eos
from instruct_tune.ppo.adapters import POLICY
from instruct_tune.ppo.engine_sync import (
    engine_weights,
    lora_engine_rank,
    lora_request_tensors,
    rollout_from_outputs,
    sampling_options,
    vllm_policy_problems,
)
from instruct_tune.ppo.rollout import HFRolloutBackend, RolloutBackend, make_rollout_backend
from instruct_tune.ppo.vllm_rollout import VLLMRolloutBackend

HAS_VLLM = importlib.util.find_spec("vllm") is not None
ON_CPU = not torch.cuda.is_available()


def _randomize_lora(model: torch.nn.Module, adapter: str, seed: int) -> None:
    """Non-zero B weights (as if trained), so the merged delta is not zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f"lora_B.{adapter}." in name or f"lora_A.{adapter}." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def _assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model_dir)))
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), tokenizer


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


# --- sampling options -------------------------------------------------------------------------------------


def test_sampling_options_reproduce_the_hf_path(tmp_path: Path) -> None:
    args = PPOStageConfig(output_dir=str(tmp_path), max_new_tokens=12, temperature=0.7, top_p=0.9)
    options = sampling_options(args, eos_token_id=5)
    assert options == {
        "n": 1,
        "max_tokens": 12,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": -1,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "stop_token_ids": [5],
        "ignore_eos": False,
        "detokenize": False,
        "logprobs": None,
        "prompt_logprobs": None,
    }
    assert "seed" not in options  # the engine's RNG during training
    seeded = sampling_options(args, eos_token_id=[5, 7], seed=11, max_new_tokens=3)
    assert seeded["seed"] == 11 and seeded["stop_token_ids"] == [5, 7] and seeded["max_tokens"] == 3
    explicit = sampling_options(eos_token_id=2, max_new_tokens=4, temperature=1.0, top_p=1.0)
    assert (explicit["temperature"], explicit["top_p"], explicit["max_tokens"]) == (1.0, 1.0, 4)


def test_sampling_options_edge_cases() -> None:
    greedy = sampling_options(eos_token_id=2, max_new_tokens=4, temperature=0, top_p=0.5)
    assert greedy["temperature"] == 0.0 and greedy["top_p"] == 1.0  # greedy: top_p plays no part, as in HF
    with pytest.raises(ValueError, match="temperature"):
        sampling_options(eos_token_id=2, max_new_tokens=4, temperature=-1, top_p=1.0)
    with pytest.raises(ValueError, match="top_p"):
        sampling_options(eos_token_id=2, max_new_tokens=4, temperature=1, top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampling_options(eos_token_id=2, temperature=1, top_p=1)


# --- rollout layout ---------------------------------------------------------------------------------------


def _assert_same_rollout(got: Rollout, want: Rollout) -> None:
    for field in ("query", "query_mask", "response", "response_mask", "has_eos"):
        a, b = getattr(got, field), getattr(want, field).cpu()
        assert a.dtype == b.dtype and a.shape == b.shape, field
        assert torch.equal(a, b), field
    assert torch.equal(got.last_index, want.last_index.cpu())


@pytest.fixture(scope="module")
def stopping(tiny):
    """The tiny model, chat prompts, and its tokenizer with an EOS that some sampled responses reach and some do
    not (the pretrained tiny model has no SFT: it never samples its own EOS)."""
    model, tokenizer = tiny
    texts = ["Add 12 and 30.", "Reverse: a b c", "Hi", "Sort the words: pear apple fig banana", "Count to 3."]
    prompts = encode_prompts(tokenizer, [[{"role": "user", "content": t}] for t in texts])
    sampled = HFRolloutBackend(model, tokenizer, max_new_tokens=24).generate(prompts, seed=0).response
    rows_with = {t: sum(t in row for row in sampled.tolist()) for t in sampled[0, 2:].tolist()}
    stop = next(t for t, n in rows_with.items() if 0 < n < len(prompts))
    stopping_tokenizer = copy.deepcopy(tokenizer)
    stopping_tokenizer.eos_token = stopping_tokenizer.convert_ids_to_tokens(stop)
    assert stopping_tokenizer.eos_token_id == stop != stopping_tokenizer.pad_token_id
    return model, stopping_tokenizer, prompts


@pytest.mark.parametrize(("max_new_tokens", "temperature"), [(24, 1.0), (3, 1.0), (6, 0.0)])
def test_rollout_from_outputs_lays_out_what_the_hf_path_samples(
    stopping, max_new_tokens: int, temperature: float
) -> None:
    model, tokenizer, prompts = stopping
    backend = HFRolloutBackend(model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature)
    hf = backend.generate(prompts, seed=0)
    if max_new_tokens == 24:  # both kinds of rows are there: ended by EOS, and cut at max_new_tokens
        assert 0 < int(hf.has_eos.sum()) < len(prompts)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    kept = [row[mask.bool()].tolist() for row, mask in zip(hf.response, hf.response_mask, strict=True)]
    _assert_same_rollout(rollout_from_outputs(prompts, kept, eos, pad, max_new_tokens), hf)
    # What an engine may return past the first EOS, or past max_new_tokens, is dropped.
    longer = [ids + [eos, 7, 8] if ids and ids[-1] == eos else ids + [9] * 5 for ids in kept]
    _assert_same_rollout(rollout_from_outputs(prompts, longer, eos, pad, max_new_tokens), hf)


def test_rollout_from_outputs_edge_cases() -> None:
    eos, pad = 2, 0
    prompts = [[5, 6, 7], [8], [9, 10]]
    responses = [[11, 2, 12, 13], [14, 15, 16, 17, 18], []]  # EOS mid-way, cut at max_new_tokens, empty
    rollout = rollout_from_outputs(prompts, responses, eos, pad, max_new_tokens=4)
    assert rollout.query.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert rollout.query_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert rollout.response.tolist() == [[11, 2, 0, 0], [14, 15, 16, 17], [0, 0, 0, 0]]
    assert rollout.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert rollout.has_eos.tolist() == [True, False, False]
    assert rollout.last_index.tolist() == [4, 6, 3]
    # The same as the HF path's own cut of the padded responses.
    padded = torch.tensor([[11, 2, 12, 13], [14, 15, 16, 17], [0, 0, 0, 0]])
    response, mask, has_eos = truncate_after_eos(padded, eos, pad)
    assert torch.equal(rollout.response, response) and torch.equal(rollout.response_mask[:2], mask[:2])
    assert rollout.has_eos[:2].tolist() == has_eos[:2].tolist()
    # Every response empty: one column of padding; a pad token that is the EOS token is no EOS.
    empty = rollout_from_outputs([[3]], [[]], eos_token_id=0, pad_token_id=0, max_new_tokens=4)
    assert empty.response.tolist() == [[0]] and empty.response_mask.tolist() == [[0]]
    assert empty.has_eos.tolist() == [False]
    # A response the engine ended short of max_new_tokens without EOS (its context was full), pad = EOS (GPT-2).
    short = rollout_from_outputs([[3], [4]], [[5, 6, 0], [7]], eos_token_id=0, pad_token_id=0, max_new_tokens=4)
    assert short.response.tolist() == [[5, 6, 0], [7, 0, 0]]
    assert short.response_mask.tolist() == [[1, 1, 1], [1, 0, 0]] and short.has_eos.tolist() == [True, False]
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        rollout_from_outputs([[1], [2]], [[3]], eos, pad, 4)


# --- engine weights ---------------------------------------------------------------------------------------


def _policy_and_expected(base: torch.nn.Module, lora: LoraConfig, second: LoraConfig):
    policy = get_peft_model(base, lora)
    _randomize_lora(policy, POLICY, seed=1)
    policy.add_adapter("reward", second)
    _randomize_lora(policy, "reward", seed=2)
    policy.set_adapter("reward")  # whatever is active, the POLICY adapter is what the engine gets
    alone = copy.deepcopy(policy)
    alone.delete_adapter("reward")
    alone.set_adapter(POLICY)
    expected = alone.merge_and_unload().state_dict()
    return policy, expected


def _check_engine_weights(policy: PeftModel, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    got = dict(engine_weights(policy))
    _assert_same_state(got, expected)
    assert not [n for n in got if "lora" in n or "base_model" in n or "base_layer" in n or "reward" in n]
    after = policy.state_dict()
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[k], before[k]) for k in before)  # the training weights are untouched
    return got


def test_engine_weights_merge_the_policy_lora_of_a_gpt2(tiny_model_dir: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, lora_dropout=0.0)
    second = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)
    policy, expected = _policy_and_expected(base, lora, second)
    got = _check_engine_weights(policy, expected)
    assert "transformer.h.0.attn.c_attn.weight" in got and "lm_head.weight" in got
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).state_dict()
    assert sorted(got) == sorted(plain)  # the plain model's names, every one
    assert not torch.allclose(got["transformer.h.0.attn.c_attn.weight"], plain["transformer.h.0.attn.c_attn.weight"])


def test_engine_weights_merge_the_policy_lora_of_a_llama() -> None:
    lora = LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["lm_head"]
    )
    second = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "k_proj"])
    policy, _ = _policy_and_expected(_tiny_llama(), lora, second)
    with torch.no_grad():  # the policy's trained copy of lm_head differs from the base's
        policy.base_model.model.lm_head.modules_to_save[POLICY].weight.add_(0.5)
    alone = copy.deepcopy(policy)
    alone.delete_adapter("reward")
    alone.set_adapter(POLICY)
    expected = alone.merge_and_unload().state_dict()
    got = _check_engine_weights(policy, expected)
    assert sorted(got) == sorted(_tiny_llama().state_dict())
    assert "model.layers.0.self_attn.q_proj.weight" in got and "lm_head.weight" in got
    assert torch.allclose(got["lm_head.weight"], policy.base_model.model.lm_head.modules_to_save[POLICY].weight)


def test_engine_weights_of_a_full_policy_are_its_state_dict() -> None:
    model = _tiny_llama()
    _assert_same_state(dict(engine_weights(model)), model.state_dict())


# --- LoRA sync --------------------------------------------------------------------------------------------


def test_lora_request_tensors_are_the_saved_policy_adapter(tmp_path: Path) -> None:
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    policy = get_peft_model(_tiny_llama(), lora)
    _randomize_lora(policy, POLICY, seed=3)
    policy.add_adapter("value", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    tensors, config = lora_request_tensors(policy)
    policy.save_pretrained(str(tmp_path), selected_adapters=[POLICY])
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    _assert_same_state(tensors, saved)
    assert all(n.startswith("base_model.model.model.layers.") and ".lora_" in n for n in tensors)
    assert not [n for n in tensors if ".default." in n or "value" in n]
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    json.dumps(config, default=str)  # written as adapter_config.json
    assert lora_engine_rank(config) == 8  # vLLM's max_lora_rank takes 1, 8, 16, 32...
    assert lora_engine_rank({"r": 16, "rank_pattern": {"q_proj": 20}}) == 32
    with pytest.raises(ConfigError, match="vllm_weight_sync: lora needs a LoRA policy"):
        lora_request_tensors(_tiny_llama())
    with pytest.raises(ConfigError, match="modules_to_save"):
        lora_request_tensors(get_peft_model(_tiny_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"])))


# --- config and factory -----------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_VLLM and not ON_CPU, reason="vLLM and a GPU are here: nothing to refuse")
def test_rollout_backend_vllm_is_refused_when_the_config_is_built(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^rollout_backend: vllm needs") as error:
        PPOStageConfig(output_dir=str(tmp_path), rollout_backend="vllm")
    if not HAS_VLLM:
        assert "pip install 'instruct-tune[vllm]'" in str(error.value)
    if ON_CPU:
        assert "a CUDA GPU, and torch.cuda.is_available() is false" in str(error.value)
    with pytest.raises(ConfigError, match="a CUDA GPU, and use_cpu is true"):
        PPOStageConfig(output_dir=str(tmp_path), rollout_backend="vllm", use_cpu=True)


def test_rollout_options_are_checked(tmp_path: Path) -> None:
    assert PPOStageConfig(output_dir=str(tmp_path)).rollout_backend == "hf"
    with pytest.raises(ConfigError, match="rollout_backend: 'sglang' is not one of hf, vllm"):
        PPOStageConfig(output_dir=str(tmp_path), rollout_backend="sglang")
    with pytest.raises(ConfigError, match="vllm_weight_sync: 'delta' is not one of merged, lora"):
        PPOStageConfig(output_dir=str(tmp_path), vllm_weight_sync="delta")
    for share in (0, 1.5):
        with pytest.raises(ConfigError, match="vllm_gpu_memory_utilization"):
            PPOStageConfig(output_dir=str(tmp_path), vllm_gpu_memory_utilization=share)


def test_make_rollout_backend(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    args = PPOStageConfig(output_dir=str(tmp_path), max_new_tokens=5, temperature=0.5, top_p=0.8)
    backend = make_rollout_backend(args, model, tokenizer, "cpu")
    assert isinstance(backend, HFRolloutBackend) and isinstance(backend, RolloutBackend)
    assert (backend.max_new_tokens, backend.temperature, backend.top_p, backend.device) == (5, 0.5, 0.8, "cpu")
    assert issubclass(VLLMRolloutBackend, RolloutBackend)
    if not HAS_VLLM or ON_CPU:  # a caller that skipped the config's check still gets it, before any engine
        args.rollout_backend = "vllm"
        with pytest.raises(ConfigError, match="^rollout_backend: vllm needs"):
            make_rollout_backend(args, model, tokenizer, "cpu")
    args.rollout_backend = "other"
    with pytest.raises(ValueError, match="rollout_backend: 'other'"):
        make_rollout_backend(args, model, tokenizer, "cpu")


def test_vllm_refuses_quantised_bases_and_lora_sync_of_a_full_policy() -> None:
    model = _tiny_llama()
    assert vllm_policy_problems(model, "merged") == []
    assert "a LoRA policy" in vllm_policy_problems(model, "lora")[0]
    model.is_loaded_in_4bit = True  # what transformers marks a bitsandbytes 4-bit model with
    assert "load_in_4bit" in vllm_policy_problems(model, "merged")[0]


def test_rollout_models_are_checked_before_they_load(tmp_path: Path) -> None:
    args = PPOStageConfig(output_dir=str(tmp_path))  # hf: anything goes
    quantised = ModelArguments(model_name_or_path="m", use_peft=True, load_in_4bit=True)
    check_rollout_models(args, quantised)
    args.rollout_backend = "vllm"  # as if the config's own checks had passed (a GPU machine with vLLM)
    with pytest.raises(ConfigError, match="rollout_backend: vllm .* load_in_4bit/load_in_8bit"):
        check_rollout_models(args, quantised)
    check_rollout_models(args, ModelArguments(model_name_or_path="m"))
    args.vllm_weight_sync = "lora"
    with pytest.raises(ConfigError, match="vllm_weight_sync: lora needs a LoRA policy"):
        check_rollout_models(args, ModelArguments(model_name_or_path="m"))
    check_rollout_models(args, ModelArguments(model_name_or_path="m", use_peft=True))


def test_rollout_backend_flags_parse(tmp_path: Path) -> None:
    from instruct_tune.config import DataArguments, parse_args

    config = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "tiny" / "ppo.yaml"
    flags = ["--config", str(config), "--output_dir", str(tmp_path), "--vllm_weight_sync", "lora"]
    args = parse_args(PPOStageConfig, DataArguments, ModelArguments, args=flags)[0]
    assert (args.rollout_backend, args.vllm_weight_sync, args.vllm_gpu_memory_utilization) == ("hf", "lora", 0.3)
    if not HAS_VLLM or ON_CPU:
        with pytest.raises(ConfigError, match="^rollout_backend: vllm needs"):
            parse_args(PPOStageConfig, DataArguments, ModelArguments, args=[*flags, "--rollout_backend", "vllm"])
