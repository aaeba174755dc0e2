"""Labels out: rankings in the ``ranking`` format of DESIGN section 4, written answers as ``messages`` rows.

**Merge rule** (one prompt, one or more labellers). A label marked "none acceptable", or one ranking every
response equal, says nothing about which response is better: it is left out and counted. The rest are merged
by **mean fractional rank** per response (``agreement.fractional_ranks``; exact fractions, no rounding), best
first; responses with equal mean rank stay tied. A prompt left with no label, or tied throughout, is dropped
and counted by reason.

**Ties.** The ``ranking`` format needs a strict order (every row gives all its C(K,2) pairs), so a merged
ranking with ties is written as several rows over subsets of the responses, each a strict chain through the
tiers, chosen so that every pair of responses in different tiers appears in exactly one row and no tied pair
in any: the reward model sees each preference once and no invented one. A strict merged ranking is one row.
Rows keep the prompt's ``prompt_id`` (rows of one prompt share it) and the source's extra columns (``task``).

**Demonstrations**: every counting label with a written answer gives ``{"messages": prompt + answer}``.

**Hub**: ``push_export`` uploads both files and a dataset card to a dataset repo in one commit through
``instruct_tune.hub`` (``datasets.load_dataset("owner/name")`` then reads the rankings as the default config).
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from instruct_tune.label.db import settings
from instruct_tune.label.labels import Label, active_labels, items_by_id


def mean_ranks(rankings: Sequence[Sequence[Sequence[int]]], k: int) -> list[Fraction]:
    """Mean fractional rank of each of ``k`` responses over rankings given as tiers (1 = best)."""
    total = [Fraction(0)] * k
    for tiers in rankings:
        position = 0
        for tier in tiers:
            for i in tier:
                total[i] += position + Fraction(len(tier) + 1, 2)
            position += len(tier)
    return [t / len(rankings) for t in total]


def merge_rankings(rankings: Sequence[Sequence[Sequence[int]]], k: int) -> list[list[int]]:
    """The merged ranking as tiers, best first: responses grouped by equal mean rank."""
    means = mean_ranks(rankings, k)
    tiers: dict[Fraction, list[int]] = {}
    for i in sorted(range(k), key=lambda i: (means[i], i)):
        tiers.setdefault(means[i], []).append(i)
    return list(tiers.values())


def strict_chains(tiers: Sequence[Sequence[int]]) -> list[list[int]]:
    """Chains (best first, at most one response per tier) covering every cross-tier pair exactly once.

    Greedy: each chain starts from the first pair not yet covered, then takes from every other tier, in
    order, the first response whose pairs with the whole chain are all uncovered.
    """
    tier_of = {i: t for t, tier in enumerate(tiers) for i in tier}
    ordered = [i for tier in tiers for i in tier]
    uncovered = {(a, b) for a in ordered for b in ordered if tier_of[a] < tier_of[b]}
    chains = []
    while uncovered:
        first = min(uncovered, key=lambda p: (ordered.index(p[0]), ordered.index(p[1])))
        chain = list(first)
        for t, tier in enumerate(tiers):
            if t in (tier_of[first[0]], tier_of[first[1]]):
                continue
            for i in tier:
                if all(((i, c) if t < tier_of[c] else (c, i)) in uncovered for c in chain):
                    chain.append(i)
                    break
        chain.sort(key=lambda i: tier_of[i])
        uncovered -= {(a, b) for n, a in enumerate(chain) for b in chain[n + 1 :]}
        chains.append(chain)
    return chains


@dataclass
class ExportReport:
    """What an export wrote and what it left out, and why."""

    items: int = 0
    rows: int = 0
    prompts_exported: int = 0
    prompts_with_ties: int = 0
    labels_used: int = 0
    labels_left_out: Counter = field(default_factory=Counter)  # reason -> labels
    prompts_dropped: Counter = field(default_factory=Counter)  # reason -> prompts
    demonstrations: int = 0

    def summary(self) -> str:
        def reasons(counts: Counter) -> str:
            return ", ".join(f"{n} {why}" for why, n in sorted(counts.items())) or "none"

        return (
            f"{self.rows} ranking rows from {self.prompts_exported} of {self.items} prompts "
            f"({self.prompts_with_ties} with ties, split into strict chains), {self.labels_used} labels merged; "
            f"labels left out: {reasons(self.labels_left_out)}; prompts dropped: {reasons(self.prompts_dropped)}; "
            f"{self.demonstrations} demonstrations"
        )


def _usable(label: Label) -> str | None:
    """Why a label is left out of the merge, or None when it counts."""
    if label.none_acceptable:
        return "none acceptable"
    if len(label.tiers) < 2:
        return "all tied"
    return None


def ranking_rows(conn: sqlite3.Connection, report: ExportReport) -> list[dict[str, Any]]:
    """The ``ranking`` rows of every labelled prompt, merged by the module's rule; counts go to ``report``."""
    items = items_by_id(conn)
    report.items = len(items)
    by_item: dict[int, list[Label]] = {}
    for label in active_labels(conn):
        by_item.setdefault(label.item_id, []).append(label)
    rows = []
    for item_id, item in items.items():
        labels = by_item.get(item_id, [])
        if not labels:
            report.prompts_dropped["unlabelled"] += 1
            continue
        reasons = [_usable(label) for label in labels]
        report.labels_left_out.update(r for r in reasons if r)
        used = [label.tiers for label, why in zip(labels, reasons, strict=True) if why is None]
        if not used:
            report.prompts_dropped[Counter(reasons).most_common(1)[0][0]] += 1
            continue
        k = len(item["responses"])
        tiers = merge_rankings(used, k)
        if len(tiers) < 2:
            report.prompts_dropped["tied after merging"] += 1
            continue
        report.labels_used += len(used)
        report.prompts_exported += 1
        report.prompts_with_ties += len(tiers) < k
        for chain in strict_chains(tiers):
            subset = sorted(chain)  # responses in their stored order, `ranking` best first
            rows.append(
                {
                    "prompt": item["prompt"],
                    "responses": [item["responses"][i] for i in subset],
                    "ranking": [subset.index(i) for i in chain],
                    "prompt_id": item_id,
                    "n_labelers": len(used),
                    **item["extra"],
                }
            )
    report.rows = len(rows)
    return rows


