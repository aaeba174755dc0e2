"""What the benchmarks share: the GPT-2 they train, timing of fresh processes, min/median/max summaries."""

from __future__ import annotations

import json
import platform
import re
import statistics
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "bench" / ".work"
RESULTS = REPO / "bench" / "results"


def bench_model(n_embd: int = 384, n_layer: int = 6, n_head: int = 6, n_positions: int = 256) -> Path:
    """A randomly initialised GPT-2 (about 11M parameters) with the tiny default's tokenizer, built once."""
    out = WORK / f"gpt2-{n_embd}x{n_layer}"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(REPO / "models" / "tiny-gpt2")
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=n_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        activation_function="gelu_pytorch_tanh", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def parameters(model_dir: Path) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())


def run_timed(command: list[str], env: dict | None = None, timeout: float | None = None) -> tuple[str, float]:
    """Run `command` in a fresh process; returns its stdout and peak RSS in MB (from /usr/bin/time).

    Raises `subprocess.TimeoutExpired` after `timeout` seconds (a stalled run must not hold up the others)."""
    out = subprocess.run(
        ["/usr/bin/time", "-f", "MAXRSS_KB %M", *command],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )  # from the repo root: configs name their data relative to it
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
    rss = int(re.findall(r"MAXRSS_KB (\d+)", out.stderr)[-1]) / 1024
    return out.stdout, rss


def summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def machine() -> dict[str, str | int]:
    import os

    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count() or 0,
        "python": platform.python_version(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset (torch uses every core)"),
    }


def write_result(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
