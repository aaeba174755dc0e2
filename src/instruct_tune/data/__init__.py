"""Data layer: read sources, detect their format, convert to TRL's conversational form, mix and split.

Typical use::

    ds, report = load_source("data/sft.jsonl", "sft")
    mix, reports = load_mixture([DataSource("a.jsonl", 0.5), DataSource("org/ds", 2.0)], "preference")
    train, evals = split_train_eval(mix, 0.05, seed=0)
"""

from .check import CheckResult, check_source, format_check
from .errors import DataError, LoadReport
from .formats import FORMATS, KIND_FORMATS, KINDS, Kind, convert_rows, detect_format
from .mixture import DataSource, load_mixture, load_source, split_train_eval
from .readers import RawSource, read_source

__all__ = [
    "FORMATS",
    "KINDS",
    "KIND_FORMATS",
    "CheckResult",
    "DataError",
    "DataSource",
    "Kind",
    "LoadReport",
    "RawSource",
    "check_source",
    "convert_rows",
    "detect_format",
    "format_check",
    "load_mixture",
    "load_source",
    "read_source",
    "split_train_eval",
]
