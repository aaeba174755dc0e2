"""Which item a labeller gets next, and how far they are.

**Overlap.** At project creation a seeded share of the items (``--overlap``) is set to go to
``--overlap-labelers`` labellers; the rest go to one. Items are handed out in a seeded shuffled order,
items another labeller already holds first, so shared items are completed early and agreement can be
measured before the whole set is done.

**Assignment** happens in one ``BEGIN IMMEDIATE`` transaction: the item's free copies are counted and the
assignment row written while no other writer can run, so two labellers asking at the same moment never both
get the last copy of an item (and ``UNIQUE(item_id, labeler_id)`` stops one labeller getting an item twice).
A labeller first gets back what they hold unlabelled (an undone label first), so a reload or a server
restart shows the same item again; an item someone holds and never labels stays theirs.
"""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from instruct_tune.label.db import immediate, now, settings


def plan_overlap(
    n_items: int, overlap: float, overlap_labelers: int, seed: int
) -> tuple[list[int], list[int]]:
    """``(copies, order)`` per item: ``round(overlap * n_items)`` seeded items go to ``overlap_labelers``
    labellers, the others to one; ``order`` is each item's position in the seeded hand-out order."""
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"--overlap {overlap} is not a share between 0 and 1")
    if overlap_labelers < 1:
        raise ValueError(f"--overlap-labelers {overlap_labelers} must be at least 1")
    rng = random.Random(seed)
    shuffled = list(range(n_items))
    rng.shuffle(shuffled)
    order = [0] * n_items
    for position, item in enumerate(shuffled):
        order[item] = position
    shared = set(rng.sample(range(n_items), round(overlap * n_items)))
    return [overlap_labelers if i in shared else 1 for i in range(n_items)], order


@dataclass(frozen=True)
class Assignment:
    """An item as one labeller sees it: responses in their display order (slot 0 first)."""

    id: int
    item_id: int
    prompt: list[dict[str, str]]
    responses: list[dict[str, Any]]  # {"text", "ended"} per slot
    display_order: list[int]  # response idx shown in each slot
    draft: dict[str, Any] | None  # an undone label of this assignment, in slots, to start from

    def as_json(self) -> dict[str, Any]:
        return {
            "assignment_id": self.id,
            "prompt": self.prompt,
            "responses": [{"slot": s, **r} for s, r in enumerate(self.responses)],
            "draft": self.draft,
        }


_OPEN = """
SELECT a.id, a.item_id, a.display_order,
       (SELECT MAX(l.undone_at) FROM labels l WHERE l.assignment_id = a.id) AS last_undo
FROM assignments a
WHERE a.labeler_id = ?
  AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.assignment_id = a.id AND l.undone_at IS NULL)
ORDER BY last_undo IS NULL, last_undo DESC, a.id
LIMIT 1
"""

_FREE = """
SELECT i.id, (SELECT COUNT(*) FROM assignments a WHERE a.item_id = i.id) AS taken
FROM items i
WHERE taken < i.copies
  AND NOT EXISTS (SELECT 1 FROM assignments a WHERE a.item_id = i.id AND a.labeler_id = :who)
ORDER BY taken > 0 DESC, i.position
"""


def next_assignment(conn: sqlite3.Connection, labeler_id: int) -> Assignment | None:
    """The labeller's open assignment, else a new one (in one ``BEGIN IMMEDIATE``); None when nothing is left."""
    seed = settings(conn).get("seed", 0)
    with immediate(conn):
        row = conn.execute(_OPEN, (labeler_id,)).fetchone()
        if row is not None:
            assignment_id, item_id, order = row["id"], row["item_id"], json.loads(row["display_order"])
        else:
            free = conn.execute(_FREE + " LIMIT 1", {"who": labeler_id}).fetchone()
            if free is None:
                return None
            item_id = free["id"]
            k = conn.execute("SELECT COUNT(*) FROM responses WHERE item_id = ?", (item_id,)).fetchone()[0]
            order = list(range(k))
            random.Random(f"{seed}/{item_id}/{labeler_id}").shuffle(order)
            assignment_id = conn.execute(
                "INSERT INTO assignments (item_id, labeler_id, display_order, assigned_at) VALUES (?, ?, ?, ?)",
                (item_id, labeler_id, json.dumps(order), now()),
            ).lastrowid
    return _load(conn, assignment_id, item_id, order)


def _load(conn: sqlite3.Connection, assignment_id: int, item_id: int, order: list[int]) -> Assignment:
    prompt = json.loads(conn.execute("SELECT prompt FROM items WHERE id = ?", (item_id,)).fetchone()[0])
    by_idx = {
        r["idx"]: {"text": r["text"], "ended": bool(r["ended"])}
        for r in conn.execute("SELECT idx, text, ended FROM responses WHERE item_id = ?", (item_id,))
    }
    undone = conn.execute(
        "SELECT tiers, none_acceptable, flags, better_answer FROM labels WHERE assignment_id = ? "
        "AND undone_at IS NOT NULL ORDER BY undone_at DESC, id DESC LIMIT 1",
        (assignment_id,),
    ).fetchone()
    return Assignment(
        assignment_id,
        item_id,
        prompt,
        [by_idx[i] for i in order],
        order,
        _draft(undone, order) if undone else None,
    )


def _draft(row: sqlite3.Row, order: Sequence[int]) -> dict[str, Any]:
    """A stored label (response idx) in the slots of ``order``."""
    slot = {idx: s for s, idx in enumerate(order)}
    return {
        "tiers": [[slot[i] for i in tier] for tier in json.loads(row["tiers"])],
        "none_acceptable": bool(row["none_acceptable"]),
        "flags": {str(slot[int(i)]): names for i, names in json.loads(row["flags"]).items()},
        "better_answer": row["better_answer"] or "",
    }


def progress(conn: sqlite3.Connection, labeler_id: int) -> dict[str, int]:
    """``done`` (labels that count), ``remaining`` (held unlabelled + free items this labeller could still get)."""
    done = conn.execute(
        "SELECT COUNT(*) FROM labels l JOIN assignments a ON a.id = l.assignment_id "
        "WHERE a.labeler_id = ? AND l.undone_at IS NULL",
        (labeler_id,),
    ).fetchone()[0]
    held = conn.execute("SELECT COUNT(*) FROM assignments WHERE labeler_id = ?", (labeler_id,)).fetchone()[0]
    free = len(conn.execute(_FREE, {"who": labeler_id}).fetchall())
    return {"done": done, "remaining": held - done + free}
