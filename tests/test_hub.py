"""Using a run folder: push (dry run and a recorded upload), merge, generate and chat.

The Hub itself is unreachable here, so the upload goes to a local HTTP server given as HF_ENDPOINT
(recording_hub.RecordingHub, the `hub_server` fixture): it records every request, so the test sees exactly what
the client sent.
"""

from __future__ import annotations

import base64
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import CLI, REPO, TINY_DATA, head_of
from huggingface_hub import ModelCard
from peft import PeftModel
from recording_hub import TOKEN, RecordingHub, hub_env, push
from stage_runs import lora_args, normalised_by, ppo_args, reward_args, train_reward
from transformers import AutoModelForCausalLM

from instruct_tune.artifacts import write_model_card
from instruct_tune.config import DataArguments, ModelArguments
from instruct_tune.export import MergeError, merge_run_folder
from instruct_tune.generate import read_prompts
from instruct_tune.hub import PushError, check_repo_id, upload_plan
from instruct_tune.models import load_tokenizer
from instruct_tune.stages.ppo import run_ppo


@pytest.fixture(scope="module")
def ppo_folder(sft_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real PPO run folder: LoRA policy over the SFT adapter folder, a reward run beside it, a checkpoint."""
    root = tmp_path_factory.mktemp("run")
    data = root / "data"
    data.mkdir()
    prompts = head_of(TINY_DATA / "prompts.jsonl", data / "prompts.jsonl", 32)
    reward = train_reward(
        reward_args(root / "reward", **normalised_by(sft_folder, prompts, samples=16, max_new_tokens=8)),
        lora_args(sft_folder, lora_r=4, lora_alpha=8),
        head_of(TINY_DATA / "comparisons.jsonl", data / "cmp.jsonl", 24),
    )
    args = ppo_args(
        root / "ppo",
        reward,
        total_episodes=16,
        num_mini_batches=2,
        max_new_tokens=8,
        eval_samples=0,
        save_steps=1,
        save_total_limit=1,
    )
    data_args = DataArguments(dataset_name=str(prompts), eval_fraction=0.0)
    return run_ppo(args, data_args, lora_args(sft_folder, lora_r=4, lora_alpha=8))


# --- push -----------------------------------------------------------------------------------------------


EXPECTED = {
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "chat_template.jinja",
    "tokenizer.json",
    "tokenizer_config.json",
}


def test_dry_run_lists_adapter_tokenizer_and_card_only(ppo_folder: Path) -> None:
    assert any(ppo_folder.glob("checkpoint-*")) and (ppo_folder / "trainer_state.json").is_file()
    plan = {u.path_in_repo for u in upload_plan(ppo_folder)}
    assert plan == EXPECTED
    out = subprocess.run(
        [*CLI, "push", str(ppo_folder), "--repo-id", "someone/tiny-ppo", "--dry-run"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9"},  # a dry run contacts nothing
    )
    assert out.returncode == 0, out.stderr
    listed = {line.split()[-1] for line in out.stdout.splitlines()[1:-1]}
    assert listed == EXPECTED and "6 files" in out.stdout.splitlines()[-1]
    with_checkpoints = {u.path_in_repo for u in upload_plan(ppo_folder, include_checkpoints=True)}
    extra = with_checkpoints - EXPECTED
    assert extra and all(p.startswith("checkpoint-") for p in extra)
    assert not any(Path(p).name.startswith(("optimizer", "scheduler", "rng_state")) for p in extra)


def committed_files(request: dict) -> dict[str, bytes]:
    lines = [json.loads(line) for line in request["body"].splitlines()]
    return {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines if line["key"] == "file"}


def folder_snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_sends_one_commit_with_the_planned_files(ppo_folder: Path, hub_server: str, tmp_path: Path) -> None:
    before = folder_snapshot(ppo_folder)
    out = push(ppo_folder, hub_server, tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"{hub_server}/someone/tiny-ppo/commit/abc123" in out.stdout
    commits = [r for r in RecordingHub.requests if "/commit/" in r["path"]]
    assert len(commits) == 1 and commits[0]["path"].startswith("/api/models/someone/tiny-ppo/commit/main")
    files = committed_files(commits[0])
    assert set(files) == EXPECTED
    assert files["adapter_model.safetensors"] == (ppo_folder / "adapter_model.safetensors").read_bytes()
    assert commits[0]["auth"] == f"Bearer {TOKEN}"  # the token goes to the Hub, and nowhere else:
    assert TOKEN not in out.stdout + out.stderr
    after = folder_snapshot(ppo_folder)  # nothing local changed; where it went is recorded beside it
    record = json.loads(after.pop("hub.json"))
    assert after == before and record["repo_id"] == "someone/tiny-ppo" and record["commit_url"].endswith("abc123")
    assert not any(TOKEN.encode() in data for data in [*before.values(), json.dumps(record).encode()])
    (ppo_folder / "hub.json").unlink()


@pytest.mark.parametrize("status", [401, 403, 404])
def test_server_refusal_is_a_clear_error(ppo_folder: Path, hub_server: str, tmp_path: Path, status: int) -> None:
    RecordingHub.fail = status
    before = folder_snapshot(ppo_folder)
    out = push(ppo_folder, hub_server, tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"HTTP {status}" in out.stderr and TOKEN not in out.stderr + out.stdout
    assert not [r for r in RecordingHub.requests if "/commit/" in r["path"]]
    assert folder_snapshot(ppo_folder) == before


def test_no_token_no_network_and_bad_repo_ids(ppo_folder: Path, hub_server: str, tmp_path: Path) -> None:
    out = push(ppo_folder, hub_server, tmp_path, token=None)
    assert out.returncode == 1 and "no Hugging Face token" in out.stderr and not RecordingHub.requests
    unreachable = push(ppo_folder, "http://127.0.0.1:9", tmp_path)  # nothing listens on port 9
    assert unreachable.returncode == 1 and "cannot reach http://127.0.0.1:9" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr and TOKEN not in unreachable.stderr
    for bad in ("tiny-ppo", "a/b/c", "someone/", "some one/x", "../x"):
        with pytest.raises(PushError, match="is not a Hub repo id"):
            check_repo_id(bad)


def test_card_metadata_names_the_base_and_the_lineage(ppo_folder: Path, sft_folder: Path) -> None:
    card = ModelCard.load(ppo_folder / "README.md")
    assert card.data.library_name == "peft" and {"trl", "rlhf", "ppo"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "text-generation"
    assert "SFT policy" in card.text and str(sft_folder) in card.text and "reward model" in card.text
    # the usage snippet loads the adapter, on top of the SFT adapter it was trained on (merged first)
    assert "PeftModel.from_pretrained(model" in card.text
    assert f'PeftModel.from_pretrained(model, "{sft_folder.resolve()}").merge_and_unload()' in card.text
    config = yaml.safe_load(card.text.split("```yaml")[1].split("```")[0])
    assert config["total_episodes"] == 16 and config["rollout_batch_size"] == 8


def test_a_pushed_sft_folder_becomes_the_base_model_of_the_ppo_card(
    ppo_folder: Path, sft_folder: Path, hub_server: str, tmp_path: Path
) -> None:
    """The tiny base is local (no Hub id): once the SFT folder is pushed, the PPO card names that repo."""
    assert ModelCard.load(ppo_folder / "README.md").data.base_model is None
    try:
        assert push(sft_folder, hub_server, tmp_path, repo="someone/tiny-sft").returncode == 0
        assert push(ppo_folder, hub_server, tmp_path).returncode == 0
    finally:
        for folder in (sft_folder, ppo_folder):
            (folder / "hub.json").unlink(missing_ok=True)
    commits = [r for r in RecordingHub.requests if "/commit/" in r["path"]]
    card = ModelCard(committed_files(commits[-1])["README.md"].decode())
    assert card.data.base_model == "someone/tiny-sft" and "ppo" in card.data.tags
    assert ModelCard.load(ppo_folder / "README.md").data.base_model is None  # the local card is left as it was


def test_push_to_hub_in_a_stage_config(tiny_model_dir: Path, tiny_sft_file: Path, hub_server: str, tmp_path: Path):
    """`push_to_hub: true` + `hub_model_id`: the stage pushes its finished folder once, never its checkpoints."""
    out = tmp_path / "sft"
    stage = [
        sys.executable, str(REPO / "recipes/sft.py"), "--model_name_or_path", str(tiny_model_dir),
        "--dataset_name", str(tiny_sft_file), "--output_dir", str(out), "--max_steps", "2", "--save_steps", "1",
        "--per_device_train_batch_size", "4", "--use_cpu", "true", "--report_to", "none", "--push_to_hub", "true",
    ]  # fmt: skip
    bad = subprocess.run([*stage, "--hub_model_id", "no-owner"], capture_output=True, text=True,
                         env=hub_env(hub_server, tmp_path), timeout=300)  # fmt: skip
    assert bad.returncode != 0 and "hub_model_id: 'no-owner' is not a Hub repo id" in bad.stderr
    assert not out.exists() and not RecordingHub.requests  # refused before any training or upload
    run = subprocess.run([*stage, "--hub_model_id", "someone/tiny-sft"], capture_output=True, text=True,
                         env=hub_env(hub_server, tmp_path), timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert any(p.name.startswith("checkpoint-") for p in out.iterdir())
    commits = [r for r in RecordingHub.requests if "/commit/" in r["path"]]
    assert len(commits) == 1 and commits[0]["path"].startswith("/api/models/someone/tiny-sft/commit/")
    files = committed_files(commits[0])
    assert {"README.md", "model.safetensors", "config.json", "tokenizer.json"} <= set(files)
    assert not any(name.startswith("checkpoint-") or name.endswith((".bin", ".pt")) for name in files)
    assert json.loads((out / "hub.json").read_text())["repo_id"] == "someone/tiny-sft"
    assert TOKEN not in run.stdout + run.stderr


def test_card_carries_the_base_license_and_hub_id(tmp_path: Path) -> None:
    """A stage trained from a run folder takes the license and Hub base its card declares."""
    first, second = tmp_path / "sft", tmp_path / "ppo"
    first.mkdir(), second.mkdir()
    write_model_card(first, stage="sft", base_model="openai-community/gpt2", is_adapter=True, license="mit")
    write_model_card(second, stage="ppo", base_model=str(first), is_adapter=True)
    data = ModelCard.load(second / "README.md").data
    assert data.license == "mit" and data.base_model == "openai-community/gpt2"
    assert f"`{first}`" in (second / "README.md").read_text()  # the local lineage stays in the body


# --- merge, generate, chat ------------------------------------------------------------------------------


def test_merge_matches_base_plus_adapter(ppo_folder: Path, sft_folder: Path, tiny_model_dir: Path, tmp_path: Path):
    out = subprocess.run(
        [*CLI, "merge", str(ppo_folder), "--output", str(tmp_path / "merged")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    # base + adapters, unmerged: the tiny base, the SFT adapter, then the PPO adapter on top
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(ppo_folder)))
    ids = torch.tensor([tokenizer("Add 2 and 3.")["input_ids"]])

    def sft_model():
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        return PeftModel.from_pretrained(base, sft_folder).merge_and_unload().eval()

    stacked = PeftModel.from_pretrained(sft_model(), ppo_folder).eval()
    with torch.no_grad():
        logits = merged(ids).logits
        diff = (logits - stacked(ids).logits).abs().max().item()
        from_sft = (logits - sft_model()(ids).logits).abs().max().item()
    assert diff < 1e-4 and from_sft > 1e-6  # the PPO adapter is in the merged weights
    with pytest.raises(MergeError, match="holds a full model"):
        merge_run_folder(tmp_path / "merged", tmp_path / "again")


def test_merge_refuses_a_quantised_base(make_adapter_folder, tmp_path: Path) -> None:
    adapter = make_adapter_folder("q", seed=1, std=0.01)
    config = json.loads((adapter / "adapter_config.json").read_text())
    base = tmp_path / "base-4bit"
    base.mkdir()
    base_config = json.loads((Path(config["base_model_name_or_path"]) / "config.json").read_text())
    base_config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(base_config))
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    with pytest.raises(MergeError, match="stored quantised .*full-precision checkpoint"):
        merge_run_folder(adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_generate_writes_jsonl(ppo_folder: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Add 2 and 3.", "Repeat the word cat 2 times.")))
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "Add 2 and 3."}]}) + "\n")
    assert read_prompts(chats) == [[{"role": "user", "content": "Add 2 and 3."}]]
    out = subprocess.run(
        [*CLI, "generate", str(ppo_folder), "--input", str(prompts), "--output", str(tmp_path / "a.jsonl"),
         "--max-new-tokens", "8"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Add 2 and 3.", "Repeat the word cat 2 times."]
    assert all(isinstance(r["response"], str) and isinstance(r["ended_with_eos"], bool) for r in rows)


def _read_until(fd: int, marker: bytes, timeout: float = 60.0) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    assert marker in seen, seen.decode(errors="replace")[-2000:]
    return seen


def test_chat_answers_two_turns_in_a_terminal(ppo_folder: Path) -> None:
    """Driven through a pseudo-terminal, as a person would type; the second turn sees the first."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the chat command on the pty
        os.execvpe(
            sys.executable,
            [*CLI, "chat", str(ppo_folder), "--temperature", "0", "--max-new-tokens", "6"],
            {**os.environ, "TERM": "dumb"},
        )
    try:
        _read_until(fd, b"you> ")
        os.write(fd, b"Add 2 and 3.\n")
        first = _read_until(fd, b"you> ")
        os.write(fd, b"Repeat the word cat 2 times.\n")
        second = _read_until(fd, b"you> ")
        os.write(fd, b"/history\n")
        history = _read_until(fd, b"you> ")
        os.write(fd, b"/exit\n")
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert first.count(b"assistant> ") == 1 and second.count(b"assistant> ") == 1
    turns = [line for line in history.decode().splitlines() if line.startswith("[")]
    assert [t.split("]")[0] for t in turns] == ["[user", "[assistant", "[user", "[assistant"]
    assert turns[0] == "[user] Add 2 and 3." and turns[2] == "[user] Repeat the word cat 2 times."
    assert os.waitstatus_to_exitcode(status) == 0