def demonstration_rows(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """One ``messages`` row (prompt + the labeller's answer) per counting label with a written answer."""
    items = items_by_id(conn)
    return [
        {
            "messages": [
                *items[label.item_id]["prompt"],
                {"role": "assistant", "content": label.better_answer},
            ],
            "prompt_id": label.item_id,
            "labeler": label.labeler,
            **items[label.item_id]["extra"],
        }
        for label in active_labels(conn)
        if label.better_answer
    ]


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> int:
    """Write ``rows`` as JSON lines (UTF-8, ``\\n``); returns how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def export_project(
    conn: sqlite3.Connection, out: str | Path, demonstrations: str | Path | None = None
) -> ExportReport:
    """Write the rankings to ``out`` (and the demonstrations to ``demonstrations``) as JSONL."""
    report = ExportReport()
    write_jsonl(ranking_rows(conn, report), out)
    demos = demonstration_rows(conn)
    report.demonstrations = len(demos)
    if demonstrations is not None:
        write_jsonl(demos, demonstrations)
    return report


_CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: rankings.jsonl
{demos_config}tags:
- instruct-tune
- rlhf
- human-feedback
---
# {name}

Human rankings from the `instruct-tune label` app: {summary}.

`rankings.jsonl` is in the `ranking` format (`prompt`, `responses`, `ranking` = response indices best first),
read by `instruct-tune reward` as is; rows sharing a `prompt_id` come from one prompt whose merged ranking had
ties. Labellers' rankings of a shared prompt were merged by mean rank; "none acceptable" and all-tied labels
were left out.{demos_note}
"""


def push_export(
    conn: sqlite3.Connection, repo_id: str, *, private: bool = False, commit_message: str | None = None
) -> tuple[ExportReport, str]:
    """Export to a temporary folder and push it to the dataset repo ``repo_id`` in one commit; returns the
    report and the commit URL."""
    from instruct_tune.hub import Upload, check_repo_id, push_files

    check_repo_id(repo_id)
    name = settings(conn).get("name", "labels")
    with tempfile.TemporaryDirectory(prefix="label-export-") as tmp:
        folder = Path(tmp)
        report = export_project(conn, folder / "rankings.jsonl", folder / "demonstrations.jsonl")
        if report.demonstrations == 0:
            (folder / "demonstrations.jsonl").unlink()
        has_demos = report.demonstrations > 0
        (folder / "README.md").write_text(
            _CARD.format(
                name=name,
                summary=report.summary(),
                demos_config=(
                    "- config_name: demonstrations\n  data_files:\n  - split: train\n    path: demonstrations.jsonl\n"
                    if has_demos
                    else ""
                ),
                demos_note=(
                    " `demonstrations.jsonl` (config `demonstrations`) holds the labellers' own answers as "
                    "`messages` rows, for SFT."
                    if has_demos
                    else ""
                ),
            ),
            encoding="utf-8",
        )
        uploads = [Upload(p, p.name, p.stat().st_size) for p in sorted(folder.iterdir())]
        url = push_files(
            uploads,
            repo_id,
            repo_type="dataset",
            private=private,
            commit_message=commit_message or f"Upload labels of {name} from instruct-tune",
        )
    return report, url
