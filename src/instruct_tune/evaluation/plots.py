"""Eval's plots: PPO training curves, reward histograms and gold score per task family (PNG, no display)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

TRAINING_PLOT, REWARD_PLOT, FAMILY_PLOT = "ppo_training.png", "reward_hist.png", "gold_by_family.png"


def training_log(folder: str) -> list[dict[str, Any]]:
    """The per-step log of a PPO run folder (`trainer_state.json` entries that have a `step`)."""
    path = Path(folder) / "trainer_state.json"
    if not path.is_file():
        return []
    history = json.loads(path.read_text()).get("log_history", [])
    return [entry for entry in history if "step" in entry]


def plot_training(path: Path, logs: Mapping[str, list[dict[str, Any]]]) -> bool:
    """objective/scores and objective/kl over PPO steps, one line per policy; False when no log has them."""
    keys = ("objective/scores", "objective/kl")
    logs = {name: log for name, log in logs.items() if any(k in e for e in log for k in keys)}
    if not logs:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key in zip(axes, keys, strict=True):
        for name, log in logs.items():
            points = [(e["step"], e[key]) for e in log if key in e]
            ax.plot([s for s, _ in points], [v for _, v in points], marker=".", label=name)
        ax.set_xlabel("PPO step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_rewards(path: Path, rewards: Mapping[str, list[float]]) -> None:
    """Histogram of the reward-model scores of each policy's sampled responses."""
    plt = _pyplot()
    values = [v for vs in rewards.values() for v in vs]
    low, high = min(values), max(values)
    bins = [low + (high - low + 1e-9) * i / 30 for i in range(31)]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, vs in rewards.items():
        mean = sum(vs) / len(vs) if vs else float("nan")
        ax.hist(vs, bins=bins, histtype="step", linewidth=1.5, label=f"{name} (mean {mean:.2f})")
    ax.set_xlabel("reward (normalised: SFT samples average 0)")
    ax.set_ylabel("responses")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_families(path: Path, per_policy: Mapping[str, Mapping[str, float]], families: Sequence[str]) -> None:
    """Mean gold score per task family and policy (sampled), grouped bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.8 / len(per_policy)
    for i, (name, m) in enumerate(per_policy.items()):
        xs = [j + i * width for j in range(len(families))]
        ax.bar(xs, [m.get(f"gold/{f}", 0.0) for f in families], width=width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(families))], families)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean gold score (sampled)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
