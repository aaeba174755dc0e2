"""`evaluate` metric modules shipped with the package, loaded by path (offline; no Hub lookup).

    from instruct_tune.metrics import load_metric
    load_metric("win_rate").compute(scores_a=[3, 1, 2], scores_b=[1, 2, 2])     # {"win_rate": 0.5, ...}
    load_metric("win_rate", "outcomes").compute(outcomes=[1, 0, 0.5])           # {"win_rate": 0.5, ...}
    load_metric("perplexity").compute(nll=[4.2, 3.1], tokens=[3, 2])            # exp(7.3 / 5)
    load_metric("reference_match").compute(predictions=["1, 2"], references=["1, 2"])

Each module is a plain `evaluate.Metric` file under `metrics/<name>/<name>.py`, so
`evaluate.load("<path to that file>")` gives the same module without this package's helper.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("win_rate", "perplexity", "reference_match")


def metric_path(name: str) -> Path:
    """The file of a shipped metric module."""
    path = METRICS_DIR / name / f"{name}.py"
    if not path.is_file():
        raise ValueError(f"unknown metric {name!r} (shipped: {', '.join(METRIC_NAMES)})")
    return path


def load_metric(name: str, config_name: str | None = None) -> Any:
    """Load a shipped metric module with `evaluate.load` by path, computed in memory (no cache files)."""
    import evaluate

    return evaluate.load(str(metric_path(name)), config_name, keep_in_memory=True)
