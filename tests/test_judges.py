"""Judges plugged into eval through the registry: chosen by name in the config, no change to eval's code."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import test_eval
import yaml
from helpers import REPO
from test_eval import N_PROMPTS, eval_args, read_metrics

from instruct_tune.config import ConfigError, EvalStageConfig, parse_args
from instruct_tune.evaluation.judges import (
    Judge,
    JudgeBase,
    Prompt,
    PromptNotJudged,
    register_judge,
    registered_judges,
    unregister_judge,
)
from instruct_tune.stages.eval import run_eval
from instruct_tune.tiny.judge import TinyGoldJudge
from instruct_tune.tiny.task import gold_score, parse_prompt

FAMILIES = ("add", "repeat", "reverse", "sort")
# test_eval's fixtures (module-scoped: this module trains its own reward model, on the same 40 rankings)
data_files, reward_folder, ppo_folder = test_eval.data_files, test_eval.reward_folder, test_eval.ppo_folder


class Chars(JudgeBase):
    """Longer is better: the response's length in characters (a judge that tells the policies apart)."""

    name = "chars"

    def __init__(self) -> None:
        self.calls = 0

    def score(
        self, prompts: Sequence[Prompt], responses: Sequence[str], ended: Sequence[bool]
    ) -> list[float]:
        self.calls += 1
        return [float(len(r)) for r in responses]


class ContainsAnswer(JudgeBase):
    """1 when the tiny task's answer appears anywhere in the response (chatter around it allowed), else 0."""

    name = "contains_answer"

    def score(
        self, prompts: Sequence[Prompt], responses: Sequence[str], ended: Sequence[bool]
    ) -> list[float]:
        return [float(parse_prompt(p.text).answer in r) for p, r in zip(prompts, responses, strict=True)]


class NoSorting(JudgeBase):
    """A judge that cannot judge the sort prompts."""

    name = "no_sorting"

    def check(self, prompts: Sequence[Prompt]) -> None:
        for prompt in prompts:
            if prompt.task == "sort":
                raise PromptNotJudged(prompt, "sort prompts are not mine")

    def score(
        self, prompts: Sequence[Prompt], responses: Sequence[str], ended: Sequence[bool]
    ) -> list[float]:
        return [0.0] * len(responses)


@pytest.fixture
def plugged() -> Iterator[list[Chars]]:
    """`chars`, `contains_answer` and `no_sorting` registered for one test; the `chars` judges eval built."""
    built: list[Chars] = []

    def chars(config) -> Chars:
        built.append(Chars())
        return built[-1]

    register_judge("chars", chars)
    register_judge("contains_answer", lambda config: ContainsAnswer())
    register_judge("no_sorting", lambda config: NoSorting())
    yield built
    for name in ("chars", "contains_answer", "no_sorting"):
        unregister_judge(name)


@pytest.fixture
def eval_inputs(tiny_model_dir, ppo_folder, reward_folder, data_files) -> tuple:
    """What `eval_args` builds an eval config over: the SFT model, the "PPO" policy, the reward model, data."""
    return tiny_model_dir, ppo_folder, reward_folder, data_files


def quick_args(out: Path, tiny_model_dir, ppo_folder, reward_folder, data_files, **overrides):
    values = dict(greedy=False, ptx_eval_dataset=None, policy_paths=[str(ppo_folder)], policy_names=["ppo"])
    values.update(overrides)
    return eval_args(out, tiny_model_dir, ppo_folder, reward_folder, data_files, **values)


def two_policies(out: Path, tiny_model_dir, ppo_folder, reward_folder, data_files, **overrides):
    """The random-LoRA "PPO" policy and the SFT model again, sampled and greedy."""
    policies = dict(policy_paths=[str(ppo_folder), str(tiny_model_dir)], policy_names=["ppo", "sft_copy"])
    return quick_args(
        out, tiny_model_dir, ppo_folder, reward_folder, data_files, greedy=True, **policies, **overrides
    )


