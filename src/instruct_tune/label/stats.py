"""A project's numbers: items done, per-labeller counts, and agreement on the prompts several labellers ranked.

Served as JSON by ``/api/stats`` (drawn by the stats page) and printed by ``instruct-tune label stats``. Only
counts and agreement figures: no prompt or response text, so any logged-in labeller may see them.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from typing import Any

from instruct_tune.label.agreement import fractional_ranks, ordinal_alpha, pairwise_agreement
from instruct_tune.label.db import FLAGS, labelers, settings
from instruct_tune.label.labels import active_labels


def project_stats(conn: sqlite3.Connection) -> dict[str, Any]:
    """Counts per labeller and agreement (pairwise and Krippendorff's ordinal alpha) over shared items."""
    labels = active_labels(conn)
    k_of = dict(conn.execute("SELECT item_id, COUNT(*) FROM responses GROUP BY item_id").fetchall())
    held = dict(
        conn.execute(
            "SELECT b.name, COUNT(a.id) FROM labelers b LEFT JOIN assignments a ON a.labeler_id = b.id GROUP BY b.id"
        ).fetchall()
    )
    per: dict[str, dict[str, Any]] = {
        who.name: {"labels": 0, "none_acceptable": 0, "ties": 0, "better_answers": 0, "open": 0}
        | {f"flag_{f}": 0 for f in FLAGS}
        for who in labelers(conn)
    }
    ranks: dict[int, dict[str, list[float]]] = defaultdict(dict)
    for label in labels:
        row = per[label.labeler]
        row["labels"] += 1
        row["none_acceptable"] += label.none_acceptable
        row["ties"] += any(len(t) > 1 for t in label.tiers)
        row["better_answers"] += label.better_answer is not None
        for names in label.flags.values():
            for name in names:
                row[f"flag_{name}"] += 1
        if label.tiers:
            ranks[label.item_id][label.labeler] = fractional_ranks(label.tiers, k_of[label.item_id])
    for name, row in per.items():
        row["open"] = held.get(name, 0) - row["labels"]
    shared = [by for by in ranks.values() if len(by) >= 2]
    agreement, by_labeler = pairwise_agreement(shared)
    for name, (ok, n) in by_labeler.items():
        per[name]["agreement"] = ok / n if n else None
    units = [[r[i] for r in by.values()] for by in shared for i in range(len(next(iter(by.values()))))]
    n_items, overlap_items = conn.execute("SELECT COUNT(*), SUM(copies > 1) FROM items").fetchone()
    labelled = len({label.item_id for label in labels})
    return {
        "project": settings(conn).get("name"),
        "items": n_items,
        "overlap_items": overlap_items or 0,
        "items_labelled": labelled,
        "labels": len(labels),
        "shared_items_ranked": len(shared),
        "pairwise_agreement": agreement,
        "krippendorff_alpha_ordinal": ordinal_alpha(units),
        "labelers": [{"name": name, **row} for name, row in per.items()],
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def format_stats(stats: dict[str, Any]) -> str:
    """The stats as a text report: a summary line, agreement, then one table row per labeller."""
    lines = [
        f"project {stats['project']}: {stats['items_labelled']}/{stats['items']} items labelled, "
        f"{stats['labels']} labels, {stats['overlap_items']} items set to overlap",
        f"agreement on {stats['shared_items_ranked']} items ranked by 2+ labellers: pairwise "
        f"{_fmt(stats['pairwise_agreement'])}, Krippendorff's alpha (ordinal) {_fmt(stats['krippendorff_alpha_ordinal'])}",
    ]
    columns = ["name", "labels", "open", "none_acceptable", "ties", "better_answers"]
    columns += [f"flag_{f}" for f in FLAGS] + ["agreement"]
    table = [columns] + [[_fmt(row.get(c)) for c in columns] for row in stats["labelers"]]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table]
    return "\n".join(lines)
