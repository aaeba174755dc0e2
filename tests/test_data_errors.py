"""Bad input: every case gets a DataError naming the source, the row and the problem."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any

import datasets
import pytest

from instruct_tune.data import DataError, load_source


def write_jsonl(path: Path, rows: list[Any]) -> str:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return str(path)


GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def chat(*turns: tuple[str, Any]) -> dict[str, Any]:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def load_error(tmp_path: Path, bad_row: Any, kind: str, good_row: Any = GOOD_CHAT) -> str:
    """Message of the DataError for a file whose row 2 is ``bad_row`` (row 1 is fine)."""
    path = write_jsonl(tmp_path / "bad.jsonl", [good_row, bad_row])
    with pytest.raises(DataError) as info:
        load_source(path, kind)  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith(f"{path}: row 2: "), message
    assert info.value.row == 2
    return message.split(": row 2: ", 1)[1]


# --- sft -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_row", "expected"),
    [
        (chat(("user", "hi"), ("assistant", "   ")), "empty assistant response"),
        (chat(("user", "hi"), ("assistant", "")), "empty assistant response"),
        (
            chat(("user", "hi"), ("assistant", ""), ("user", "?"), ("assistant", "ok")),
            "empty assistant message (messages turn 2)",
        ),
        (chat(("user", " "), ("assistant", "a")), "empty user message (messages turn 1)"),
        (
            chat(("assistant", "hi"), ("user", "q"), ("assistant", "a")),
            "roles out of order: messages turn 1 is an assistant turn before any user turn",
        ),
        (
            chat(("user", "a"), ("user", "b"), ("assistant", "c")),
            "roles out of order: messages turns 1 and 2 are both user turns",
        ),
        (
            chat(("user", "a"), ("assistant", "b"), ("assistant", "c")),
            "roles out of order: messages turns 2 and 3 are both assistant turns",
        ),
        (
            chat(("user", "a"), ("system", "b"), ("assistant", "c")),
            "roles out of order: messages turn 2 is a system message (only allowed first)",
        ),
        (
            chat(("user", "a"), ("bot", "b")),
            "unknown role 'bot' in messages turn 2 (expected one of assistant, developer, system, user)",
        ),
        (
            chat(("user", "a"), ("assistant", "b"), ("user", "c")),
            "no assistant response: the last turn of messages has role 'user'",
        ),
        (chat(("user", "a"), ("assistant", 42)), "messages turn 2 content is not a string (got int)"),
        (chat(("user", None), ("assistant", "b")), "messages turn 1 content is not a string (got null)"),
        ({"messages": "hi"}, "messages is not a list of messages (got string)"),
        ({"messages": []}, "messages is empty"),
        ({"messages": [{"role": "user"}]}, "messages turn 1 has no 'content'"),
    ],
)
def test_sft_messages_errors(tmp_path: Path, bad_row: Any, expected: str) -> None:
    assert load_error(tmp_path, bad_row, "sft") == expected


def test_alpaca_errors(tmp_path: Path) -> None:
    good = {"instruction": "i", "input": "", "output": "o"}
    assert (
        load_error(tmp_path, {"instruction": "i", "output": "  "}, "sft", good) == "empty assistant response"
    )
    assert (
        load_error(tmp_path, {"instruction": "i", "output": 5}, "sft", good)
        == "output is not a string (got int)"
    )
    assert load_error(tmp_path, {"instruction": "i"}, "sft", good) == "missing column 'output'"
    # a history that is no list was a raw TypeError from inside the parser
    assert (
        load_error(tmp_path, {"instruction": "i", "output": "o", "history": 5}, "sft", good)
        == "history is int, expected a list of [instruction, response] pairs"
    )


def test_sharegpt_unknown_role(tmp_path: Path) -> None:
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    bad = {"conversations": [{"from": "human", "value": "q"}, {"from": "observation", "value": "a"}]}
    assert load_error(tmp_path, bad, "sft", good).startswith(
        "unknown role 'observation' in conversations turn 2"
    )


# --- preference ----------------------------------------------------------------------------------------

PAIR = {"prompt": "q", "chosen": "good", "rejected": "bad"}


@pytest.mark.parametrize(
    ("bad_row", "expected"),
    [
        (PAIR | {"chosen": ""}, "empty chosen response"),
        (PAIR | {"rejected": " \n"}, "empty rejected response"),
        (PAIR | {"rejected": "good"}, "chosen and rejected responses are identical"),
        (PAIR | {"prompt": 3}, "prompt is not a string or a list of messages (got int)"),
        (PAIR | {"chosen": None}, "chosen is not a list of messages (got null)"),
        (PAIR | {"prompt": ""}, "empty user message (prompt turn 1)"),
    ],
)
def test_preference_errors(tmp_path: Path, bad_row: Any, expected: str) -> None:
    assert load_error(tmp_path, bad_row, "preference", PAIR) == expected


def test_preference_implicit_prompt_mismatch(tmp_path: Path) -> None:
    good = {
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
    }
    bad = good | {"rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}
    assert load_error(tmp_path, bad, "preference", good) == "chosen and rejected do not share the same prompt"


HH = {"chosen": "\n\nHuman: q\n\nAssistant: yes", "rejected": "\n\nHuman: q\n\nAssistant: no"}


@pytest.mark.parametrize(
    ("bad_row", "expected"),
    [
        # Anthropic's HH-RLHF test split really has rows whose final Assistant turn is empty.
        (HH | {"chosen": "\n\nHuman: q\n\nAssistant:"}, "empty chosen response"),
        (HH | {"rejected": "\n\nHuman: q\n\nAssistant:   "}, "empty rejected response"),
        (
            HH | {"rejected": "\n\nHuman: other\n\nAssistant: no"},
            "chosen and rejected do not share the same prompt",
        ),
        (
            HH | {"chosen": "\n\nHuman: q\n\nAssistant: a\n\nHuman: more?"},
            "chosen does not end with an Assistant turn",
        ),
        (
            {
                "chosen": "\n\nAssistant: a\n\nHuman: q\n\nAssistant: yes",
                "rejected": "\n\nAssistant: a\n\nHuman: q\n\nAssistant: no",
            },
            "roles out of order: prompt turn 1 is an assistant turn before any user turn",
        ),
    ],
)
def test_hh_errors(tmp_path: Path, bad_row: Any, expected: str) -> None:
    assert load_error(tmp_path, bad_row, "preference", HH) == expected


def test_sharegpt_preference_errors(tmp_path: Path) -> None:
    good = {
        "conversations": [{"from": "human", "value": "q"}],
        "chosen": {"from": "gpt", "value": "a"},
        "rejected": {"from": "gpt", "value": "b"},
    }
    assert load_error(tmp_path, good | {"chosen": {"from": "gpt", "value": "b"}}, "preference", good) == (
        "chosen and rejected responses are identical"
    )
    assert load_error(tmp_path, good | {"rejected": {"from": "human", "value": "b"}}, "preference", good) == (
        "rejected is a user turn, not an assistant turn"
    )


RANK = {"prompt": "q", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]}
SCORED = {"prompt": "q", "responses": ["a", "b", "c"], "scores": [1.0, 3.0, 2.0]}


@pytest.mark.parametrize(
    ("good", "bad_row", "expected"),
    [
        (
            RANK,
            RANK | {"ranking": [0, 0, 1]},
            "ranking [0, 0, 1] is not a permutation of the response indices 0..2",
        ),
        (
            RANK,
            RANK | {"ranking": [1, 2, 3]},
            "ranking [1, 2, 3] is not a permutation of the response indices 0..2",
        ),
        (
            RANK,
            RANK | {"ranking": [0, 1]},
            "ranking [0, 1] is not a permutation of the response indices 0..2",
        ),
        (RANK, RANK | {"responses": ["a"], "ranking": [0]}, "fewer than 2 responses (got 1)"),
        (
            RANK,
            RANK | {"responses": ["a", "b", "a"]},
            "duplicate responses: responses[0] and responses[2] are identical",
        ),
        (RANK, RANK | {"responses": ["a", "", "c"]}, "empty response (responses[1])"),
        (RANK, RANK | {"responses": ["a", 1, "c"]}, "responses[1] is not a string (got int)"),
        (
            RANK,
            RANK | {"responses": [str(i) for i in range(10)], "ranking": list(range(10))},
            "too many responses (got 10, at most 9)",
        ),
        (
            SCORED,
            SCORED | {"scores": [1.0, 2.0, 1.0]},
            "tied scores: responses[0] and responses[2] both score 1.0 (a ranking needs a strict order)",
        ),
        (
            SCORED,
            SCORED | {"scores": [1.0, 2.0]},
            "scores must be a list of 3 numbers, one per response (got 2)",
        ),
        (SCORED, SCORED | {"scores": [1.0, "high", 2.0]}, "scores[1] is not a number (got string)"),
        (SCORED, SCORED | {"scores": None}, "missing ranking: neither 'ranking' nor 'scores' is set"),
    ],
)
def test_ranking_errors(tmp_path: Path, good: Any, bad_row: Any, expected: str) -> None:
    assert load_error(tmp_path, bad_row, "preference", good) == expected


# --- prompts and text ----------------------------------------------------------------------------------


def test_prompt_and_text_errors(tmp_path: Path) -> None:
    good = {"prompt": "q"}
    assert load_error(tmp_path, {"prompt": None}, "prompts", good) == (
        "prompt is not a string or a list of messages (got null)"
    )
    bad = {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert (
        load_error(tmp_path, bad, "prompts", good)
        == "prompt must end with a user turn (its last turn has role 'assistant')"
    )
    assert load_error(tmp_path, {"text": ""}, "text", {"text": "t"}) == "empty text"
    assert load_error(tmp_path, {"text": None}, "text", {"text": "t"}) == "text is not a string (got null)"


# --- file-level problems -------------------------------------------------------------------------------


def test_malformed_json_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD_CHAT, "", '{"messages": [', GOOD_CHAT])
    with pytest.raises(
        DataError, match=r"x\.jsonl: row 3: malformed JSON \(Expecting value: line 1 column 15"
    ):
        load_source(path, "sft")


def test_row_that_is_not_an_object(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD_CHAT, "[1, 2]"])
    with pytest.raises(DataError, match=r"x\.jsonl: row 2: row is not a JSON object \(got list\)"):
        load_source(path, "sft")


def test_malformed_json_list(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(DataError, match=r"x\.json: malformed JSON \(Expecting value: line 2 column 11"):
        load_source(str(path), "text")


def test_missing_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"instruction": "i", "input": "x"}])
    with pytest.raises(DataError) as info:
        load_source(path, "sft")
    assert str(info.value) == (
        f"{path}: missing column: sft data needs columns messages | prompt + completion | "
        "instruction + output (+ input) | conversations; found columns: instruction, input"
    )


def test_string_pairs_without_prompt_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"chosen": "a", "rejected": "b"}])
    with pytest.raises(
        DataError, match=r"x\.jsonl: missing column: chosen/rejected are plain strings, so a 'prompt'"
    ):
        load_source(path, "preference")


def test_preference_data_refused_for_sft(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [PAIR])
    with pytest.raises(DataError) as info:
        load_source(path, "sft")
    assert str(info.value).startswith(
        f"{path}: format 'preference' (preference data) cannot be used as sft data, "
        "which needs columns messages"
    )
    assert str(info.value).endswith("found columns: prompt, chosen, rejected")


def test_file_not_found_is_not_a_hub_call(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_hub(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("must not reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    for path in ("./x.jsonl", "data/x.jsonl", "/abs/x.parquet", "a/b/c"):
        with pytest.raises(DataError, match=rf"^{path}: file not found$"):
            load_source(path, "sft")


def test_hub_failure_is_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        DataError, match=r"^org/ds: cannot load from the Hugging Face Hub \(ConnectionError: offline\)"
    ):
        load_source("org/ds", "sft")


def test_unsupported_and_empty_files(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match=r"x\.txt: unsupported file type '\.txt'"):
        load_source(str(tmp_path / "x.txt"), "text")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows$"):
        load_source(str(tmp_path / "empty.jsonl"), "text")


# --- skip_invalid --------------------------------------------------------------------------------------


def test_skip_invalid_drops_and_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [
        {"instruction": "a", "output": "1"},
        {"instruction": "b", "output": ""},
        "{not json",
        {"instruction": "c", "output": "3"},
        {"instruction": 4, "output": "4"},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="instruct_tune.data"):
        ds, report = load_source(path, "sft", skip_invalid=True)
    assert len(ds) == report.rows_out == 2
    assert (report.rows_in, report.skipped, len(report.problems)) == (5, 3, 3)
    assert [(p.row, p.problem.split(" (")[0]) for p in report.problems] == [
        (2, "empty assistant response"),
        (3, "malformed JSON"),
        (5, "instruction is not a string"),
    ]
    assert report.summary() == f"{path}: format=alpaca rows=5 kept=2 skipped=3"
    assert report.summary() in caplog.text
    assert f"skipped {path}: row 2: empty assistant response" in caplog.text


def test_skip_invalid_with_nothing_left(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": ""}, {"text": " "}])
    with pytest.raises(
        DataError, match=r"no valid rows: all 2 rows have problems \(first: .*row 1: empty text\)"
    ):
        load_source(path, "text", skip_invalid=True)


def test_data_error_pickles() -> None:
    error = pickle.loads(pickle.dumps(DataError("x.jsonl", "empty text", row=3)))
    assert (str(error), error.source, error.row, error.problem) == (
        "x.jsonl: row 3: empty text",
        "x.jsonl",
        3,
        "empty text",
    )
