"""`instruct-tune data check`: format and row count for good files, every problem for bad ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pytest

from instruct_tune.data import check_source, format_check
from instruct_tune.data.check import main


def write_jsonl(path: Path, rows: list[Any]) -> str:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return str(path)


def msgs(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in turns]


SAMPLES: dict[str, tuple[dict[str, Any], str]] = {
    "messages": ({"messages": msgs(("user", "q"), ("assistant", "a"))}, "sft"),
    "prompt_completion": ({"prompt": "q", "completion": "a"}, "sft"),
    "alpaca": ({"instruction": "i", "input": "", "output": "o"}, "sft"),
    "sharegpt": ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "sft"),
    "preference": ({"prompt": "q", "chosen": "a", "rejected": "b"}, "preference"),
    "hh_rlhf": (
        {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"},
        "preference",
    ),
    "sharegpt_preference": (
        {
            "conversations": [{"from": "human", "value": "q"}],
            "chosen": {"from": "gpt", "value": "a"},
            "rejected": {"from": "gpt", "value": "b"},
        },
        "preference",
    ),
    "ranking": ({"prompt": "q", "responses": ["a", "b", "c"], "ranking": [1, 0, 2]}, "preference"),
    "prompt_only": ({"prompt": "q"}, "prompts"),
    "text": ({"text": "t"}, "text"),
}


@pytest.mark.parametrize("fmt", list(SAMPLES))
def test_valid_file_of_each_format(tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    row, kind = SAMPLES[fmt]
    path = write_jsonl(tmp_path / f"{fmt}.jsonl", [row, row, row])
    assert main([path]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"format: {fmt}" in out
    assert f"kind: {kind}" in out
    assert "rows: 3" in out
    assert "problems: 0" in out


def test_valid_parquet_and_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = datasets.Dataset.from_list([SAMPLES["messages"][0]] * 4)
    ds.to_parquet(str(tmp_path / "chat.parquet"))
    ds.save_to_disk(str(tmp_path / "chat"))
    for path in (tmp_path / "chat.parquet", tmp_path / "chat"):
        assert main([str(path)]) == 0
        out = capsys.readouterr().out
        assert "format: messages\n" in out and "rows: 4\n" in out


def test_broken_file_lists_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = {"instruction": "i", "output": "o"}
    path = write_jsonl(tmp_path / "x.jsonl", [good, {"instruction": "i", "output": " "}, good, "{oops", good])
    assert main([path]) == 1
    out = capsys.readouterr().out
    assert out.splitlines() == [
        f"source: {path}",
        "format: alpaca",
        "kind: sft",
        "rows: 5",
        "examples: 3",
        "problems: 2",
        f"{path}: row 2: empty assistant response",
        f"{path}: row 4: malformed JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))",
    ]


def test_kind_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "r.jsonl", [SAMPLES["ranking"][0]])
    assert main([path, "--kind", "prompts"]) == 0
    assert "kind: prompts\n" in capsys.readouterr().out
    assert main([path, "--kind", "sft"]) == 1
    out = capsys.readouterr().out
    assert "format: unknown\n" in out
    assert "format 'ranking' (preference data) cannot be used as sft data" in out


def test_missing_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    assert main([path]) == 1
    out = capsys.readouterr().out
    assert "missing column: expected one of messages | prompt + completion" in out
    assert "found columns: question, answer" in out


def test_unreadable_source_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nope.jsonl")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope.jsonl'}: file not found"
    bad = tmp_path / "list.json"
    bad.write_text("[{")
    assert main([str(bad)]) == 2
    assert "malformed JSON" in capsys.readouterr().err


def test_check_source_result(tmp_path: Path) -> None:
    rank = SAMPLES["ranking"][0]
    path = write_jsonl(
        tmp_path / "r.jsonl", [rank, rank | {"ranking": [0, 0, 1]}, rank | {"responses": ["a"]}]
    )
    result = check_source(path)
    assert (result.format, result.kind, result.rows, result.examples) == ("ranking", "preference", 3, 3)
    assert [p.row for p in result.problems] == [2, 3]
    assert not result.ok
    assert format_check(result).endswith(f"{path}: row 3: fewer than 2 responses (got 1)")


def test_every_line_malformed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", ["{", "", "nope"])
    assert main([path]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[1:6] == ["format: unknown", "kind: unknown", "rows: 2", "examples: 0", "problems: 2"]
    assert [line.split(": malformed JSON")[0] for line in out[6:]] == [f"{path}: row 1", f"{path}: row 3"]
