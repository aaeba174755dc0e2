"""The labelling app's pure parts: agreement figures against hand-computed values, the merge rule, the
chains a tied ranking is written as, and an export (from labels stored through the real queries) that the
reward stage's loader reads as it is."""

from __future__ import annotations

import itertools
import json
import sqlite3
from pathlib import Path

import pytest

from instruct_tune.label.agreement import fractional_ranks, ordinal_alpha, pair_agreement, pairwise_agreement
from instruct_tune.label.assign import next_assignment, plan_overlap, progress
from instruct_tune.label.db import Item, add_labeler, create_project, labeler_for_token
from instruct_tune.label.export import export_project, merge_rankings, strict_chains
from instruct_tune.label.labels import LabelError, submit_label, undo_last


def test_fractional_ranks_share_the_mean_position_of_a_tie() -> None:
    assert fractional_ranks([[2], [0, 3], [1]], 4) == [2.5, 4.0, 1.0, 2.5]
    assert fractional_ranks([[0, 1, 2]], 3) == [2.0, 2.0, 2.0]


def test_ordinal_alpha_by_hand() -> None:
    """Two labellers, three responses. A ranks 0 > 1 > 2 (ranks 1, 2, 3); B ties 0 and 1 above 2 (1.5, 1.5, 3).

    Units (responses) and their values: r0 {1, 1.5}, r1 {2, 1.5}, r2 {3, 3}; each has m_u = 2 values, so each
    ordered pair of values weighs 1/(m_u - 1) = 1. Coincidences: o(1,1.5) = o(1.5,1) = 1, o(2,1.5) = o(1.5,2) = 1,
    o(3,3) = 2. Marginals n_1 = 1, n_1.5 = 2, n_2 = 1, n_3 = 2; n = 6.
    Ordinal delta^2(c, k) = (sum of n_g from c to k - (n_c + n_k)/2)^2:
      (1,1.5): (3 - 1.5)^2 = 2.25    (1.5,2): (3 - 1.5)^2 = 2.25    (1,2): (4 - 1)^2 = 9
      (1,3): (6 - 1.5)^2 = 20.25     (1.5,3): (5 - 2)^2 = 9          (2,3): (3 - 1.5)^2 = 2.25
    Observed: sum o_ck delta^2 over ordered pairs = 4 * 2.25 = 9.
    Expected: 2 * (1*2*2.25 + 2*1*2.25 + 1*1*9 + 1*2*20.25 + 2*2*9 + 1*2*2.25) = 2 * 99 = 198.
    alpha = 1 - (n - 1) * 9 / 198 = 1 - 45/198 = 17/22.
    """
    a, b = fractional_ranks([[0], [1], [2]], 3), fractional_ranks([[0, 1], [2]], 3)
    assert ordinal_alpha(zip(a, b, strict=True)) == pytest.approx(17 / 22)
    # pairs (0,1): A prefers 0, B ties them -> disagree; (0,2) and (1,2): both agree -> 2 of 3
    assert pair_agreement(a, b) == (2, 3)
    share, per = pairwise_agreement([{"A": a, "B": b}])
    assert share == pytest.approx(2 / 3) and per == {"A": (2, 3), "B": (2, 3)}


def test_ordinal_alpha_on_krippendorffs_published_example() -> None:
    """Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability": 4 observers, 12 units, missing values;
    the paper gives alpha = 0.815 for the ordinal metric."""
    observers = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
        [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
    ]
    units = [[v for v in unit if v is not None] for unit in zip(*observers, strict=True)]
    assert ordinal_alpha(units) == pytest.approx(0.815, abs=5e-4)
    assert ordinal_alpha([[1, 1], [2, 2]]) == pytest.approx(1.0)
    assert ordinal_alpha([[1], [2]]) is None  # nothing pairable


def test_merge_by_mean_rank_keeps_ties() -> None:
    # A: 0 = 1 > 2 > 3 (1.5, 1.5, 3, 4); B: 2 > 0 > 1 > 3 (2, 3, 1, 4); means 1.75, 2.25, 2, 4
    assert merge_rankings([[[0, 1], [2], [3]], [[2], [0], [1], [3]]], 4) == [[0], [2], [1], [3]]
    # opposite strict rankings tie everything but the shared last place
    assert merge_rankings([[[0], [1], [2]], [[1], [0], [2]]], 3) == [[0, 1], [2]]


@pytest.mark.parametrize("tiers", [[[0, 1], [2]], [[0], [1, 2], [3]], [[0, 1], [2, 3]], [[3, 0], [1], [4, 2, 5]]])
def test_strict_chains_cover_each_preference_once_and_no_tie(tiers: list[list[int]]) -> None:
    tier_of = {i: t for t, tier in enumerate(tiers) for i in tier}
    chains = strict_chains(tiers)
    pairs = [(c[n], later) for c in chains for n in range(len(c)) for later in c[n + 1 :]]
    wanted = {(a, b) for a, b in itertools.permutations(tier_of, 2) if tier_of[a] < tier_of[b]}
    assert sorted(pairs) == sorted(wanted)  # each once: no duplicate in the list
    assert all(len(c) >= 2 and [tier_of[i] for i in c] == sorted({tier_of[i] for i in c}) for c in chains)
    assert strict_chains([[2], [0], [1]]) == [[2, 0, 1]]