def test_a_registered_judge_chosen_by_name_is_reported(plugged, eval_inputs, tmp_path) -> None:
    with_it = run_eval(two_policies(tmp_path / "with", *eval_inputs, judges=["chars"]))
    assert (
        len(plugged) == 1 and plugged[0].calls == 1
    )  # built from the config's name; all answers in one call
    m = read_metrics(with_it)
    assert m["judge/chars"] == "chars"

    rows = [json.loads(line) for line in (with_it / "samples.jsonl").read_text().splitlines()]
    assert all(row["chars"] == len(row["response"]) for row in rows)  # beside `reward` and `gold`
    for policy in ("sft", "ppo", "sft_copy"):
        for decoding, prefix in (("sampled", ""), ("greedy", "greedy/")):
            mine = [r for r in rows if (r["policy"], r["decoding"]) == (policy, decoding)]
            assert m[f"{policy}/{prefix}chars_mean"] == pytest.approx(
                sum(r["chars"] for r in mine) / N_PROMPTS
            )
            assert m[f"{prefix}chars_mean/{policy}"] == m[f"{policy}/{prefix}chars_mean"]
            for family in FAMILIES:
                of_family = [r["chars"] for r in mine if r["task"] == family]
                assert m[f"{policy}/{prefix}chars/{family}"] == pytest.approx(sum(of_family) / len(of_family))

    # its win rate against SFT: pairs of answers to the same prompt, the longer wins, ties half
    for prefix, decoding in (("", "sampled"), ("greedy/", "greedy")):
        sft = {r["index"]: r["chars"] for r in rows if (r["policy"], r["decoding"]) == ("sft", decoding)}
        ppo = [r for r in rows if (r["policy"], r["decoding"]) == ("ppo", decoding)]
        wins = [0.5 if r["chars"] == sft[r["index"]] else float(r["chars"] > sft[r["index"]]) for r in ppo]
        if decoding == "sampled":  # the samples differ (greedy answers mostly agree): a flipped rate fails
            assert sum(wins) / N_PROMPTS != 0.5
        assert m[f"ppo/{prefix}win_rate_vs_sft_chars"] == pytest.approx(sum(wins) / N_PROMPTS)
        assert m[f"{prefix}win_rate_vs_sft_chars/ppo"] == m[f"ppo/{prefix}win_rate_vs_sft_chars"]
        assert m[f"{prefix}win_rate_vs_sft_chars/sft_copy"] == 0.5
        assert f"{prefix}win_rate_vs_sft_chars/sft" not in m

    report = (with_it / "results.md").read_text()
    assert report.count("| perfect | mean chars | win rate vs SFT (chars) | KL to SFT |") == 2  # both tables
    assert "judged by the gold judge of the tiny task, the chars judge and the reward model against" in report
    figures = [
        m[f"ppo/{key}"] for key in ("perfect_share", "chars_mean", "win_rate_vs_sft_chars", "kl_vs_sft")
    ]
    assert "| " + " | ".join(f"{value:.3f}" for value in figures) + " |" in report

    # nothing else moves: the same run without the extra judge gives the same numbers
    without = run_eval(two_policies(tmp_path / "without", *eval_inputs))
    assert {k: v for k, v in m.items() if "chars" not in k} == read_metrics(without)


def test_a_registered_judge_as_the_gold_judge(plugged, eval_inputs, tmp_path) -> None:
    """Any registered judge can give the gold figures; its references (none here) are optional."""
    out = run_eval(quick_args(tmp_path / "eval", *eval_inputs, gold_judge="contains_answer"))
    m = read_metrics(out)
    assert m["gold_judge"] is True and m["judge/gold"] == "contains_answer"
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    ppo = [r["gold"] for r in rows if r["policy"] == "ppo"]
    assert set(ppo) <= {0.0, 1.0} and m["gold_mean/ppo"] == pytest.approx(sum(ppo) / N_PROMPTS)
    assert m["ppo/perfect_share"] == m["ppo/gold_mean"] and "ppo/exact_match" not in m


