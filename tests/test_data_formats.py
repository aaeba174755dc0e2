"""Format detection and conversion of every supported input format.

File types, source kinds, mixtures and train/eval splits: `test_data_sources.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pytest

from instruct_tune.data import detect_format, load_source


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def rows_of(ds: datasets.Dataset) -> list[dict[str, Any]]:
    return [dict(r) for r in ds]


# --- detection -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("columns", "first_row", "expected"),
    [
        (["messages"], {}, "messages"),
        (["prompt", "completion"], {}, "prompt_completion"),
        (["instruction", "input", "output"], {}, "alpaca"),
        (["instruction", "output"], {}, "alpaca"),
        (["conversations"], {}, "sharegpt"),
        (["prompt", "chosen", "rejected"], {}, "preference"),
        (["chosen", "rejected"], {"chosen": [user("q"), assistant("a")]}, "preference"),
        (["chosen", "rejected"], {"chosen": "\n\nHuman: hi\n\nAssistant: yo"}, "hh_rlhf"),
        (["conversations", "chosen", "rejected"], {}, "sharegpt_preference"),
        (["prompt", "responses", "ranking"], {}, "ranking"),
        (["prompt", "responses", "scores"], {}, "ranking"),
        (["prompt"], {}, "prompt_only"),
        (["prompt", "task"], {}, "prompt_only"),
        (["text"], {}, "text"),
        # UltraFeedback-style sets carry both a preference pair and a messages column.
        (["prompt", "chosen", "rejected", "messages"], {}, "preference"),
    ],
)
def test_detect_format(columns: list[str], first_row: dict[str, Any], expected: str) -> None:
    assert detect_format(columns, first_row) == expected


def test_detect_format_prefers_a_format_usable_as_the_kind() -> None:
    columns = ["prompt", "chosen", "rejected", "messages"]
    assert detect_format(columns, {}, kind="sft") == "messages"
    assert detect_format(columns, {}, kind="preference") == "preference"
    assert detect_format(columns, {}, kind="prompts") == "preference"


# --- sft formats -----------------------------------------------------------------------------------------


def test_messages(tmp_path: Path) -> None:
    conv = [system("be brief"), user("hi"), assistant("hello"), user("2+2?"), assistant("4")]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conv, "id": 7}])
    ds, report = load_source(path, "sft")
    assert report.format == "messages"
    assert rows_of(ds) == [{"messages": conv, "id": 7, "task": "chat"}]


def test_messages_drops_empty_system_and_extra_message_keys(tmp_path: Path) -> None:
    conv = [
        {"role": "system", "content": ""},
        {"role": "user", "content": "hi", "name": "x"},
        assistant("yo"),
    ]
    ds, _ = load_source(write_jsonl(tmp_path / "c.jsonl", [{"messages": conv}]), "sft")
    assert ds[0]["messages"] == [user("hi"), assistant("yo")]


def test_prompt_completion_strings(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Say hi", "completion": "hi"}])
    ds, report = load_source(path, "sft")
    assert report.format == "prompt_completion"
    assert rows_of(ds) == [{"messages": [user("Say hi"), assistant("hi")], "task": "pc"}]


def test_prompt_completion_messages(tmp_path: Path) -> None:
    row = {"prompt": [system("s"), user("q")], "completion": [assistant("a")]}
    ds, report = load_source(write_jsonl(tmp_path / "pc.jsonl", [row]), "sft")
    assert report.format == "prompt_completion"
    assert ds[0]["messages"] == [system("s"), user("q"), assistant("a")]


def test_alpaca(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        {"instruction": "Name a colour.", "input": "", "output": "red"},
        {"instruction": "Name a fruit.", "output": "apple"},
    ]
    ds, report = load_source(write_jsonl(tmp_path / "alpaca.jsonl", rows), "sft")
    assert report.format == "alpaca"
    assert (report.rows_in, report.rows_out, report.skipped) == (3, 3, 0)
    assert [r["messages"] for r in ds] == [
        [user("Translate to French.\n\ncat"), assistant("chat")],
        [user("Name a colour."), assistant("red")],
        [user("Name a fruit."), assistant("apple")],
    ]
    assert report.summary() == f"{tmp_path / 'alpaca.jsonl'}: format=alpaca rows=3 kept=3 skipped=0"


def test_alpaca_with_system_and_history(tmp_path: Path) -> None:
    row = {
        "instruction": "And 3+3?",
        "input": "",
        "output": "6",
        "system": "math",
        "history": [["2+2?", "4"]],
    }
    ds, _ = load_source(write_jsonl(tmp_path / "a.jsonl", [row]), "sft")
    assert ds[0]["messages"] == [
        system("math"),
        user("2+2?"),
        assistant("4"),
        user("And 3+3?"),
        assistant("6"),
    ]


def test_sharegpt(tmp_path: Path) -> None:
    conv = [
        {"from": "system", "value": "sys"},
        {"from": "human", "value": "hi"},
        {"from": "gpt", "value": "hello"},
        {"from": "user", "value": "more"},
        {"from": "model", "value": "sure"},
    ]
    ds, report = load_source(write_jsonl(tmp_path / "sg.jsonl", [{"conversations": conv}]), "sft")
    assert report.format == "sharegpt"
    assert ds[0]["messages"] == [
        system("sys"),
        user("hi"),
        assistant("hello"),
        user("more"),
        assistant("sure"),
    ]


# --- preference formats ----------------------------------------------------------------------------------


def test_preference_strings_with_prompt(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "good", "rejected": "bad", "task": "t"}]
    )
    ds, report = load_source(path, "preference")
    assert report.format == "preference"
    assert rows_of(ds) == [
        {
            "prompt": [user("q")],
            "chosen": [assistant("good")],
            "rejected": [assistant("bad")],
            "group_id": 1,
            "task": "t",
        }
    ]


def test_preference_messages_with_implicit_prompt(tmp_path: Path) -> None:
    row = {
        "chosen": [user("q1"), assistant("a1"), user("q2"), assistant("good")],
        "rejected": [user("q1"), assistant("a1"), user("q2"), assistant("bad")],
    }
    ds, report = load_source(write_jsonl(tmp_path / "p.jsonl", [row]), "preference")
    assert report.format == "preference"
    assert ds[0]["prompt"] == [user("q1"), assistant("a1"), user("q2")]
    assert (ds[0]["chosen"], ds[0]["rejected"]) == ([assistant("good")], [assistant("bad")])


def test_preference_prompt_repeated_in_conversations(tmp_path: Path) -> None:
    # UltraFeedback binarized: a prompt string and chosen/rejected as full conversations.
    row = {
        "prompt": "q",
        "chosen": [user("q"), assistant("good")],
        "rejected": [user("q"), assistant("bad")],
        "messages": [user("q"), assistant("good")],
    }
    ds, _ = load_source(write_jsonl(tmp_path / "uf.jsonl", [row]), "preference")
    assert ds[0]["prompt"] == [user("q")]
    assert ds[0]["chosen"] == [assistant("good")]
    sft, report = load_source(str(tmp_path / "uf.jsonl"), "sft")
    assert report.format == "messages"
    assert sft[0]["messages"] == [user("q"), assistant("good")]


def test_hh_rlhf(tmp_path: Path) -> None:
    row = {
        "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke"
        "\n\nAssistant: Knock knock.",
        "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: No.",
    }
    ds, report = load_source(write_jsonl(tmp_path / "hh.jsonl", [row]), "preference")
    assert report.format == "hh_rlhf"
    assert rows_of(ds) == [
        {
            "prompt": [user("Hi there"), assistant("Hello!"), user("Tell me a joke")],
            "chosen": [assistant("Knock knock.")],
            "rejected": [assistant("No.")],
            "group_id": 1,
            "task": "hh",
        }
    ]


def test_sharegpt_preference(tmp_path: Path) -> None:
    row = {
        "conversations": [{"from": "human", "value": "q"}],
        "chosen": {"from": "gpt", "value": "good"},
        "rejected": {"from": "gpt", "value": "bad"},
    }
    ds, report = load_source(write_jsonl(tmp_path / "sgp.jsonl", [row]), "preference")
    assert report.format == "sharegpt_preference"
    assert (ds[0]["prompt"], ds[0]["chosen"], ds[0]["rejected"]) == (
        [user("q")],
        [assistant("good")],
        [assistant("bad")],
    )


def test_ranking_expands_to_all_pairs(tmp_path: Path) -> None:
    rows = [
        {"prompt": "first", "responses": ["x", "y"], "ranking": [1, 0]},
        {"prompt": "q", "responses": ["r0", "r1", "r2", "r3"], "ranking": [2, 0, 3, 1], "task": "sort"},
    ]
    ds, report = load_source(write_jsonl(tmp_path / "rank.jsonl", rows), "preference")
    assert report.format == "ranking"
    assert (report.rows_in, report.rows_out) == (2, 7)
    assert "examples=7" in report.summary()
    pairs = [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in ds if r["group_id"] == 2]
    # Ranking best-first is r2 > r0 > r3 > r1: all K(K-1)/2 = 6 (better, worse) pairs.
    assert pairs == [("r2", "r0"), ("r2", "r3"), ("r2", "r1"), ("r0", "r3"), ("r0", "r1"), ("r3", "r1")]
    assert {r["group_id"] for r in ds} == {1, 2}
    assert all(r["prompt"] == [user("q")] and r["task"] == "sort" for r in ds if r["group_id"] == 2)
    assert ds[0] == {
        "prompt": [user("first")],
        "chosen": [assistant("y")],
        "rejected": [assistant("x")],
        "group_id": 1,
        "task": "rank",
    }


def test_ranking_by_scores(tmp_path: Path) -> None:
    row = {"prompt": [user("q")], "responses": ["a", "b", "c", "d"], "scores": [0.5, 3, -1, 2.0]}
    ds, report = load_source(write_jsonl(tmp_path / "scores.jsonl", [row]), "preference")
    assert report.format == "ranking"
    pairs = [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in ds]
    assert pairs == [("b", "d"), ("b", "a"), ("b", "c"), ("d", "a"), ("d", "c"), ("a", "c")]
    assert {r["group_id"] for r in ds} == {1}


# --- prompts and text ----------------------------------------------------------------------------------


def test_prompt_only(tmp_path: Path) -> None:
    rows = [{"prompt": "q1", "task": "a"}, {"prompt": [system("s"), user("q2")], "task": "b"}]
    ds, report = load_source(write_jsonl(tmp_path / "prompts.jsonl", rows), "prompts")
    assert report.format == "prompt_only"
    assert rows_of(ds) == [
        {"prompt": [user("q1")], "task": "a"},
        {"prompt": [system("s"), user("q2")], "task": "b"},
    ]


@pytest.mark.parametrize(
    ("row", "fmt", "prompt"),
    [
        (
            {"messages": [user("q"), assistant("a"), user("q2"), assistant("a2")]},
            "messages",
            [user("q"), assistant("a"), user("q2")],
        ),
        ({"prompt": "q", "completion": "a"}, "prompt_completion", [user("q")]),
        ({"instruction": "i", "input": "x", "output": "o"}, "alpaca", [user("i\n\nx")]),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
            "sharegpt",
            [user("q")],
        ),
        ({"prompt": "q", "chosen": "a", "rejected": "b"}, "preference", [user("q")]),
        (
            {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant:"},
            "hh_rlhf",
            [user("q")],
        ),
        ({"prompt": "q", "responses": ["a", "b", "c"], "ranking": [2, 1, 0]}, "ranking", [user("q")]),
    ],
)
def test_prompts_from_other_formats(tmp_path: Path, row: dict[str, Any], fmt: str, prompt: list[Any]) -> None:
    ds, report = load_source(write_jsonl(tmp_path / "x.jsonl", [row]), "prompts")
    assert report.format == fmt
    assert rows_of(ds) == [{"prompt": prompt, "task": "x"}]


def test_text(tmp_path: Path) -> None:
    ds, report = load_source(
        write_jsonl(tmp_path / "pretrain.jsonl", [{"text": "a b c"}, {"text": "d"}]), "text"
    )
    assert report.format == "text"
    assert rows_of(ds) == [{"text": "a b c", "task": "pretrain"}, {"text": "d", "task": "pretrain"}]
