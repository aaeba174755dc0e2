"""SFT tokens/s and peak RSS: our SFT stage against a plain `trl.SFTTrainer` script, same model, data and steps.

    python bench/sft.py [--steps 20] [--repeats 2]        (`make bench` runs it)

Both sides train the same ~11M-parameter GPT-2 (tiny default's tokenizer) on the same file of tiny
demonstrations (the first steps x batch x 4 rows; chats of 20-70 tokens: variable length), batch 32, max
length 256, lr 1e-3, our side with the tiny default's SFT settings (padded batches repacked into rows,
`repack_batches`), plain padding, and bfd packing kept in rows (`packing_per_row`, as micro-batches of 2 rows
accumulated to the same 32 rows per optimizer step), each run in a fresh process, the settings alternating within
each repeat. Tokens are non-padding tokens as TRL counts them (`num_tokens`);
time is the Trainer's `train_runtime`. The peer runs TRL's default (no packing in TRL 1.16) and every other
setting below; the fastest of them is `tokens_per_s_trl_fastest`. Writes bench/results/sft.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import REPO, RESULTS, WORK, bench_model, machine, parameters, run_timed, summary, write_result

PEER_SETTINGS = {
    "trl_default": [],
    "trl_no_packing": ["--packing", "none"],
    "trl_wrapped": ["--packing", "wrapped"],
    "trl_padding_free": ["--packing", "none", "--padding_free"],
    "trl_bfd_padding_free": ["--packing", "bfd", "--padding_free"],
}
# Our stage's settings: the tiny default (each padded batch's chats repacked side by side, `repack_batches`),
# plain padding, and bfd packing kept in rows (`packing_per_row`); `tokens_per_s_ours` is the fastest of them,
# as `tokens_per_s_trl_fastest` is TRL's fastest. Every setting trains `--batch` rows per optimizer step; those in
# MICRO_BATCH run them as micro-batches of that many rows (gradient accumulation): measured here with packed rows of
# 256 tokens, 2-row micro-batches trained 1171 tokens/s in 842 MB, 4-row 1291 in 966 MB, 32-row 1142 in 2199 MB.
OUR_SETTINGS = {
    "ours_repack": [],
    "ours_padding": ["--repack_batches", "false"],
    "ours_packing_per_row": [
        "--repack_batches", "false", "--packing", "true", "--packing_strategy", "bfd", "--packing_per_row", "true"
    ],
}  # fmt: skip
MICRO_BATCH = {"ours_packing_per_row": 2}
SOURCE = REPO / "data/tiny/sft.jsonl"


def bench_data(rows: int) -> str:
    """The first `rows` demonstrations as their own file: both sides read, tokenize and hold the same rows."""
    path = WORK / f"sft-{rows}.jsonl"
    if not path.is_file():
        WORK.mkdir(parents=True, exist_ok=True)
        with SOURCE.open() as lines:
            path.write_text("".join(line for _, line in zip(range(rows), lines, strict=False)))
    return str(path)


def ours(
    model: Path, data: str, steps: int, batch: int, max_length: int, setting: list[str], micro_batch: int | None = None
) -> tuple[float, float]:
    """Our SFT stage (recipes/sft.py with the tiny default's settings and `setting`): tokens/s, peak RSS (MB).

    `micro_batch`: rows per forward, accumulated to `batch` rows per optimizer step."""
    micro_batch = micro_batch or batch
    if batch % micro_batch:
        raise ValueError(f"batch {batch} is not a multiple of the micro-batch {micro_batch}")
    with tempfile.TemporaryDirectory() as out:
        _, rss = run_timed([
            sys.executable, str(REPO / "recipes/sft.py"), "--config", str(REPO / "recipes/configs/tiny/sft.yaml"),
            "--model_name_or_path", str(model), "--dataset_name", data, "--output_dir", out,
            "--max_steps", str(steps), "--per_device_train_batch_size", str(micro_batch),
            "--gradient_accumulation_steps", str(batch // micro_batch), "--max_length", str(max_length),
            "--learning_rate", "1e-3", "--logging_steps", str(steps), "--save_strategy", "no",
            "--report_to", "none", "--disable_tqdm", "true", "--max_eval_samples", "1", *setting,
        ])  # fmt: skip
        log = json.loads((Path(out) / "trainer_state.json").read_text())["log_history"]
        tokens = max(entry.get("num_tokens", 0) for entry in log)
        runtime = json.loads((Path(out) / "metrics.json").read_text())["train_runtime"]
        return tokens / runtime, rss


def peer(model: Path, data: str, steps: int, batch: int, max_length: int, setting: list[str]) -> tuple[float, float]:
    """The plain TRL script with `setting`: tokens/s and peak RSS (MB)."""
    stdout, rss = run_timed([
        sys.executable, str(REPO / "bench/peers/trl_sft.py"), "--model", str(model), "--data", data,
        "--steps", str(steps), "--batch_size", str(batch), "--max_length", str(max_length), *setting,
    ])  # fmt: skip
    result = json.loads(stdout.strip().splitlines()[-1])
    return result["tokens"] / result["runtime"], rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument(
        "--from_runs", action="store_true", help="summarise bench/results/sft_runs.jsonl (an interrupted run) instead"
    )
    args = parser.parse_args()
    model = bench_model()
    data = bench_data(args.steps * args.batch * 4)
    speed: dict[str, list[float]] = {name: [] for name in [*OUR_SETTINGS, *PEER_SETTINGS]}
    rss: dict[str, list[float]] = {name: [] for name in speed}
    progress = RESULTS / "sft_runs.jsonl"  # one line per finished run, so a stalled run loses nothing before it
    progress.parent.mkdir(parents=True, exist_ok=True)
    if args.from_runs:
        for line in progress.read_text().splitlines():
            run = json.loads(line)
            speed[run["setting"]].append(run["tokens_per_s"])
            rss[run["setting"]].append(run["peak_rss_mb"])
        args.repeats = min(len(values) for values in speed.values())
        if not args.repeats:
            raise SystemExit(f"{progress} holds no finished run of every setting")
    else:
        progress.write_text("")
        for repeat in range(args.repeats):  # alternate the sides within each repeat
            for name in speed:
                if name in OUR_SETTINGS:
                    tokens_per_s, peak = ours(
                        model, data, args.steps, args.batch, args.max_length, OUR_SETTINGS[name], MICRO_BATCH.get(name)
                    )
                else:
                    tokens_per_s, peak = peer(
                        model, data, args.steps, args.batch, args.max_length, PEER_SETTINGS[name]
                    )
                speed[name].append(tokens_per_s)
                rss[name].append(peak)
                with progress.open("a") as f:
                    f.write(json.dumps({"repeat": repeat, "setting": name, "tokens_per_s": tokens_per_s, "peak_rss_mb": peak}) + "\n")
                print(f"{name}: {tokens_per_s:.0f} tokens/s, peak RSS {peak:.0f} MB", flush=True)
    table = {name: summary(values) for name, values in speed.items()}
    fastest = max(PEER_SETTINGS, key=lambda n: table[n]["median"])
    best = max(OUR_SETTINGS, key=lambda n: table[n]["median"])
    n_params = parameters(model)
    result = {
        "tokens_per_s_ours": table[best]["median"],
        "our_fastest_setting": best,
        "tokens_per_s_trl_default": table["trl_default"]["median"],
        "tokens_per_s_trl_fastest": table[fastest]["median"],
        "trl_fastest_setting": fastest,
        "peak_rss_mb_ours": max(rss[best]),
        "peak_rss_mb_trl_default": max(rss["trl_default"]),
        "peak_rss_mb_trl_fastest": max(rss[fastest]),
        "ratio_vs_trl_default": table[best]["median"] / table["trl_default"]["median"],
        "ratio_vs_trl_fastest": table[best]["median"] / table[fastest]["median"],
        "rss_ratio_vs_trl_default": max(rss[best]) / max(rss["trl_default"]),
        "rss_ratio_vs_trl_fastest": max(rss[best]) / max(rss[fastest]),
        "tokens_per_s": table,
        "peak_rss_mb": {name: max(values) for name, values in rss.items()},
        "runs": speed,
        "settings": {"model_parameters": n_params, "steps": args.steps, "batch": args.batch,
                     "max_length": args.max_length, "micro_batch": MICRO_BATCH, "data": f"first {args.steps * args.batch * 4} rows of data/tiny/sft.jsonl",
                     "repeats": args.repeats},
        "machine": machine(),
    }  # fmt: skip
    for name, s in table.items():
        print(f"{name:22s} tokens/s min {s['min']:8.0f} median {s['median']:8.0f} max {s['max']:8.0f}  "
              f"peak RSS {max(rss[name]):6.0f} MB  ours/this x{table[best]['median'] / s['median']:.2f}")
    print(f"our fastest setting: {best}; TRL's fastest setting here: {fastest}")
    write_result("sft", result)


if __name__ == "__main__":
    main()