def test_unknown_and_unusable_judge_names_are_refused(plugged, eval_inputs, data_files, tmp_path) -> None:
    out = tmp_path / "eval"

    def run(**overrides):
        return run_eval(quick_args(out, *eval_inputs, **overrides))

    registered = ", ".join(registered_judges())
    assert {"chars", "reward_model", "tiny_gold"} <= set(registered_judges())
    with pytest.raises(
        ConfigError, match=re.escape(f"judges: no judge named 'lenght' (registered: {registered};")
    ):
        run(judges=["lenght"])
    with pytest.raises(
        ConfigError, match=re.escape(f"gold_judge: no judge named 'gold' (registered: {registered};")
    ):
        run(gold_judge="gold")
    for taken in ("reward", "length"):  # `reward/<family>` is the reward model's, `length` a samples field
        with pytest.raises(ConfigError, match=f"judges: '{taken}' cannot name figures"):
            run(judges=[taken])
    with pytest.raises(ConfigError, match="judges: tiny_gold is judging already"):
        run(judges=["tiny_gold"])
    first_sort = 1 + [
        json.loads(line)["task"] for line in data_files["prompts"].read_text().splitlines()
    ].index("sort")
    with pytest.raises(
        ConfigError, match=rf"judges: no_sorting cannot judge .*, prompt row {first_sort} \('Sort "
    ):
        run(judges=["no_sorting"])
    assert not out.exists() and plugged == []  # refused before anything was generated or written


def test_a_chosen_gold_judge_refuses_prompts_it_cannot_judge(eval_inputs, tmp_path) -> None:
    """No guessing from the prompts: the gold judge is chosen (`tiny_gold` by default) and every prompt must
    be one it can judge; the error names the option, the judge, the file and the prompt row."""
    prompts = tmp_path / "mixed.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in ("Add 2 and 3.", "Tell me a story.", "Hello?"))
    )
    out = tmp_path / "eval"
    expected = (
        rf"gold_judge: tiny_gold cannot judge {re.escape(str(prompts))}, prompt row 2 \('Tell me a story\.'\)"
    )
    with pytest.raises(ConfigError, match=expected):
        run_eval(eval_args(out, *eval_inputs, dataset_name=str(prompts)))
    assert not out.exists()  # refused before anything was generated or written


def test_the_registry() -> None:
    def factory(config) -> Judge:
        return ContainsAnswer()

    register_judge("test_registry", factory)
    try:
        register_judge("test_registry", factory)  # the same factory again: a no-op (a module imported twice)
        with pytest.raises(ValueError, match="'test_registry' is already registered"):
            register_judge("test_registry", lambda config: ContainsAnswer())
        register_judge("test_registry", lambda config: NoSorting(), replace=True)
        assert "test_registry" in registered_judges()
    finally:
        unregister_judge("test_registry")
    assert "test_registry" not in registered_judges()
    assert isinstance(Chars(), Judge) and Chars().description == "the chars judge"


def test_tiny_gold_judge() -> None:
    judge = TinyGoldJudge()
    assert isinstance(judge, Judge) and judge.name == "tiny_gold" and judge.tie_tolerance == 1e-9
    rows = [
        Prompt(1, [], "Add 2 and 3.", "add"),
        Prompt(2, [], "Reverse this list: cat, dog, owl", "reverse"),
    ]
    judge.check(rows)
    assert judge.references(rows) == ["5", "owl, dog, cat"]
    responses, ended = ["5", "owl, dog, cat and more"], [True, False]
    assert judge.score(rows, responses, ended) == [
        gold_score(p.text, r, e) for p, r, e in zip(rows, responses, ended, strict=True)
    ]
    assert judge.score(rows, responses, ended)[0] == 1.0 and judge.score(rows, responses, ended)[1] < 0.5
    with pytest.raises(
        PromptNotJudged, match=r"prompt row 7 \('Tell me a story\.'\): not a tiny-task prompt"
    ):
        judge.check([*rows, Prompt(7, [], "Tell me a story.", "open")])


def test_judge_options() -> None:
    (args,) = parse_args(EvalStageConfig, args=["--gold_judge", "none", "--judges", "a", "b"])
    assert args.gold_judge is None and args.judges == ["a", "b"]
    assert EvalStageConfig().gold_judge == "tiny_gold" and EvalStageConfig(judges="a").judges == ["a"]
    tiny = yaml.safe_load((REPO / "recipes/configs/tiny/eval.yaml").read_text())
    hh = yaml.safe_load((REPO / "recipes/configs/gpt2-alpaca/eval.yaml").read_text())
    assert tiny["gold_judge"] == "tiny_gold" and hh["gold_judge"] is None
