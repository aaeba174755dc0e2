"""`make round`: one round of the human-feedback loop on a cut-down tiny setting, end to end through make.

Round 1 (sft, reward, ppo) is trained in this process from the stage configs the round reuses; `make round`
then samples K responses of the round-1 policy, serves the project while the scripted labeller (the gold
judge) labels it over HTTP, exports, retrains the reward model on the old comparisons plus the new ones, runs
PPO again from SFT and evaluates both rounds' policies: round.md holds both rounds' figures and step times.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
import sqlite3
import threading
from pathlib import Path

import pytest
import yaml
from helpers import TINY_DATA, head_of
from test_pipeline import make

from instruct_tune.label.round import STEPS
from instruct_tune.label.round_label import split_rankings, wait_until_labelled

COMMON = {"report_to": "none", "use_cpu": True, "disable_tqdm": True, "seed": 0}


ROUND_PROMPTS = (7000, 16)  # rows of data/tiny/prompts.jsonl: the round's first prompt and how many


def memorised_demonstrations(out: Path, per_prompt: int = 16) -> Path:
    """The noisy demonstrator's answers to the round's prompts, `per_prompt` each: an SFT policy of the session's
    small model trained on them answers those prompts well or with the demonstrator's mistakes, so that its
    samples differ in gold score (its answers to unseen prompts would all score 0: nothing to rank)."""
    from instruct_tune.tiny.demonstrator import NoisyDemonstrator
    from instruct_tune.tiny.task import parse_prompt

    first, n = ROUND_PROMPTS
    prompts = [json.loads(line)["prompt"] for line in (TINY_DATA / "prompts.jsonl").read_text().splitlines()]
    rng, demonstrator = random.Random(0), NoisyDemonstrator(error_rate=0.5, chatter_rate=0.3)
    rows = [
        {
            "messages": [
                {"role": "user", "content": p},
                {"role": "assistant", "content": demonstrator.respond(parse_prompt(p), rng)},
            ]
        }
        for p in prompts[first : first + n]
        for _ in range(per_prompt)
    ]
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


def write_configs(config: Path, data: Path, tiny_model: Path) -> None:
    """Stage configs of a few seconds each (SFT: 160 steps on the round's prompts); a round of 16 prompts, K=4."""
    old = [head_of(TINY_DATA / "comparisons.jsonl", data / "comparisons.jsonl", 40)]
    sft_file = memorised_demonstrations(data / "sft.jsonl")
    configs = {
        "sft": {
            "model_name_or_path": str(tiny_model),
            "dataset_name": str(sft_file),
            "use_peft": False,
            "num_train_epochs": 20,
            "per_device_train_batch_size": 32,
            "learning_rate": 3e-3,
            "max_length": 128,
            "eval_strategy": "no",
            "save_strategy": "no",
            **COMMON,
        },
        "reward": {
            "dataset_mixture": [{"path": str(p), "weight": 1.0} for p in old],
            "eval_dataset_name": str(
                head_of(TINY_DATA / "comparisons_eval.jsonl", data / "cmp_eval.jsonl", 8)
            ),
            "use_peft": False,
            "num_train_epochs": 1,
            "per_device_train_batch_size": 8,
            "learning_rate": 3e-3,
            "max_length": 128,
            "eval_strategy": "no",
            "save_strategy": "no",
            "normalization_samples": 16,
            "normalization_max_new_tokens": 12,
            **COMMON,
        },
        "ppo": {
            "dataset_name": str(head_of(TINY_DATA / "prompts.jsonl", data / "ppo_prompts.jsonl", 32)),
            "use_peft": False,
            "total_episodes": 16,
            "rollout_batch_size": 8,
            "num_mini_batches": 1,
            "max_new_tokens": 12,
            "learning_rate": 1e-3,
            "eval_samples": 0,
            "logging_steps": 1,
            "save_steps": 0,
            **COMMON,
        },
        "eval": {
            "dataset_name": str(head_of(TINY_DATA / "heldout_prompts.jsonl", data / "heldout.jsonl", 12)),
            "max_new_tokens": 12,
            "batch_size": 24,
            "greedy": False,
            "seed": 0,
        },
        "round": {
            "prompts": str(TINY_DATA / "prompts.jsonl"),
            "first_prompt": ROUND_PROMPTS[0],
            "num_prompts": ROUND_PROMPTS[1],
            "k": 4,
            "max_new_tokens": 12,
            "heldout_fraction": 0.25,
            "new_weight": 2.0,
        },
    }
    for name, values in configs.items():
        (config / f"{name}.yaml").write_text(yaml.safe_dump(values))


def train_round1(config: Path, run: Path) -> None:
    """sft, reward and ppo of round 1 in this process, as their recipes run them (the same parse_args)."""
    from instruct_tune.config import (
        DataArguments,
        ModelArguments,
        PPOStageConfig,
        RewardStageConfig,
        SFTStageConfig,
        parse_args,
    )
    from instruct_tune.stages.ppo import run_ppo
    from instruct_tune.stages.reward import run_reward
    from instruct_tune.stages.sft import run_sft

    sft = str(run / "sft")
    run_sft(
        *parse_args(
            SFTStageConfig,
            DataArguments,
            ModelArguments,
            args=["--config", str(config / "sft.yaml"), "--output_dir", sft],
        )
    )
    run_reward(
        *parse_args(
            RewardStageConfig,
            DataArguments,
            ModelArguments,
            args=[
                "--config",
                str(config / "reward.yaml"),
                "--output_dir",
                str(run / "reward"),
                "--model_name_or_path",
                sft,
                "--policy_path",
                sft,
            ],
        )
    )
    run_ppo(
        *parse_args(
            PPOStageConfig,
            DataArguments,
            ModelArguments,
            args=[
                "--config",
                str(config / "ppo.yaml"),
                "--output_dir",
                str(run / "ppo"),
                "--model_name_or_path",
                sft,
                "--reward_model_path",
                str(run / "reward"),
            ],
        )
    )


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_make_round_labels_retrains_and_compares_both_rounds(tiny_model_dir: Path, tmp_path: Path) -> None:
    from instruct_tune.tiny.task import gold_score

    config, data, run = tmp_path / "config", tmp_path / "data", tmp_path / "run"
    config.mkdir()
    data.mkdir()
    write_configs(config, data, tiny_model_dir)
    train_round1(config, run)
    rd = run / "round2"

    result = make("round", config, run)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (rd / "round.md").read_text()
    assert report.strip() in result.stdout  # printed at the end

    # labelled through HTTP by the gold judge, every item; the export is what the judge said, best first
    state = json.loads((rd / "round.json").read_text())
    assert list(state["steps"]) == list(STEPS) and all(s >= 0 for s in state["steps"].values())
    assert "the scripted labeller (the tiny gold judge) labelled" in result.stdout
    rankings = jsonl(rd / "rankings.jsonl")
    assert rankings and {r["task"] for r in rankings} <= {"sort", "reverse", "add", "repeat"}
    with contextlib.closing(sqlite3.connect(rd / "labels.sqlite")) as conn:
        ended = {
            (i, text): bool(e) for i, text, e in conn.execute("SELECT item_id, text, ended FROM responses")
        }
    for row in rankings:
        prompt, responses = row["prompt"][-1]["content"], [row["responses"][i] for i in row["ranking"]]
        scores = [gold_score(prompt, r, ended[row["prompt_id"], r]) for r in responses]
        assert scores == sorted(scores, reverse=True) and scores[0] > scores[-1]
    train, heldout = jsonl(rd / "rankings_train.jsonl"), jsonl(rd / "rankings_heldout.jsonl")
    assert len(train) + len(heldout) == len(rankings) and train and heldout
    assert not {r["prompt_id"] for r in train} & {r["prompt_id"] for r in heldout}
    assert state["heldout_prompts"] == len({r["prompt_id"] for r in heldout})
    # round.md quotes the export's summary, not what a library printed on import
    assert f"Export: {rd / 'rankings.jsonl'}: {len(rankings)} ranking rows from " in report

    # the reward stage read the new rankings beside the old comparisons, and says so in its folder
    new = str(rd / "rankings_train.jsonl")
    assert f"{new}: format=ranking rows={len(train)}" in (rd / "logs" / "reward.log").read_text()
    resolved = yaml.safe_load((rd / "reward" / "config.yaml").read_text())
    old = yaml.safe_load((config / "reward.yaml").read_text())
    assert resolved["dataset_mixture"] == [*old["dataset_mixture"], {"path": new, "weight": 2.0}]
    assert resolved["eval_dataset_name"] == old["eval_dataset_name"]
    card = (rd / "reward" / "README.md").read_text()
    assert all(f"- `{entry['path']}`" in card for entry in resolved["dataset_mixture"])
    ppo = yaml.safe_load((rd / "ppo" / "config.yaml").read_text())
    assert ppo["reward_model_path"] == str(rd / "reward") and ppo["model_name_or_path"] == str(run / "sft")

    # one eval of both rounds' policies; round.md carries its figures and both reward models' accuracy
    metrics = json.loads((rd / "eval" / "metrics.json").read_text())
    wins = [metrics[f"win_rate_vs_sft_gold/round{n}"] for n in (1, 2)]
    assert all(0.0 <= w <= 1.0 for w in wins)
    assert f"| gold win rate vs SFT, sampled | {wins[0]:.3f} | {wins[1]:.3f} |" in report
    verdict = "yes" if wins[1] > wins[0] else "no"
    assert f"**Round 2 beats round 1: {verdict}.**" in report
    accuracy = re.search(
        r"\| RM accuracy on the held-out new rankings \((\d+) comparisons.*? \| ([\d.]+) \| ([\d.]+) \|",
        report,
    )
    assert accuracy and int(accuracy.group(1)) > 0
    assert float(accuracy.group(2)) == pytest.approx(
        state["accuracy"]["round1"]["heldout_accuracy"], abs=1e-3
    )
    for step in STEPS:
        assert re.search(rf"\| {step} \(.*\) \| \d+ \|", report), step

    # run again: every step is done, skipped; round.md is written again, the same
    again = make("round", config, run)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(f"==> round step {s}: done earlier, skipped" in again.stdout for s in STEPS)
    assert (rd / "round.md").read_text() == report


def test_split_keeps_the_rows_of_a_prompt_together(tmp_path: Path) -> None:
    rows = [
        {"prompt": f"p{i // 2}", "responses": ["a", "b"], "ranking": [0, 1], "prompt_id": i // 2}
        for i in range(20)
    ]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    assert split_rankings(tmp_path / "r.jsonl", train, held, 0.2, seed=0) == (8, 2)
    ids = [{r["prompt_id"] for r in jsonl(path)} for path in (train, held)]
    assert len(ids[1]) == 2 and not ids[0] & ids[1] and len(jsonl(held)) == 4


def test_human_labelling_is_waited_for_until_every_item_is_labelled(tmp_path: Path) -> None:
    from instruct_tune.label.assign import next_assignment
    from instruct_tune.label.cli import main as label_main
    from instruct_tune.label.db import labeler_for_token, open_project
    from instruct_tune.label.labels import submit_label

    source, db = tmp_path / "responses.jsonl", tmp_path / "p.sqlite"
    source.write_text(
        "".join(json.dumps({"prompt": f"Say {w}", "responses": [w, "no"]}) + "\n" for w in "abc")
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert label_main(["new-project", "p", "--responses", str(source), "--db", str(db)]) == 0
        assert label_main(["add-labeler", str(db), "ann"]) == 0
    token = out.getvalue().split()[-1]
    waited: dict = {}
    printed = io.StringIO()

    def wait() -> None:
        with contextlib.redirect_stdout(printed):
            waited.update(wait_until_labelled(db, poll_seconds=0.05))

    thread = threading.Thread(target=wait)
    thread.start()
    with contextlib.closing(open_project(db)) as conn:
        who = labeler_for_token(conn, token)
        for _ in range(3):
            assert thread.is_alive()  # still waiting: an item is left
            item = next_assignment(conn, who.id)
            submit_label(conn, who.id, item.id, {"tiers": [[0], [1]]})
    thread.join(timeout=10)
    assert not thread.is_alive() and waited["items_labelled"] == waited["items"] == 3
    assert f"{db}: 3/3 items labelled" in printed.getvalue()