def test_plan_overlap_is_seeded_and_sized() -> None:
    copies, order = plan_overlap(10, 0.2, 3, seed=1)
    assert sorted(copies) == [1] * 8 + [3] * 2 and sorted(order) == list(range(10))
    assert plan_overlap(10, 0.2, 3, seed=1) == (copies, order)
    with pytest.raises(ValueError):
        plan_overlap(10, 1.5, 2, seed=0)


def _project(path: Path) -> sqlite3.Connection:
    items = [
        Item([{"role": "user", "content": "What is 2 + 3?"}], [("5", True), ("6", True), ("5 Done.", True)], {"task": "add"}),
        Item([{"role": "user", "content": "Reverse: a, b"}], [("b, a", True), ("a, b", False)], {"task": "reverse"}),
        Item([{"role": "user", "content": "Say hi"}], [("hi", True), ("hello", True)], {"task": "greet"}),
    ]
    return create_project(path, items, copies=[2, 2, 2], order=[0, 1, 2], settings={"name": "units", "seed": 0})


def _label(conn: sqlite3.Connection, who: int, ranking_by_text: list[list[str]], **extra) -> None:
    """Label the labeller's next item by response text (tiers of texts, best first)."""
    item = next_assignment(conn, who)
    assert item is not None
    slot = {r["text"]: s for s, r in enumerate(item.responses)}
    tiers = [[slot[t] for t in tier] for tier in ranking_by_text]
    submit_label(conn, who, item.id, {"tiers": tiers, **extra})


def test_export_merges_drops_and_is_read_by_the_reward_loader(tmp_path: Path) -> None:
    from instruct_tune.data import load_source

    conn = _project(tmp_path / "units.sqlite")
    a = labeler_for_token(conn, add_labeler(conn, "a"))
    b = labeler_for_token(conn, add_labeler(conn, "b"))
    assert a and b and labeler_for_token(conn, "wrong") is None
    # item 1: a says 5 > 5 Done. > 6, b says 5 = 5 Done. > 6: merged 5 (1.25) > 5 Done. (1.75) > 6 (3): one row
    _label(conn, a.id, [["5"], ["5 Done."], ["6"]], better_answer="5", flags={"1": ["fails_instruction"]})
    _label(conn, b.id, [["5", "5 Done."], ["6"]])
    # item 2: a ranks, b finds none acceptable (left out)
    _label(conn, a.id, [["b, a"], ["a, b"]])
    _label(conn, b.id, [], none_acceptable=True)
    # item 3: a ties everything (left out), then undoes and relabels; b ranks the other way round
    _label(conn, a.id, [["hi", "hello"]])
    assert undo_last(conn, a.id) is not None
    assert progress(conn, a.id) == {"done": 2, "remaining": 1}
    again = next_assignment(conn, a.id)
    assert again is not None and again.draft is not None and len(again.draft["tiers"]) == 1  # the undone label
    _label(conn, a.id, [["hi"], ["hello"]])
    _label(conn, b.id, [["hello"], ["hi"]])
    with pytest.raises(LabelError) as refused:
        submit_label(conn, b.id, again.id, {"tiers": [[0], [1]]})  # a's assignment
    assert refused.value.status == 404

    out, demos = tmp_path / "rankings.jsonl", tmp_path / "demos.jsonl"
    report = export_project(conn, out, demos)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_prompt = {r["prompt"][0]["content"]: r for r in rows}
    sorted_texts = lambda r: [r["responses"][i] for i in r["ranking"]]  # noqa: E731
    assert sorted_texts(by_prompt["What is 2 + 3?"]) == ["5", "5 Done.", "6"]
    assert by_prompt["What is 2 + 3?"]["n_labelers"] == 2 and by_prompt["What is 2 + 3?"]["task"] == "add"
    assert sorted_texts(by_prompt["Reverse: a, b"]) == ["b, a", "a, b"]
    assert "Say hi" not in by_prompt  # hi/hello: one vote each way -> tied after merging
    assert report.labels_left_out == {"none acceptable": 1}
    assert report.prompts_dropped == {"tied after merging": 1}
    demo_rows = [json.loads(line) for line in demos.read_text().splitlines()]
    assert demo_rows == [
        {
            "messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
            "prompt_id": 1,
            "labeler": "a",
            "task": "add",
        }
    ]
    pairs, load_report = load_source(str(out), "preference")
    assert load_report.format == "ranking" and len(pairs) == 3 + 1
    sft, _ = load_source(str(demos), "sft")
    assert sft[0]["messages"][-1] == {"role": "assistant", "content": "5"}


def test_a_tied_merged_ranking_becomes_chains_the_loader_reads(tmp_path: Path) -> None:
    from instruct_tune.data import load_source

    items = [Item([{"role": "user", "content": "Pick"}], [("w", True), ("x", True), ("y", True), ("z", True)])]
    conn = create_project(tmp_path / "t.sqlite", items, copies=[1], order=[0], settings={"name": "t"})
    a = labeler_for_token(conn, add_labeler(conn, "a"))
    _label(conn, a.id, [["w", "x"], ["y"], ["z"]])
    out = tmp_path / "r.jsonl"
    report = export_project(conn, out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert report.prompts_with_ties == 1 and len(rows) == report.rows > 1
    assert {r["prompt_id"] for r in rows} == {1}
    pairs, _ = load_source(str(out), "preference")
    got = sorted((p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs)
    assert got == [("w", "y"), ("w", "z"), ("x", "y"), ("x", "z"), ("y", "z")]  # no w-x pair: they tie
