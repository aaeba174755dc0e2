"""The evaluation stage on tiny real models: metrics, table, plots, samples, determinism, metric modules."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import evaluate
import pytest
import yaml
from helpers import TINY_DATA, head_of
from PIL import Image
from stage_runs import lora_args, reward_args, train_reward

from instruct_tune.artifacts import write_model_card
from instruct_tune.cli import main as cli_main
from instruct_tune.config import ConfigError, EvalStageConfig, parse_args
from instruct_tune.metrics import METRIC_NAMES, load_metric, metric_path
from instruct_tune.stages.eval import run_eval

FAMILIES = ("add", "repeat", "reverse", "sort")
N_PROMPTS = 24
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """24 held-out prompts, 40 + 16 rankings, and 30 rows of plain text."""
    folder = tmp_path_factory.mktemp("eval-data")
    return {
        "prompts": head_of(TINY_DATA / "heldout_prompts.jsonl", folder / "heldout.jsonl", N_PROMPTS),
        "train": head_of(TINY_DATA / "comparisons.jsonl", folder / "train.jsonl", 40),
        "eval": head_of(TINY_DATA / "comparisons_eval.jsonl", folder / "eval.jsonl", 16),
        "text": head_of(TINY_DATA / "pretrain.jsonl", folder / "text.jsonl", 30, last=True),
    }


@pytest.fixture(scope="module")
def reward_folder(tiny_model_dir: Path, data_files: dict[str, Path], tmp_path_factory) -> Path:
    """A LoRA reward model trained on 40 rankings, normalised on the eval rankings' best responses."""
    args = reward_args(tmp_path_factory.mktemp("rm") / "reward", per_device_eval_batch_size=64)
    return train_reward(args, lora_args(tiny_model_dir), data_files["train"], data_files["eval"])


@pytest.fixture(scope="module")
def ppo_folder(make_adapter_folder, tiny_model_dir) -> Path:
    """A "PPO policy": a LoRA adapter with random B weights over the tiny model, a PPO training log, a card."""
    out = make_adapter_folder("ppo", seed=5, std=0.05)
    write_model_card(out, stage="ppo", base_model=str(tiny_model_dir), is_adapter=True)
    log = [{"eval_start_reward": 0.1}] + [
        {"objective/scores": 0.1 * step, "objective/kl": 0.02 * step, "step": step} for step in range(1, 6)
    ]
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 5, "log_history": log}))
    # what a PPO run folder records of its cost (PPO logs its completions as `episodes`)
    (out / "metrics.json").write_text(json.dumps({"train_runtime": 12.4, "episodes": 64, "peak_rss_mib": 321.0}))
    return out


def eval_args(out: Path, tiny_model_dir: Path, ppo: Path, reward: Path, files: dict[str, Path], **overrides):
    values = dict(
        output_dir=str(out),
        sft_path=str(tiny_model_dir),
        # the SFT model again as a policy: it must tie with itself (win rate 0.5, KL 0)
        policy_paths=[str(ppo), str(tiny_model_dir)],
        policy_names=["ppo", "sft_copy"],
        reward_model_path=str(reward),
        dataset_name=str(files["prompts"]),
        ptx_eval_dataset=str(files["text"]),
        ptx_eval_rows=20,
        max_new_tokens=16,
        batch_size=16,  # two batches of prompts: the per-batch seeds are exercised
        seed=0,
    )
    values.update(overrides)
    return EvalStageConfig(**values)


