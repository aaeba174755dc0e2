"""Tests for the built-in tiny task: gold judge, demonstrator, splits and the data builder."""

from __future__ import annotations

import json
import random
import re

import pytest

from instruct_tune.tiny import demonstrator
from instruct_tune.tiny import task as tt
from instruct_tune.tiny.build_data import FILES, build_tiny_data, imperfect_shares, make_pretrain_text
from instruct_tune.tiny.task import (
    FAMILIES,
    WORDS,
    NoisyDemonstrator,
    Task,
    gold_compare,
    gold_score,
    parse_prompt,
    sample_task,
)

EXAMPLES = {
    "sort": (Task("sort", (42, 7, 19, 3)), "3, 7, 19, 42"),
    "reverse": (Task("reverse", ("cat", "dog", "sun")), "sun, dog, cat"),
    "add": (Task("add", (23, 58)), "81"),
    "repeat": (Task("repeat", ("apple", 3)), "apple apple apple"),
}


def test_word_lists() -> None:
    assert 150 <= len(WORDS) <= 250 and len(set(WORDS)) == len(WORDS)
    assert all(re.fullmatch("[a-z]{2,6}", w) for w in WORDS)


@pytest.mark.parametrize("family", FAMILIES)
def test_examples_and_correct_answer_scores_one(family: str) -> None:
    task, answer = EXAMPLES[family]
    assert task.answer == answer
    assert gold_score(task.prompt, answer) == 1.0
    assert gold_score(task.prompt, f"  {answer}\n") == 1.0  # whitespace at the ends is ignored
    assert gold_score(task.prompt, "") == 0.0
    assert gold_score(task.prompt, "   ") == 0.0
    rng = random.Random(1)
    for _ in range(200):
        t = sample_task(rng, family)
        assert gold_score(t.prompt, t.answer) == 1.0
        assert len(t.prompt.split()) < 25


def test_exact_partial_credit_values() -> None:
    p_sort = EXAMPLES["sort"][0].prompt
    assert gold_score(p_sort, "7, 3, 19, 42") == pytest.approx(0.5)  # adjacent swap: 2 of 4 right
    assert gold_score(p_sort, "3, 7, 19") == pytest.approx(0.75)  # missing item: 3 of max(3, 4)
    assert gold_score(p_sort, "3, 7, 19, 42, 50") == pytest.approx(0.8)  # extra item costs
    assert gold_score(p_sort, "42, 19, 7, 3") == 0.0
    p_rev = EXAMPLES["reverse"][0].prompt
    assert gold_score(p_rev, "sun, cat, dog") == pytest.approx(1 / 3)  # rotated instead of reversed
    p_add = EXAMPLES["add"][0].prompt
    assert gold_score(p_add, "80") == pytest.approx(0.8 * (1 - 1 / 20))
    assert gold_score(p_add, "71") == pytest.approx(0.4)  # dropped carry
    assert gold_score(p_add, "101") == 0.0
    assert gold_score(p_add, "banana") == 0.0
    p_rep = EXAMPLES["repeat"][0].prompt
    assert gold_score(p_rep, "apple apple apple apple") == pytest.approx(0.75)
    assert gold_score(p_rep, "apple apple") == pytest.approx(2 / 3)
    assert gold_score(p_rep, "apple pear apple") == pytest.approx(2 / 3)
    assert gold_score(p_rep, "pear pear pear") == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_chatter_and_missing_eos_lower_the_score(family: str) -> None:
    task, answer = EXAMPLES[family]
    p = task.prompt
    assert gold_score(p, answer + " Hope this helps!") == pytest.approx(0.5)
    assert gold_score(p, answer + ".") == pytest.approx(0.5)
    assert gold_score(p, answer, ended_with_eos=False) == pytest.approx(0.5)
    assert gold_score(p, answer + " Done.", ended_with_eos=False) == pytest.approx(0.25)
    assert gold_compare(p, answer, answer + " Hope this helps!") == 1.0
    assert gold_compare(p, answer, answer, eos_a=False) == 0.0
    # Padding the answer with more of the same never beats stopping.
    assert gold_score(p, answer + ", " + answer if family != "repeat" else answer + " " + answer) < 1.0


