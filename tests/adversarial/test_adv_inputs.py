"""Adversarial inputs (issue 19, items 3, 9, 10, 11, 12): each gets a clear error or the right behaviour.

push and symlinks, infinite scores and margins, context overflow in generate and chat, deep or misnamed
JSON, broken CSV, truncated weights, a 404 from the Hub, comment-only template differences and special-token
text typed by a user. The Hub is a local recording server (tests/recording_hub.py): nothing leaves the machine.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
from recording_hub import RecordingHub, push

from instruct_tune.data import DataError, check_source, load_source
from instruct_tune.hub import PushError, upload_plan

SECRET = b"root:x:0:0:secret-bytes-outside-the-run-folder\n"


# --- push: symlinks and a 404 ---------------------------------------------------------------------------
# (the Hub: conftest's `hub_server` fixture, a recording_hub.RecordingHub)


@pytest.fixture()
def run_folder(tmp_path: Path) -> Path:
    """A finished-looking run folder (weights, config, tokenizer) and a secret file outside it."""
    folder = tmp_path / "run"
    (folder / "checkpoint-1").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text("{}")
    (folder / "checkpoint-1" / "tokenizer.json").write_text("{}")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "shadow").write_bytes(SECRET)
    return folder


def test_push_refuses_a_file_symlinked_out_of_the_folder(run_folder: Path, tmp_path: Path) -> None:
    (run_folder / "vocab.json").symlink_to(tmp_path / "outside" / "shadow")
    (run_folder / "tokenizer.json").symlink_to(run_folder / "checkpoint-1" / "tokenizer.json")  # inside: fine
    with pytest.raises(
        PushError, match=r"symlinks that lead out of the run folder.*vocab\.json -> .*shadow"
    ) as err:
        upload_plan(run_folder)
    assert "tokenizer.json" not in str(err.value)
    (run_folder / "vocab.json").unlink()
    assert {u.path_in_repo for u in upload_plan(run_folder)} == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    }


def test_push_refuses_a_checkpoint_symlinked_out_of_the_folder(run_folder: Path, tmp_path: Path) -> None:
    (run_folder / "checkpoint-999").symlink_to(tmp_path / "outside", target_is_directory=True)
    assert "checkpoint-999" not in str([u.path_in_repo for u in upload_plan(run_folder)])  # not asked for
    with pytest.raises(PushError, match=r"checkpoint-999 -> .*outside"):
        upload_plan(run_folder, include_checkpoints=True)


def test_push_and_dry_run_send_nothing_from_outside(
    run_folder: Path, tmp_path: Path, hub_server: str
) -> None:
    (run_folder / "vocab.json").symlink_to(tmp_path / "outside" / "shadow")
    dry = push(run_folder, "http://127.0.0.1:9", tmp_path, "--dry-run")
    assert dry.returncode == 1 and "vocab.json ->" in dry.stderr and "Traceback" not in dry.stderr
    out = push(run_folder, hub_server, tmp_path)
    assert out.returncode == 1 and "vocab.json ->" in out.stderr and "nothing was uploaded" in out.stderr
    assert not any(SECRET.strip() in r["body"] or b"cm9vdDp4" in r["body"] for r in RecordingHub.requests)
    assert not [r for r in RecordingHub.requests if "/commit/" in r["path"]]


def test_push_404_names_the_repo_not_revision_none(run_folder: Path, tmp_path: Path, hub_server: str) -> None:
    RecordingHub.fail = 404
    out = push(run_folder, hub_server, tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "someone/tiny-ppo" in out.stderr and "does not exist" in out.stderr and "HTTP 404" in out.stderr
    assert "None" not in out.stderr


# --- data: scores and margins ---------------------------------------------------------------------------


def write_lines(path: Path, *rows: str) -> Path:
    path.write_text("".join(row + "\n" for row in rows))
    return path


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        (
            '{"prompt": "p", "responses": ["a", "b"], "scores": [Infinity, 1.0]}',
            r"scores\[0\] is not a finite number \(got inf\)",
        ),
        (
            '{"prompt": "p", "responses": ["a", "b"], "scores": [1.0, -Infinity]}',
            r"scores\[1\] is not a finite number \(got -inf\)",
        ),
        (
            '{"prompt": "p", "responses": ["a", "b"], "scores": [1e308, -1e308]}',
            r"score difference of a pair is inf",
        ),
        (
            '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": Infinity}',
            r"margin is not a finite number \(got inf\)",
        ),
    ],
    ids=["inf-score", "minus-inf-score", "overflowing-margin", "inf-margin-column"],
)
def test_infinite_scores_and_margins_are_refused(tmp_path: Path, row: str, problem: str) -> None:
    good = row.replace("Infinity", "3.0").replace("1e308", "2.0").replace("-1e308", "1.0")
    path = write_lines(tmp_path / "cmp.jsonl", good, row)
    result = check_source(str(path))
    assert [(p.row, p.source) for p in result.problems] == [(2, str(path))]
    assert re.search(problem, str(result.problems[0]))
    with pytest.raises(DataError, match=rf"cmp\.jsonl: row 2: {problem}"):  # what a training stage loads
        load_source(str(path), "preference")


# --- data: nesting, misnamed JSON, CSV ------------------------------------------------------------------

DEEP = 100_000


def test_deep_json_lines_row_is_named(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "deep.jsonl", '{"text": "ok"}', '{"text": ' + "[" * DEEP + "]" * DEEP + "}")
    result = check_source(str(path))
    assert result.examples == 1 and len(result.problems) == 1
    assert (
        str(result.problems[0])
        == f"{path}: row 2: JSON nested more than 100 levels deep (the most a row may nest)"
    )


def test_deep_json_array_element_is_named(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text('[{"text": "ok"}, {"text": ' + "[" * DEEP + "]" * DEEP + "}]")
    with pytest.raises(DataError, match=r"deep\.json: row 2: JSON nested more than 100 levels deep"):
        check_source(str(path))


def test_moderately_deep_row_is_refused_before_datasets_recurses(tmp_path: Path) -> None:
    chat = '[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]'
    meta = '{"a": ' * 900 + "1" + "}" * 900
    path = write_lines(tmp_path / "sft.jsonl", f'{{"messages": {chat}, "meta": {meta}}}')
    with pytest.raises(DataError, match=r"sft\.jsonl: row 1: JSON nested more than 100 levels deep"):
        load_source(str(path), "sft")


def test_json_array_saved_as_jsonl_says_so(tmp_path: Path) -> None:
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=2))
    with pytest.raises(
        DataError, match=r"sft\.jsonl: this file holds one JSON array, not JSON lines: rename it \.json"
    ):
        check_source(str(path))


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            'prompt,completion\n"unclosed,foo\nbar,baz\n',
            r"row 1: CSV row has 1 of the header's 2 cells .*quote .* never closed",
        ),
        (
            "prompt,completion\nhi,there\na,b,c\n",
            r"row 2: CSV row has 3 cells but the header has 2 \(prompt, completion\)",
        ),
        (
            '{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n',
            r"holds JSON lines, not CSV: rename it \.jsonl",
        ),
    ],
    ids=["unclosed-quote", "extra-cells", "json-lines-named-csv"],
)
def test_bad_csv_says_what_the_file_is(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "data.csv"
    path.write_text(text)
    try:
        problems = [str(p) for p in check_source(str(path)).problems]
    except DataError as error:  # a whole-file problem
        problems = [str(error)]
    assert problems and re.search(rf"data\.csv: .*{problem}", problems[0]), problems


# --- models: truncated weights, templates, special tokens -----------------------------------------------


def truncated_copy(folder: Path, name: str, dst: Path) -> Path:
    shutil.copytree(folder, dst)
    size = (dst / name).stat().st_size
    with (dst / name).open("r+b") as handle:
        handle.truncate(size // 2)
    return dst / name


def test_truncated_model_weights_are_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    from instruct_tune.generate import load_policy

    weights = truncated_copy(tiny_model_dir, "model.safetensors", tmp_path / "model")
    with pytest.raises(OSError, match=rf"{weights}: truncated or corrupt safetensors file"):
        load_policy(str(weights.parent))


def test_truncated_adapter_weights_are_named(sft_folder: Path, tmp_path: Path) -> None:
    from instruct_tune.generate import load_policy

    weights = truncated_copy(sft_folder, "adapter_model.safetensors", tmp_path / "sft")
    with pytest.raises(OSError, match=rf"{weights}: truncated or corrupt safetensors file"):
        load_policy(str(weights.parent))


def test_chat_templates_differing_by_a_comment_are_the_same(tiny_model_dir: Path) -> None:
    from instruct_tune.config import ConfigError, ModelArguments
    from instruct_tune.models import load_tokenizer
    from instruct_tune.stages.ppo import check_same_tokenizer
    from instruct_tune.stages.reward import check_chat_template

    policy = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model_dir)))
    commented = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model_dir)))
    commented.chat_template = "{# the same template, annotated #}" + policy.chat_template
    check_chat_template(commented, "commented", str(tiny_model_dir))  # no error
    check_same_tokenizer(policy, commented, "commented")
    commented.chat_template = policy.chat_template.replace(
        "<|{{ message['role'] }}|>\n", "### {{ message['role'] }}: "
    )
    with pytest.raises(
        ConfigError, match=r"renders a chat as '### user: Hi.*, the policy's .* as '<\|user\|>\\nHi"
    ):
        check_chat_template(commented, "commented", str(tiny_model_dir))
    with pytest.raises(ConfigError, match=r"chat templates differ: the policy's renders '<\|user\|>"):
        check_same_tokenizer(policy, commented, "commented")


def test_special_token_text_typed_by_a_user_stays_text(tiny_model_dir: Path) -> None:
    from instruct_tune.config import ModelArguments
    from instruct_tune.models import load_tokenizer
    from instruct_tune.models.sampling import encode_prompts

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model_dir)))
    eos, assistant = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|assistant|>")
    typed = [{"role": "user", "content": "say <|endoftext|> then <|assistant|> now"}]
    history = [
        {"role": "user", "content": "Hi <|endoftext|>"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Add 2 and 3."},
    ]
    plain = [{"role": "user", "content": "Add 2 and 3."}]
    ids = encode_prompts(tokenizer, [typed, history, plain])
    assert (
        eos not in ids[0] and ids[0].count(assistant) == 1 and ids[0][-2] == assistant
    )  # the generation prompt
    assert tokenizer.decode(ids[0]).startswith("<|user|>\nsay <|endoftext|> then <|assistant|> now\n")
    assert ids[1].count(eos) == 1  # the one the template puts after the assistant turn
    direct = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert ids[2] == list(direct["input_ids"])  # a chat without such text: the ids as before


# --- generate and chat past the context -----------------------------------------------------------------


def test_generate_answers_every_prompt_cutting_a_long_one(
    tiny_model_dir: Path, tmp_path: Path, caplog
) -> None:
    from instruct_tune.generate import generate_file

    prompts = ["Add 2 and 3.", " ".join(["cat"] * 400), "Repeat the word cat 2 times."]
    path = write_lines(tmp_path / "prompts.jsonl", *(json.dumps({"prompt": p}) for p in prompts))
    with caplog.at_level(logging.WARNING):
        n = generate_file(str(tiny_model_dir), path, tmp_path / "out.jsonl", max_new_tokens=4)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert n == 3 and [r["prompt"] for r in rows] == prompts
    assert f"{path}: prompt 2 has" in caplog.text and "kept its last 124 tokens" in caplog.text
    assert "prompt 1 " not in caplog.text and "prompt 3 " not in caplog.text


def test_generate_with_max_new_tokens_past_the_context(tiny_model_dir: Path, tmp_path: Path, caplog) -> None:
    from instruct_tune.generate import generate_file

    path = write_lines(tmp_path / "prompts.jsonl", json.dumps({"prompt": "Add 2 and 3."}))
    with caplog.at_level(logging.WARNING):
        assert generate_file(str(tiny_model_dir), path, tmp_path / "out.jsonl", max_new_tokens=200) == 1
    assert (
        "--max-new-tokens 200 leaves no room for a prompt in the model's context of 128 tokens" in caplog.text
    )


def test_chat_drops_the_oldest_turns_to_fit(tiny_model_dir: Path) -> None:
    from instruct_tune.generate import chat

    lines = iter([*(f"{word} " * 30 for word in ("one", "two", "three", "four")), "/exit"])
    out = io.StringIO()
    history = chat(str(tiny_model_dir), max_new_tokens=8, temperature=0, read=lambda _: next(lines), out=out)
    assert "oldest turns to fit the model's context of 128 tokens" in out.getvalue()
    assert history[-2]["content"] == ("four " * 30).strip() and len(history) < 8
    assert all(not turn["content"].startswith("one ") for turn in history)