@pytest.fixture(scope="module")
def eval_run(tiny_model_dir, ppo_folder, reward_folder, data_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "eval"
    return run_eval(eval_args(out, tiny_model_dir, ppo_folder, reward_folder, data_files))


def read_metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


# --- the run folder -------------------------------------------------------------------------------------


def test_metrics_keys_and_ranges(eval_run: Path) -> None:
    m = read_metrics(eval_run)
    headline = (
        "win_rate_vs_sft_gold",
        "win_rate_vs_sft_rm",
        "mean_reward_sft",
        "mean_reward_ppo",
        "kl_ppo_vs_sft",
        "gold_mean_sft",
        "gold_mean_ppo",
        "perplexity_sft",
        "perplexity_ppo",
        "greedy/win_rate_vs_sft_gold",
        "greedy/win_rate_vs_sft_rm",
        "greedy/mean_reward_ppo",
        "greedy/gold_mean_ppo",
    )
    for key in headline:
        assert isinstance(m[key], float) and math.isfinite(m[key]), key
    assert m["headline_policy"] == "ppo" and m["eval_prompts"] == N_PROMPTS and m["gold_judge"] is True
    assert m["win_rate_vs_sft_gold"] == m["ppo/win_rate_vs_sft_gold"]
    assert m["mean_reward_sft"] == m["sft/mean_reward"] and m["kl_ppo_vs_sft"] == m["ppo/kl_vs_sft"]
    assert (m["judge/rm"], m["judge/gold"]) == ("reward_model", "tiny_gold")

    # headline keys named by policy, for every policy (the deprecated `*_ppo` keys name the first one only)
    for policy in ("ppo", "sft_copy"):
        for key in ("win_rate_vs_sft_gold", "win_rate_vs_sft_rm", "greedy/win_rate_vs_sft_gold", "kl_vs_sft"):
            assert m[f"{key}/{policy}"] == m[f"{policy}/{key}"], (key, policy)
    for policy in ("sft", "ppo", "sft_copy"):
        for key in ("mean_reward", "gold_mean", "perplexity", "greedy/mean_reward", "greedy/gold_mean"):
            assert m[f"{key}/{policy}"] == m[f"{policy}/{key}"], (key, policy)
    assert m["win_rate_vs_sft_gold/sft_copy"] == 0.5 and m["win_rate_vs_sft_rm/ppo"] == m["win_rate_vs_sft_rm"]
    assert m["mean_reward/ppo"] == m["mean_reward_ppo"] and m["gold_mean/sft"] == m["gold_mean_sft"]
    assert m["perplexity/ppo"] == m["perplexity_ppo"] and m["kl_vs_sft/ppo"] == m["kl_ppo_vs_sft"]
    # SFT is not compared with itself; greedy answers have no KL; perplexity does not depend on decoding
    for key in ("win_rate_vs_sft_rm/sft", "kl_vs_sft/sft", "greedy/kl_vs_sft/ppo", "greedy/perplexity/ppo"):
        assert key not in m, key

    for policy in ("sft", "ppo", "sft_copy"):
        for prefix in (f"{policy}/", f"{policy}/greedy/"):
            for key in (
                "win_rate_vs_sft_rm",
                "win_rate_vs_sft_gold",
                "eos_share",
                "gold_mean",
                "perfect_share",
            ):
                assert 0.0 <= m[prefix + key] <= 1.0, prefix + key
            for family in FAMILIES:
                assert 0.0 <= m[f"{prefix}gold/{family}"] <= 1.0
                assert 0.0 <= m[f"{prefix}win_rate_vs_sft_gold/{family}"] <= 1.0
                assert math.isfinite(m[f"{prefix}reward/{family}"])
            assert 0.0 <= m[prefix + "exact_match"] <= m[prefix + "perfect_share"] + 1e-9
            assert 0.0 < m[prefix + "response_length"] <= 16
        assert m[f"{policy}/perplexity"] > 1.0
        assert f"{policy}/greedy/kl_vs_sft" not in m
    # the gold mean is the average of the per-family means weighted by family size (6 prompts each here)
    assert m["ppo/gold_mean"] == pytest.approx(sum(m[f"ppo/gold/{f}"] for f in FAMILIES) / 4)

    # SFT against itself, loaded a second time as a policy: identical samples, every comparison a tie
    assert m["sft/kl_vs_sft"] == 0.0
    assert m["sft_copy/kl_vs_sft"] == pytest.approx(0.0, abs=1e-5)
    for prefix in ("sft_copy/", "sft_copy/greedy/", "sft/"):
        assert m[prefix + "win_rate_vs_sft_rm"] == 0.5
        assert m[prefix + "win_rate_vs_sft_gold"] == 0.5
    assert m["sft_copy/mean_reward"] == m["sft/mean_reward"]
    assert m["sft_copy/perplexity"] == pytest.approx(m["sft/perplexity"])
    # the random-LoRA "PPO" policy differs from SFT: positive KL and a different perplexity
    assert m["ppo/kl_vs_sft"] > 0.0
    assert m["ppo/perplexity"] != pytest.approx(m["sft/perplexity"])


def test_results_table_and_plots(eval_run: Path, capsys: pytest.CaptureFixture) -> None:
    report = (eval_run / "results.md").read_text()
    for policy in ("sft", "ppo", "sft_copy"):
        assert report.count(f"| {policy} |") == 2, policy  # sampled and greedy tables
    assert "## Sampled" in report and "## Greedy" in report
    assert "gold sort" in report and "KL to SFT" in report and "perplexity" in report
    m = read_metrics(eval_run)
    assert f"| ppo | {m['mean_reward_ppo']:.3f} | {m['win_rate_vs_sft_rm']:.3f} |" in report
    # the training cost of each policy, read from its run folder, once (the sampled table only)
    assert report.count("| train s | episodes | peak RSS MiB |") == 1
    sampled = report.split("## Greedy")[0]
    rows = {line.split(" | ")[0]: line for line in sampled.splitlines() if line.startswith("| ")}
    assert rows["| ppo"].endswith("| 12 | 64 | 321 |") and rows["| sft_copy"].endswith("| – | – | – |")
    assert (m["ppo/train_runtime"], m["ppo/train_episodes"], m["ppo/peak_rss_mib"]) == (12.4, 64, 321.0)
    for name in ("ppo_training.png", "reward_hist.png", "gold_by_family.png"):
        path = eval_run / name
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        with Image.open(path) as image:
            image.verify()
        assert f"]({name})" in report


def test_policy_card_gets_the_results_table(eval_run: Path, ppo_folder: Path) -> None:
    card = (ppo_folder / "README.md").read_text()
    section = card.split("## Evaluation against the SFT policy\n", 1)[1]
    m = read_metrics(eval_run)
    assert f"| ppo | {m['mean_reward_ppo']:.3f} | {m['win_rate_vs_sft_rm']:.3f} |" in section
    assert "### Sampled" in section and "### Greedy" in section and "![" not in section
    assert f"From `{eval_run / 'results.md'}`" in section


def test_samples_and_config(eval_run: Path) -> None:
    rows = [json.loads(line) for line in (eval_run / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 2 * N_PROMPTS
    assert {(r["policy"], r["decoding"]) for r in rows} == {
        (p, d) for p in ("sft", "ppo", "sft_copy") for d in ("sampled", "greedy")
    }
    m = read_metrics(eval_run)
    ppo = [r for r in rows if r["policy"] == "ppo" and r["decoding"] == "sampled"]
    assert sum(r["reward"] for r in ppo) / N_PROMPTS == pytest.approx(m["ppo/mean_reward"])
    assert sum(r["gold"] for r in ppo) / N_PROMPTS == pytest.approx(m["ppo/gold_mean"])
    assert sum(r["kl"] for r in ppo) / N_PROMPTS == pytest.approx(m["kl_ppo_vs_sft"])
    assert all("kl" not in r for r in rows if r["decoding"] == "greedy")

    (config,) = parse_args(EvalStageConfig, args=["--config", str(eval_run / "config.yaml")])
    assert config.policy_names == ["ppo", "sft_copy"] and config.max_new_tokens == 16


def test_several_samples_per_prompt(
    eval_run: Path, tiny_model_dir, ppo_folder, reward_folder, data_files, tmp_path
) -> None:
    """3 draws a prompt: every sampled figure averages over all 3 x N answers, greedy figures are unchanged."""
    out = tmp_path / "three"
    run_eval(
        eval_args(
            out, tiny_model_dir, ppo_folder, reward_folder, data_files, samples_per_prompt=3, ptx_eval_dataset=None
        )
    )
    m, once = read_metrics(out), read_metrics(eval_run)
    assert m["eval_prompts"] == N_PROMPTS and m["samples_per_prompt"] == 3
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    ppo = [r for r in rows if r["policy"] == "ppo" and r["decoding"] == "sampled"]
    sft = [r for r in rows if r["policy"] == "sft" and r["decoding"] == "sampled"]
    assert len(ppo) == 3 * N_PROMPTS and len(rows) == 3 * (3 + 1) * N_PROMPTS
    assert sorted({(r["index"], r["sample"]) for r in ppo}) == [(i, s) for i in range(N_PROMPTS) for s in range(3)]
    # the draws differ: a policy sampling at temperature 1 does not say the same thing three times
    assert len({(r["index"], r["response"]) for r in ppo}) > N_PROMPTS
    assert sum(r["gold"] for r in ppo) / len(ppo) == pytest.approx(m["ppo/gold_mean"])
    assert sum(r["kl"] for r in ppo) / len(ppo) == pytest.approx(m["kl_ppo_vs_sft"])
    pairs = {(r["index"], r["sample"]): r["gold"] for r in sft}
    wins = [
        0.5 if abs(r["gold"] - pairs[(r["index"], r["sample"])]) <= 1e-9 else float(r["gold"] > pairs[(r["index"], r["sample"])])
        for r in ppo
    ]
    assert sum(wins) / len(wins) == pytest.approx(m["win_rate_vs_sft_gold"])
    assert m["sft_copy/win_rate_vs_sft_gold"] == 0.5 and m["sft_copy/kl_vs_sft"] == pytest.approx(0.0, abs=1e-4)
    for key in ("greedy/win_rate_vs_sft_gold", "greedy/win_rate_vs_sft_rm", "greedy/gold_mean_ppo"):
        assert m[key] == pytest.approx(once[key])
    assert "3 sampled responses" in (out / "results.md").read_text()
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        eval_args(out, tiny_model_dir, ppo_folder, reward_folder, data_files, samples_per_prompt=0)


def test_same_seeds_give_the_same_numbers(eval_run: Path, tmp_path: Path) -> None:
    """A second run, through the console script and the first run's saved config: the same metrics."""
    out = tmp_path / "again"
    cli_main(["eval", "--config", str(eval_run / "config.yaml"), "--output_dir", str(out)])
    assert read_metrics(out) == read_metrics(eval_run)
    assert (out / "results.md").read_text().replace(str(out), "") == (
        eval_run / "results.md"
    ).read_text().replace(str(eval_run), "")
    policy = yaml.safe_load((eval_run / "config.yaml").read_text())["policy_paths"][0]
    card = (Path(policy) / "README.md").read_text()
    assert card.count("## Evaluation against the SFT policy") == 1  # the latest run's table replaced the first
    assert f"From `{out / 'results.md'}`" in card


def test_prompts_without_a_gold_judge(
    tiny_model_dir, ppo_folder, reward_folder, data_files, tmp_path
) -> None:
    prompts = tmp_path / "open.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in ("Tell me a story.", "Add 2 and 3.", "Hello?"))
    )
    out = run_eval(
        eval_args(
            tmp_path / "eval",
            tiny_model_dir,
            ppo_folder,
            reward_folder,
            data_files,
            policy_paths=[str(ppo_folder)],
            policy_names=None,
            dataset_name=str(prompts),
            ptx_eval_dataset=None,
            greedy=False,
            max_new_tokens=8,
            gold_judge=None,
        )
    )
    m = read_metrics(out)
    assert m["gold_judge"] is False and "win_rate_vs_sft_gold" not in m and "ppo/gold_mean" not in m
    assert "judge/gold" not in m and "gold_mean/ppo" not in m and "win_rate_vs_sft_gold/ppo" not in m
    assert m["win_rate_vs_sft_rm/ppo"] == m["win_rate_vs_sft_rm"] and "mean_reward/sft" in m
    assert all("gold" not in row for row in map(json.loads, (out / "samples.jsonl").read_text().splitlines()))
    assert 0.0 <= m["win_rate_vs_sft_rm"] <= 1.0 and "greedy/win_rate_vs_sft_rm" not in m
    assert "perplexity_ppo" not in m
    report = (out / "results.md").read_text()
    assert "gold" not in report.split("## Sampled")[1] and "## Greedy" not in report
    assert not (out / "gold_by_family.png").exists() and (out / "reward_hist.png").is_file()


# --- options --------------------------------------------------------------------------------------------


def test_missing_folders_and_options_are_named(
    tiny_model_dir, ppo_folder, reward_folder, data_files, tmp_path
) -> None:
    def run(**overrides):
        return run_eval(
            eval_args(tmp_path / "x", tiny_model_dir, ppo_folder, reward_folder, data_files, **overrides)
        )

    missing = tmp_path / "no-such-run" / "ppo"
    with pytest.raises(ConfigError, match=re.escape(f"policy_paths: {missing} does not exist")):
        run(policy_paths=[str(missing)], policy_names=None)
    with pytest.raises(ConfigError, match="reward_model_path: .* does not exist"):
        run(reward_model_path=str(tmp_path / "no-rm"))
    with pytest.raises(ConfigError, match="reward_model_path: not set"):
        run(reward_model_path=None)
    with pytest.raises(ConfigError, match="policy_names"):
        run(policy_names=["ppo", "ppo"])
    with pytest.raises(ConfigError, match="policy_names: 1 names for 2 policy_paths"):
        run(policy_names=["ppo"])
    with pytest.raises(ConfigError, match="temperature"):
        run(temperature=0.0)
    assert not (tmp_path / "x").exists()


# --- metric modules, loaded by path ---------------------------------------------------------------------


def test_win_rate_module_loaded_by_path() -> None:
    path = str(metric_path("win_rate"))
    assert path.endswith("metrics/win_rate/win_rate.py")
    outcomes = evaluate.load(path, "outcomes", keep_in_memory=True)
    assert outcomes.compute(outcomes=[1, 0, 0.5]) == {
        "win_rate": 0.5,
        "wins": 1,
        "ties": 1,
        "losses": 1,
        "n": 3,
    }
    assert outcomes.compute(outcomes=[1, 1, 0.5, 0])["win_rate"] == 0.625
    by_group = outcomes.compute(outcomes=[1, 0, 0.5, 1], groups=["a", "a", "b", "b"])["win_rate_by_group"]
    assert by_group == {"a": 0.5, "b": 0.75}
    with pytest.raises(ValueError, match="outcomes must be"):
        outcomes.compute(outcomes=[0.7])

    scores = evaluate.load(path, keep_in_memory=True)
    assert scores.compute(scores_a=[3.0, 1.0, 2.0], scores_b=[1.0, 2.0, 2.0])["win_rate"] == 0.5
    assert scores.compute(scores_a=[1.0, 1.0], scores_b=[1.05, 0.0], tie_tolerance=0.1)["win_rate"] == 0.75
    assert scores.compute(scores_a=[-1.0, 5.0, 0.0, 2.0], scores_b=[0.0, 0.0, 0.0, 3.0])["win_rate"] == 0.375


def test_perplexity_and_reference_match_modules() -> None:
    assert set(METRIC_NAMES) == {p.name for p in metric_path("win_rate").parents[1].iterdir() if p.is_dir()}
    ppl = load_metric("perplexity").compute(nll=[2.0, 0.0], tokens=[1, 1])
    assert ppl["perplexity"] == pytest.approx(math.e) and ppl["tokens"] == 2
    assert load_metric("perplexity").compute(nll=[4.2, 3.1], tokens=[3, 2])["mean_nll"] == pytest.approx(
        7.3 / 5
    )
    match = load_metric("reference_match").compute(
        predictions=["1, 2, 3", "1,  3", "a b c"], references=["1, 2, 3", "1, 2, 3", "a c"]
    )
    # "1, 3" vs "1, 2, 3": tokens [1 , 3] vs [1 , 2 , 3], LCS 3: P = 1, R = 3/5, F1 = 0.75; "a b c" vs "a c": 0.8
    assert match["exact_match"] == pytest.approx(1 / 3)
    assert match["rouge_l"] == pytest.approx((1 + 0.75 + 0.8) / 3)