def test_gold_compare_ties_and_order() -> None:
    task, answer = EXAMPLES["sort"]
    p = task.prompt
    assert gold_compare(p, answer, f" {answer} ") == 0.5
    assert gold_compare(p, "7, 3, 19, 42", "3, 7, 42, 19") == 0.5  # both 0.5
    assert gold_compare(p, "7, 3, 19, 42", answer) == 0.0
    assert gold_compare(p, answer, "7, 3, 19, 42") == 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_demonstrator_mistakes_strictly_between_zero_and_one(family: str) -> None:
    rng = random.Random(2)
    for split in ("train", "heldout"):
        for _ in range(300):
            t = sample_task(rng, family, split)
            mistakes = demonstrator._mistakes(t, rng)
            assert mistakes
            for m in mistakes:
                assert 0.0 < gold_score(t.prompt, m) < 1.0, (t.prompt, m)


@pytest.mark.parametrize("family", FAMILIES)
def test_parse_prompt_round_trips(family: str) -> None:
    rng = random.Random(3)
    templates = set()
    for split in ("train", "heldout"):
        for _ in range(300):
            t = sample_task(rng, family, split)
            assert parse_prompt(t.prompt) == t
            templates.add(t.template)
    assert templates == {0, 1}


@pytest.mark.parametrize(
    "bad",
    [
        "Hello there",
        "What is 123 + 4?",
        "Sort these numbers in ascending order: 1, 1, 2",
        "Reverse this list: a",
    ],
)
def test_parse_prompt_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        parse_prompt(bad)


def test_splits_are_disjoint() -> None:
    rng = random.Random(4)
    train = [sample_task(rng, split="train") for _ in range(2000)]
    held = [sample_task(rng, split="heldout") for _ in range(2000)]
    assert {t.family for t in held} == set(FAMILIES)
    assert not {t.key for t in train} & {t.key for t in held}
    assert not {t.prompt for t in train} & {t.prompt for t in held}
    for t in train:
        assert not tt.is_heldout(t)
    for t in held:
        assert tt.is_heldout(t)
    # No shared item list, number pair or (word, N) pair in any family.
    for fam in FAMILIES:
        keys = {sample_task(rng, fam).key for _ in range(500)}
        assert not keys & {t.key for t in held if t.family == fam}
    assert Task("add", (23, 58)).key == Task("add", (58, 23), 1).key


@pytest.mark.parametrize("family", FAMILIES)
def test_variants_have_distinct_scores(family: str) -> None:
    rng = random.Random(5)
    demo = NoisyDemonstrator()
    for _ in range(200):
        t = sample_task(rng, family)
        vs = demo.variants(t, rng, 4)
        scores = sorted((gold_score(t.prompt, v) for v in vs), reverse=True)
        assert len(vs) == 4
        assert scores[0] == 1.0
        assert all(a - b > 1e-9 for a, b in zip(scores, scores[1:], strict=False))
        assert any(re.search("[A-Z]", v) for v in vs) or any(0 < s < 1 for s in scores)
    assert len(demo.variants(sample_task(rng, family), rng, 6)) == 6


def test_demonstrator_imperfect_share() -> None:
    rng = random.Random(6)
    demo = NoisyDemonstrator()
    for family in FAMILIES:
        bad = 0
        for _ in range(2000):
            t = sample_task(rng, family)
            bad += gold_score(t.prompt, demo.respond(t, rng)) < 1.0
        assert 0.35 <= bad / 2000 <= 0.50, (family, bad / 2000)
    perfect = NoisyDemonstrator(error_rate=0.0, chatter_rate=0.0)
    t = sample_task(rng)
    assert perfect.respond(t, rng) == t.answer


