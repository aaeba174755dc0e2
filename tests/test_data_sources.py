"""Every supported file type and source kind (JSON, JSON lines, CSV, Parquet, `save_to_disk` folders, Hub ids),
mixtures of sources and train/eval splits.

Format detection and conversion: `test_data_formats.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pytest
from test_data_formats import assistant, rows_of, user, write_jsonl

from instruct_tune.data import DataError, DataSource, load_mixture, load_source, split_train_eval

# --- file types and sources ----------------------------------------------------------------------------

ALPACA_ROWS = [
    {"instruction": "Name a colour.", "input": "", "output": "red"},
    {"instruction": "Add.", "input": "2 and 3", "output": "5"},
]
ALPACA_MESSAGES = [[user("Name a colour."), assistant("red")], [user("Add.\n\n2 and 3"), assistant("5")]]


def test_json_list_file(tmp_path: Path) -> None:
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(ALPACA_ROWS, indent=2))
    ds, report = load_source(str(path), "sft")
    assert report.format == "alpaca"
    assert ds["messages"][:] == ALPACA_MESSAGES


def test_json_file_with_json_lines(tmp_path: Path) -> None:
    ds, report = load_source(write_jsonl(tmp_path / "alpaca.json", ALPACA_ROWS), "sft")
    assert report.format == "alpaca"
    assert ds["messages"][:] == ALPACA_MESSAGES


def test_json_file_with_one_object_and_unicode_separators(tmp_path: Path) -> None:
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"text": "a\u2028b\x85c"}, indent=2, ensure_ascii=False), encoding="utf-8")
    assert load_source(str(path), "text")[0]["text"][:] == ["a\u2028b\x85c"]
    lines = write_jsonl(tmp_path / "lines.jsonl", [{"text": "a\u2028b"}, {"text": "c"}])
    Path(lines).write_text(Path(lines).read_text().replace("\\u2028", "\u2028"), encoding="utf-8")
    assert load_source(lines, "text")[0]["text"][:] == ["a\u2028b", "c"]


def test_csv_file(tmp_path: Path) -> None:
    path = tmp_path / "alpaca.csv"
    # Numbers stay text and a quoted cell may span lines.
    path.write_text('instruction,input,output\nName a colour.,,red\nAdd.,2 and 3,5\n"Two\nlines",,"x, y"\n')
    ds, report = load_source(str(path), "sft")
    assert report.format == "alpaca"
    assert ds["messages"][:] == [*ALPACA_MESSAGES, [user("Two\nlines"), assistant("x, y")]]


def test_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "chat.parquet"
    conv = [user("hi"), assistant("yo")]
    datasets.Dataset.from_list([{"messages": conv, "task": "greet"}]).to_parquet(str(path))
    ds, report = load_source(str(path), "sft")
    assert report.format == "messages"
    assert rows_of(ds) == [{"messages": conv, "task": "greet"}]


def test_save_to_disk_folder(tmp_path: Path) -> None:
    datasets.Dataset.from_list([{"text": "hello"}]).save_to_disk(str(tmp_path / "corpus"))
    ds, report = load_source(str(tmp_path / "corpus"), "text")
    assert report.format == "text"
    assert rows_of(ds) == [{"text": "hello", "task": "corpus"}]


def test_save_to_disk_dataset_dict(tmp_path: Path) -> None:
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"prompt": "train q"}]),
            "test": datasets.Dataset.from_list([{"prompt": "test q"}]),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    ds, report = load_source(str(tmp_path / "dd"), "prompts", split="test")
    assert report.source.endswith("dd[test]")
    assert ds["prompt"][:] == [[user("test q")]]
    with pytest.raises(DataError, match=r"split 'validation' not found \(available: train, test\)"):
        load_source(str(tmp_path / "dd"), "prompts", split="validation")


def test_hub_id_goes_to_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load_dataset(path: str, name: str | None = None, **kwargs: Any) -> datasets.Dataset:
        calls.append((path, name, kwargs))
        return datasets.Dataset.from_list([{"prompt": "q", "chosen": "a", "rejected": "b"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds, report = load_source("org/prefs", "preference", split="test", name="cfg", revision="v1")
    assert calls == [("org/prefs", "cfg", {"split": "test", "revision": "v1"})]
    assert report.source == "org/prefs:cfg[test]"
    assert ds[0]["task"] == "prefs"


def test_task_argument_overrides(tmp_path: Path) -> None:
    rows = [{"prompt": "q", "task": "mine"}, {"prompt": "r"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    assert load_source(path, "prompts")[0]["task"][:] == ["mine", "p"]
    assert load_source(path, "prompts", task="forced")[0]["task"][:] == ["forced", "forced"]


# --- mixtures and splits -------------------------------------------------------------------------------


def _prompts_file(path: Path, n: int, label: str) -> str:
    return write_jsonl(path, [{"prompt": f"{label} {i}"} for i in range(n)])


def test_mixture_weights_and_tasks(tmp_path: Path) -> None:
    a = _prompts_file(tmp_path / "a.jsonl", 10, "a")
    b = _prompts_file(tmp_path / "b.jsonl", 10, "b")
    c = _prompts_file(tmp_path / "c.jsonl", 10, "c")
    sources = [DataSource(a, 0.5), DataSource(b, 2.0, task="bee"), {"path": c, "weight": 2.5}]
    ds, reports = load_mixture(sources, "prompts", seed=3)
    assert [r.format for r in reports] == ["prompt_only"] * 3
    tasks = ds["task"][:]
    assert (tasks.count("a"), tasks.count("bee"), tasks.count("c")) == (5, 20, 25)
    b_prompts = [p[0]["content"] for p, t in zip(ds["prompt"], tasks, strict=True) if t == "bee"]
    assert sorted(b_prompts) == sorted([f"b {i}" for i in range(10)] * 2)
    # Shuffled, and reproducible with the same seed.
    assert tasks != sorted(tasks, key=["a", "bee", "c"].index)
    again, _ = load_mixture(sources, "prompts", seed=3)
    assert again["prompt"][:] == ds["prompt"][:]


def test_mixture_keeps_preference_groups_unique(tmp_path: Path) -> None:
    rank = {"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 1, 2]}
    one = write_jsonl(tmp_path / "one.jsonl", [rank, rank | {"prompt": "q2"}])
    two = write_jsonl(tmp_path / "two.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "y", "extra": 1}])
    ds, _ = load_mixture([DataSource(one), DataSource(two)], "preference")
    assert len(ds) == 7
    assert sorted(set(ds["group_id"])) == [1, 2, 3]
    assert set(ds.column_names) == {"prompt", "chosen", "rejected", "group_id", "task"}


def test_data_source_parse() -> None:
    assert DataSource.parse("data/x.jsonl") == DataSource("data/x.jsonl")
    assert DataSource.parse("data/x.jsonl:0.5") == DataSource("data/x.jsonl", 0.5)
    assert DataSource.parse("org/ds:2:chat") == DataSource("org/ds", 2.0, "chat")
    assert DataSource.parse({"path": "x.jsonl", "split": "test"}) == DataSource("x.jsonl", split="test")
    with pytest.raises(ValueError, match="unknown data source keys"):
        DataSource.parse({"path": "x", "wieght": 2})
    with pytest.raises(ValueError, match="weight must be > 0"):
        DataSource("x", 0)


def test_split_train_eval_sizes(tmp_path: Path) -> None:
    ds, _ = load_source(_prompts_file(tmp_path / "p.jsonl", 100, "p"), "prompts")
    train, evals = split_train_eval(ds, 0.1, seed=0)
    assert (len(train), len(evals)) == (90, 10)
    assert not {p[0]["content"] for p in train["prompt"]} & {p[0]["content"] for p in evals["prompt"]}
    with pytest.raises(ValueError, match="leaves the eval split empty"):
        split_train_eval(ds, 0.001, seed=0)


def test_split_keeps_ranking_groups_together(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "responses": ["a", "b", "c"], "ranking": [0, 1, 2]} for i in range(10)]
    ds, _ = load_source(write_jsonl(tmp_path / "r.jsonl", rows), "preference")
    train, evals = split_train_eval(ds, 0.2, seed=1)
    assert (len(train), len(evals)) == (24, 6)
    assert not set(train["group_id"]) & set(evals["group_id"])
