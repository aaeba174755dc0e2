"""Submitted labels: checked, stored (committed before the request answers), undone, read back.

A label, as the page sends it, speaks of display *slots* (the order the labeller saw); it is stored in
response indices, with the display order beside it:

- ``tiers``: lists of slots, best first; slots in one list are tied. Every slot appears once, or the list
  is empty when ``none_acceptable`` (the labeller found no response acceptable and need not rank them);
- ``flags``: ``{slot: [flag, ...]}`` with flags from ``db.FLAGS`` (InstructGPT's metadata);
- ``better_answer``: the labeller's own answer (a demonstration for SFT), or empty.

Undo marks the labeller's latest label undone (kept for the record, no longer counted); the item is then
the labeller's open assignment again and comes back first.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from instruct_tune.label.db import FLAGS, immediate, now

MAX_ANSWER_CHARS = 20_000


class LabelError(ValueError):
    """A label that cannot be stored: ``status`` is the HTTP status that says why (400, 404, 409)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Label:
    """A label that counts, in response indices."""

    item_id: int
    labeler: str
    tiers: list[list[int]]
    none_acceptable: bool
    flags: dict[int, list[str]]
    better_answer: str | None
    display_order: list[int]


def _tiers(value: Any, k: int, none_acceptable: bool) -> list[list[int]]:
    if not isinstance(value, list) or not all(isinstance(t, list) and t for t in value):
        raise LabelError("tiers must be a list of non-empty lists of slots")
    slots = [s for tier in value for s in tier]
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in slots):
        raise LabelError("tiers must hold slot numbers")
    if not slots and none_acceptable:
        return []
    if sorted(slots) != list(range(k)):
        raise LabelError(f"tiers must place each of the {k} responses exactly once (got {slots})")
    return value


def _flags(value: Any, k: int) -> dict[int, list[str]]:
    if not isinstance(value, Mapping):
        raise LabelError("flags must be an object {slot: [flag, ...]}")
    out: dict[int, list[str]] = {}
    for key, names in value.items():
        slot = int(key) if str(key).isdigit() else -1
        if not 0 <= slot < k:
            raise LabelError(f"flags name slot {key!r}, which is not one of 0..{k - 1}")
        if not isinstance(names, list) or any(n not in FLAGS for n in names):
            raise LabelError(f"flags of slot {slot} must be a list of {', '.join(FLAGS)}")
        if names:
            out[slot] = sorted(set(names), key=FLAGS.index)
    return out


def _answer(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise LabelError("better_answer must be text")
    if len(value) > MAX_ANSWER_CHARS:
        raise LabelError(f"better_answer is longer than {MAX_ANSWER_CHARS} characters")
    return value.strip() or None


def submit_label(
    conn: sqlite3.Connection, labeler_id: int, assignment_id: Any, body: Mapping[str, Any]
) -> int:
    """Check and store a label of the labeller's open assignment; returns the label's id once committed."""
    if not isinstance(assignment_id, int) or isinstance(assignment_id, bool):
        raise LabelError("assignment_id must be a number")
    none_acceptable = body.get("none_acceptable", False)
    if not isinstance(none_acceptable, bool):
        raise LabelError("none_acceptable must be true or false")
    with immediate(conn):
        row = conn.execute(
            "SELECT display_order FROM assignments WHERE id = ? AND labeler_id = ?",
            (assignment_id, labeler_id),
        ).fetchone()
        if row is None:
            raise LabelError("no such assignment of yours", 404)
        order: list[int] = json.loads(row["display_order"])
        k = len(order)
        tiers = _tiers(body.get("tiers"), k, none_acceptable)
        flags = _flags(body.get("flags") or {}, k)
        answer = _answer(body.get("better_answer"))
        if conn.execute(
            "SELECT 1 FROM labels WHERE assignment_id = ? AND undone_at IS NULL", (assignment_id,)
        ).fetchone():
            raise LabelError("this item is already labelled (undo the label to change it)", 409)
        cur = conn.execute(
            "INSERT INTO labels (assignment_id, tiers, none_acceptable, flags, better_answer, display_order, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                assignment_id,
                json.dumps([[order[s] for s in tier] for tier in tiers]),
                int(none_acceptable),
                json.dumps({str(order[s]): names for s, names in sorted(flags.items())}),
                answer,
                json.dumps(order),
                now(),
            ),
        )
        return int(cur.lastrowid)


def undo_last(conn: sqlite3.Connection, labeler_id: int) -> int | None:
    """Mark the labeller's latest counting label undone; returns its assignment id (None: nothing to undo)."""
    with immediate(conn):
        row = conn.execute(
            "SELECT l.id, l.assignment_id FROM labels l JOIN assignments a ON a.id = l.assignment_id "
            "WHERE a.labeler_id = ? AND l.undone_at IS NULL ORDER BY l.id DESC LIMIT 1",
            (labeler_id,),
        ).fetchone()
        if row is None:
            return None
        conn.execute("UPDATE labels SET undone_at = ? WHERE id = ?", (now(), row["id"]))
        return int(row["assignment_id"])


def active_labels(conn: sqlite3.Connection) -> list[Label]:
    """Every label that counts (not undone), by item then labeller."""
    rows = conn.execute(
        "SELECT a.item_id, b.name, l.tiers, l.none_acceptable, l.flags, l.better_answer, l.display_order "
        "FROM labels l JOIN assignments a ON a.id = l.assignment_id JOIN labelers b ON b.id = a.labeler_id "
        "WHERE l.undone_at IS NULL ORDER BY a.item_id, b.id"
    )
    return [
        Label(
            item_id=r["item_id"],
            labeler=r["name"],
            tiers=json.loads(r["tiers"]),
            none_acceptable=bool(r["none_acceptable"]),
            flags={int(i): names for i, names in json.loads(r["flags"]).items()},
            better_answer=r["better_answer"],
            display_order=json.loads(r["display_order"]),
        )
        for r in rows
    ]


def items_by_id(conn: sqlite3.Connection) -> dict[int, dict[str, Any]]:
    """``{item_id: {"prompt", "responses" (texts by idx), "extra"}}`` of every item."""
    items = {
        r["id"]: {"prompt": json.loads(r["prompt"]), "responses": [], "extra": json.loads(r["extra"])}
        for r in conn.execute("SELECT id, prompt, extra FROM items ORDER BY id")
    }
    for r in conn.execute("SELECT item_id, text FROM responses ORDER BY item_id, idx"):
        items[r["item_id"]]["responses"].append(r["text"])
    return items