def test_pretrain_text_is_plain() -> None:
    rng = random.Random(7)
    texts = [make_pretrain_text(rng) for _ in range(500)]
    assert all(len(x) <= 160 for x in texts)
    joined = " ".join(texts).lower()
    assert "sort these" not in joined and "reverse this" not in joined and "repeat the word" not in joined
    assert len(set(re.findall("[a-z]+", joined)) & set(WORDS)) >= 150  # pretraining covers the vocabulary


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_build_tiny_data_deterministic_and_counts(tmp_path) -> None:
    kw = dict(
        seed=3, n_sft=200, n_sft_eval=40, n_comparisons=80, n_prompts=60, n_heldout=40, n_pretrain=50,
        n_comparisons_eval=20,
    )  # fmt: skip
    counts = build_tiny_data(tmp_path / "a", **kw)
    build_tiny_data(tmp_path / "b", **kw)
    expected = {
        "sft.jsonl": 200, "sft_eval.jsonl": 40, "comparisons.jsonl": 80 + 40 + 20, "comparisons_eval.jsonl": 20,
        "prompts.jsonl": 60, "heldout_prompts.jsonl": 40, "pretrain.jsonl": 50,
    }  # fmt: skip
    assert counts == expected and set(FILES) == set(expected)
    for name, n in expected.items():
        a = (tmp_path / "a" / name).read_bytes()
        b = (tmp_path / "b" / name).read_bytes()
        assert a == b, name
        assert len(a.splitlines()) == n
    other = build_tiny_data(tmp_path / "c", **{**kw, "seed": 4})
    assert other == counts
    plain = build_tiny_data(tmp_path / "e", **kw, extra_comparisons={})  # the extra rows change no other file
    assert plain["comparisons.jsonl"] == 80
    balanced = (tmp_path / "e" / "comparisons.jsonl").read_bytes()
    assert (tmp_path / "a" / "comparisons.jsonl").read_bytes().startswith(balanced)
    for name in set(FILES) - {"comparisons.jsonl"}:
        assert (tmp_path / "e" / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name
    assert (tmp_path / "c" / "sft.jsonl").read_bytes() != (tmp_path / "a" / "sft.jsonl").read_bytes()

    d = tmp_path / "a"
    sft = _read(d / "sft.jsonl")
    assert [r["task"] for r in sft[:8]] == list(FAMILIES) * 2  # balanced round-robin
    assert all(sum(r["task"] == fam for r in sft) == 50 for fam in FAMILIES)
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in sft)
    sft_eval = _read(d / "sft_eval.jsonl")
    assert not {r["messages"][0]["content"] for r in sft_eval} & {r["messages"][0]["content"] for r in sft}
    train_comps = _read(d / "comparisons.jsonl")  # 80 balanced rows, then the extra add and reverse rows
    assert [r["task"] for r in train_comps[:8]] == list(FAMILIES) * 2
    assert [r["task"] for r in train_comps[80:]] == ["add"] * 40 + ["reverse"] * 20
    comps = train_comps + _read(d / "comparisons_eval.jsonl")
    for r in comps:
        scores = [gold_score(r["prompt"], x) for x in r["responses"]]
        assert len(r["responses"]) == 4 and sorted(r["ranking"]) == [0, 1, 2, 3]
        assert all(scores[i] > scores[j] for i, j in zip(r["ranking"], r["ranking"][1:], strict=False))
        assert not tt.is_heldout(parse_prompt(r["prompt"]))
    assert {r["ranking"][0] for r in comps} != {0}  # best response is not always first
    ceval_keys = {parse_prompt(r["prompt"]).key for r in _read(d / "comparisons_eval.jsonl")}
    assert not ceval_keys & {parse_prompt(r["prompt"]).key for r in _read(d / "comparisons.jsonl")}
    held = _read(d / "heldout_prompts.jsonl")
    assert len({r["prompt"] for r in held}) == 40
    assert all(tt.is_heldout(parse_prompt(r["prompt"])) and r["task"] in FAMILIES for r in held)
    assert all(not tt.is_heldout(parse_prompt(r["prompt"])) for r in _read(d / "prompts.jsonl"))
    shares = imperfect_shares(d / "sft.jsonl")
    assert set(shares) == {*FAMILIES, "all"} and 0.15 <= shares["all"] <= 0.5


def test_policy_answers_ranked_by_the_gold_judge() -> None:
    from instruct_tune.tiny.policy_comparisons import rank_answers

    prompt = "What is 23 + 58?"
    answers = [("79", True), ("81", True), ("81 ", True), ("95", True), ("60", False), ("", True), ("78", True)]
    row = rank_answers(prompt, answers)
    # "81 " repeats "81", "60" never ended, "" is empty: dropped; 79, 78 and 95 have distinct scores
    assert row is not None and row["task"] == "add"
    ranked = [row["responses"][i] for i in row["ranking"]]
    assert ranked == ["81", "79", "78", "95"]
    scores = [gold_score(prompt, r) for r in ranked]
    assert all(a > b for a, b in zip(scores, scores[1:], strict=False))
    tie = rank_answers(prompt, [("80", True), ("82", True)])  # both off by one: one score, no ranking
    assert tie is None
