"""The reward stage's parts without a training run: K-way grouping, every preference format, the collator's
packed rows, the grouped loss, and the calibration table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from instruct_tune.config import DataArguments, ModelArguments
from instruct_tune.data import DataError
from instruct_tune.data.preference_groups import group_comparisons, reward_input_ids, tokenize_groups
from instruct_tune.data.reward_collator import GroupedPreferenceCollator
from instruct_tune.evaluation.comparisons import calibration_table
from instruct_tune.models import load_model, load_tokenizer
from instruct_tune.models.reward import RewardModel
from instruct_tune.models.reward_forward import packed_rewards
from instruct_tune.stages.data_sources import train_eval_sets
from instruct_tune.stages.reward_trainer import group_ranking_loss


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model_dir)))


# --- data: grouping K-way rankings ----------------------------------------------------------------------


def test_k4_ranking_is_one_group_of_six_pairs(tmp_path: Path, tokenizer) -> None:
    rows = [
        {"prompt": "q", "responses": ["r0", "r1", "r2", "r3"], "ranking": [2, 0, 3, 1], "task": "sort"},
        {"prompt": "p", "chosen": "good", "rejected": "bad", "task": "pair"},
    ]
    path = write_jsonl(tmp_path / "rank.jsonl", rows[:1])
    pairs_path = write_jsonl(tmp_path / "pairs.jsonl", rows[1:])
    data_args = DataArguments(
        dataset_mixture=[{"path": str(path)}, {"path": str(pairs_path)}], eval_fraction=0
    )
    pairs, _ = train_eval_sets(data_args, "preference", seed=0)
    assert len(pairs) == 7  # K(K-1)/2 = 6 pairs of the ranking + 1 plain pair
    groups = group_comparisons(pairs)
    assert len(groups) == 2
    ranking = next(g for g in groups if g["task"] == "sort")
    assert sorted(ranking["responses"]) == ["r0", "r1", "r2", "r3"]
    order = ["r2", "r0", "r3", "r1"]  # best first
    got = {
        (ranking["responses"][w], ranking["responses"][v])
        for w, v in zip(ranking["better"], ranking["worse"], strict=True)
    }
    assert got == {(order[i], order[j]) for i in range(4) for j in range(i + 1, 4)}

    batch = GroupedPreferenceCollator(pad_token_id=tokenizer.pad_token_id)(
        list(tokenize_groups(groups, tokenizer, max_length=128))
    )
    assert len(batch["better"]) == 7 and len(batch["reward_index"]) == 4 + 2
    # each prompt weighs once: its pairs share 1/P_g
    weights = sorted(batch["pair_weight"].tolist())
    assert weights == pytest.approx([1 / 6] * 6 + [1.0])
    assert batch["pair_weight"].sum().item() == pytest.approx(2.0)


# --- loss and packed rows --------------------------------------------------------------------------------


def test_group_loss_weights_each_prompt_once() -> None:
    rewards = torch.tensor([0.3, -0.2, 1.0, 0.1, 2.0, -1.0])  # prompt A: rows 0-3 (K=4), prompt B: rows 4-5
    a_pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    better = torch.tensor([p[0] for p in a_pairs] + [5])
    worse = torch.tensor([p[1] for p in a_pairs] + [4])
    weight = torch.tensor([1 / 6] * 6 + [1.0])
    loss_a = -sum(F.logsigmoid(rewards[i] - rewards[j]) for i, j in a_pairs) / 6
    loss_b = -F.logsigmoid(rewards[5] - rewards[4])
    expected = (loss_a + loss_b) / 2  # InstructGPT: -1/C(K,2) E[log sigmoid(r_w - r_l)], each prompt once
    assert group_ranking_loss(rewards, better, worse, weight).item() == pytest.approx(
        expected.item(), abs=1e-6
    )
    margin = torch.full((7,), 0.5)
    shifted = (
        -sum(F.logsigmoid(rewards[i] - rewards[j] - 0.5) for i, j in a_pairs) / 6
        - F.logsigmoid(rewards[5] - rewards[4] - 0.5)
    ) / 2
    assert group_ranking_loss(rewards, better, worse, weight, margin).item() == pytest.approx(
        shifted.item(), abs=1e-6
    )


@pytest.mark.parametrize(("attention", "row_length"), [("sdpa", 256), ("eager", 256), ("sdpa", 1)])
def test_packed_rows_give_the_per_response_rewards(
    tiny_model_dir: Path, tokenizer, attention: str, row_length: int
) -> None:
    model_args = ModelArguments(model_name_or_path=str(tiny_model_dir), attn_implementation=attention)
    model = load_model(model_args, tokenizer, head="reward").eval()
    groups = [
        {"prompt": "Add 2 and 3.", "responses": ["5", "6 Easy!", "55"]},
        {"prompt": "Reverse this list: ant, bee, cow", "responses": ["cow, bee, ant", "ant", "x y z w"]},
        {"prompt": "Add 12 and 30.", "responses": ["42", "24"]},
    ]
    rows = [
        {
            "input_ids": reward_input_ids(tokenizer, [g["prompt"]] * len(g["responses"]), g["responses"]),
            "better": [0],
            "worse": [1],
            "margin": [0.0],
        }
        for g in groups
    ]
    packed = GroupedPreferenceCollator(pad_token_id=tokenizer.pad_token_id, row_length=row_length)(rows)
    assert packed["input_ids"].shape[0] == (1 if row_length == 256 else 3)  # prompts share rows up to 256
    plain = GroupedPreferenceCollator(pad_token_id=tokenizer.pad_token_id, share_prompt=False)(rows)
    assert packed["input_ids"].numel() < plain["input_ids"].numel()  # the prompt is computed once
    with torch.no_grad():
        got = packed_rewards(model, packed)
        want = model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits[:, 0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # and equal to what the reward model's scoring function reads at the EOS token
    unnormalised = RewardModel(model, tokenizer)  # no normalisation: the identity
    prompts = [g["prompt"] for g in groups for _ in g["responses"]]
    scored = unnormalised.raw_score(prompts, [r for g in groups for r in g["responses"]])
    torch.testing.assert_close(got, scored, atol=1e-5, rtol=0)
    assert unnormalised.normalization.bias == 0.0 and unnormalised.normalization.scale == 1.0


# --- data: every preference format, and the errors ------------------------------------------------------


def _formats(tmp_path: Path) -> dict[str, Path]:
    user = {"role": "user", "content": "Add 1 and 2."}
    return {
        "preference": write_jsonl(
            tmp_path / "pref.jsonl", [{"prompt": "Add 1 and 2.", "chosen": "3", "rejected": "4"}]
        ),
        "preference_implicit": write_jsonl(
            tmp_path / "implicit.jsonl",
            [
                {
                    "chosen": [user, {"role": "assistant", "content": "3"}],
                    "rejected": [user, {"role": "assistant", "content": "4"}],
                }
            ],
        ),
        "hh_rlhf": write_jsonl(
            tmp_path / "hh.jsonl",
            [
                {
                    "chosen": "\n\nHuman: Add 1 and 2.\n\nAssistant: 3",
                    "rejected": "\n\nHuman: Add 1 and 2.\n\nAssistant: 4",
                }
            ],
        ),
        "sharegpt_preference": write_jsonl(
            tmp_path / "sgp.jsonl",
            [
                {
                    "conversations": [{"from": "human", "value": "Add 1 and 2."}],
                    "chosen": {"from": "gpt", "value": "3"},
                    "rejected": {"from": "gpt", "value": "4"},
                }
            ],
        ),
        "ranking": write_jsonl(
            tmp_path / "rank.jsonl",
            [{"prompt": "Add 1 and 2.", "responses": ["4", "3", "5"], "ranking": [1, 0, 2]}],
        ),
        "ranking_scores": write_jsonl(
            tmp_path / "scores.jsonl",
            [{"prompt": "Add 1 and 2.", "responses": ["4", "3", "5"], "scores": [0.5, 1, 0]}],
        ),
    }


def test_every_preference_format_goes_through_the_stage_data_prep(tmp_path: Path, tokenizer) -> None:
    for name, path in _formats(tmp_path).items():
        pairs, _ = train_eval_sets(
            DataArguments(dataset_name=str(path), eval_fraction=0), "preference", seed=0
        )
        groups = tokenize_groups(group_comparisons(pairs), tokenizer, max_length=128)
        assert len(groups) == 1, name
        group = groups[0]
        assert group["prompt"] == [{"role": "user", "content": "Add 1 and 2."}], name
        never_worse = set(range(len(group["responses"]))) - set(group["worse"])
        assert [group["responses"][i] for i in never_worse] == ["3"], name
        k = len(group["responses"])
        assert len(group["better"]) == k * (k - 1) // 2, name
        batch = GroupedPreferenceCollator(pad_token_id=tokenizer.pad_token_id, use_margin=True)(list(groups))
        assert batch["margin"].shape == batch["better"].shape, name
        if name == "ranking_scores":  # margins from score differences: 3 (1) > 4 (0.5) > 5 (0)
            assert sorted(batch["margin"].tolist()) == pytest.approx([0.5, 0.5, 1.0])
        else:
            assert batch["margin"].abs().sum().item() == 0.0, name


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"prompt": "q", "responses": ["a", "b", "c"], "scores": [1, 0.5, 1]}, r"row 2: tied scores"),
        (
            {"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 1, 1]},
            r"row 2: ranking \[0, 1, 1\] is not a permutation",
        ),
        (
            {"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 1, 3]},
            r"row 2: ranking .* not a permutation",
        ),
    ],
)
def test_bad_rankings_stop_the_stage_naming_the_row(tmp_path: Path, row: dict, match: str) -> None:
    good = {"prompt": "p", "responses": ["x", "y"], "ranking": [1, 0]}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError, match=match) as err:
        train_eval_sets(DataArguments(dataset_name=str(path), eval_fraction=0), "preference", seed=0)
    assert "bad.jsonl" in str(err.value)
    # with skip_invalid the bad row is dropped and counted, the good one trains
    pairs, _ = train_eval_sets(
        DataArguments(dataset_name=str(path), eval_fraction=0, skip_invalid=True), "preference", seed=0
    )
    assert len(group_comparisons(pairs)) == 1


# --- evaluation ---------------------------------------------------------------------------------------


def test_calibration_table_buckets_by_gap() -> None:
    diffs = torch.tensor([0.1, -0.2, 0.3, 2.0, -3.0, 4.0, 5.0, 6.0])
    table = calibration_table(diffs, buckets=2)
    assert [row["n"] for row in table] == [4, 4]
    assert table[0]["accuracy"] == pytest.approx(0.75) and table[1]["accuracy"] == pytest.approx(0.75)
    assert table[0]["predicted"] < table[1]["predicted"]
