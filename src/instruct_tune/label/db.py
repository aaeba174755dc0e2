"""A labelling project's SQLite database: schema, connections, project creation and labeller tokens.

**Durability.** The database runs in WAL mode with ``synchronous=FULL``: a transaction is on disk when
``COMMIT`` returns, and every request that writes commits before it answers, so killing the server (even
with SIGKILL) loses no submitted label; SQLite replays the WAL when the next connection opens it.
Each request opens its own connection (cheap for SQLite), so threads never share one.

**Tokens.** A labeller's token is 32 random bytes (``secrets.token_urlsafe``), printed once and stored only
as its SHA-256. A slow hash (scrypt) protects low-entropy passwords against guessing; a 256-bit random token
cannot be guessed, so the fast hash loses nothing and lets every request be checked by one indexed lookup.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

LABELS_DIR = Path("labels")
SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS project (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    position INTEGER NOT NULL,           -- the order items are handed out in (a seeded shuffle)
    prompt TEXT NOT NULL,                -- JSON: chat messages ending in a user turn
    extra TEXT NOT NULL DEFAULT '{}',    -- JSON: source columns carried into the export (task, ids)
    copies INTEGER NOT NULL              -- how many labellers the item goes to (more than 1: overlap)
);
CREATE TABLE IF NOT EXISTS responses (
    item_id INTEGER NOT NULL REFERENCES items(id),
    idx INTEGER NOT NULL,
    text TEXT NOT NULL,
    ended INTEGER NOT NULL DEFAULT 1,    -- whether the sample ended with EOS (0: cut at max_new_tokens)
    PRIMARY KEY (item_id, idx)
);
CREATE TABLE IF NOT EXISTS labelers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_hash TEXT NOT NULL UNIQUE,     -- sha256 hex of the token; the token itself is never stored
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    id INTEGER PRIMARY KEY,
    item_id INTEGER NOT NULL REFERENCES items(id),
    labeler_id INTEGER NOT NULL REFERENCES labelers(id),
    display_order TEXT NOT NULL,         -- JSON: response idx in the order shown to this labeller
    assigned_at TEXT NOT NULL,
    UNIQUE (item_id, labeler_id)
);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY,
    assignment_id INTEGER NOT NULL REFERENCES assignments(id),
    tiers TEXT NOT NULL,                 -- JSON: lists of response idx, best first; several in one = a tie
    none_acceptable INTEGER NOT NULL,
    flags TEXT NOT NULL,                 -- JSON: {"idx": [flag, ...]}
    better_answer TEXT,                  -- the labeller's own answer, or NULL
    display_order TEXT NOT NULL,         -- JSON: the order the responses were shown in
    created_at TEXT NOT NULL,
    undone_at TEXT                       -- set by undo: the label is kept for the record but no longer counts
);
CREATE UNIQUE INDEX IF NOT EXISTS one_active_label ON labels(assignment_id) WHERE undone_at IS NULL;
CREATE INDEX IF NOT EXISTS assignments_of_labeler ON assignments(labeler_id);
"""

FLAGS = ("fails_instruction", "harmful", "made_up_facts")  # InstructGPT's per-response metadata


class ProjectError(RuntimeError):
    """A project that cannot be used as asked; the message names the cause and the fix."""


@dataclass(frozen=True)
class Item:
    """One prompt (chat messages) and its candidate responses ``(text, ended_with_eos)``."""

    prompt: list[dict[str, str]]
    responses: list[tuple[str, bool]]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Labeler:
    id: int
    name: str


def now() -> str:
    """The current UTC time, ISO 8601 to the millisecond."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def project_path(project: str | Path, db: str | Path | None = None) -> Path:
    """The database of ``project``: ``db`` if given, ``project`` itself if it is a path (has a folder or a
    ``.sqlite``/``.db`` suffix, or exists), else ``labels/<project>.sqlite``."""
    if db is not None:
        return Path(db)
    path = Path(project)
    if path.suffix in (".sqlite", ".db") or len(path.parts) > 1 or path.is_file():
        return path
    return LABELS_DIR / f"{project}.sqlite"


def connect(path: str | Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, synchronous FULL, rows by name."""
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def open_project(path: str | Path) -> sqlite3.Connection:
    """Connect to an existing project database, or fail naming the command that creates one."""
    path = Path(path)
    if not path.is_file():
        raise ProjectError(
            f"{path}: no such project database (create it with `instruct-tune label new-project`)"
        )
    conn = connect(path)
    version = conn.execute("SELECT value FROM project WHERE key = 'schema_version'").fetchone()
    if version is None or int(version[0]) != SCHEMA_VERSION:
        conn.close()
        raise ProjectError(f"{path}: not a labelling project of this version (schema {SCHEMA_VERSION})")
    return conn


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction taken at once (``BEGIN IMMEDIATE``): no two writers interleave their reads and
    writes, so what a transaction read is still true when it commits. Committed on exit, rolled back on error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def create_project(
    path: str | Path,
    items: Sequence[Item],
    *,
    copies: Sequence[int],
    order: Sequence[int],
    settings: dict[str, Any],
) -> sqlite3.Connection:
    """Write a new project database holding ``items``, each going to ``copies[i]`` labellers and handed out
    at position ``order[i]``; ``settings`` are recorded as they are. Refuses to overwrite a file."""
    path = Path(path)
    if path.exists():
        raise ProjectError(f"{path}: already exists (choose another name, or remove the file to start over)")
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = connect(path)
    conn.executescript(SCHEMA)
    with immediate(conn):
        meta = {**settings, "schema_version": SCHEMA_VERSION, "created_at": now()}
        conn.executemany("INSERT INTO project VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
        for n, item in enumerate(items):
            cur = conn.execute(
                "INSERT INTO items (position, prompt, extra, copies) VALUES (?, ?, ?, ?)",
                (order[n], json.dumps(item.prompt), json.dumps(item.extra), copies[n]),
            )
            conn.executemany(
                "INSERT INTO responses VALUES (?, ?, ?, ?)",
                [(cur.lastrowid, i, text, int(ended)) for i, (text, ended) in enumerate(item.responses)],
            )
    return conn


def settings(conn: sqlite3.Connection) -> dict[str, Any]:
    """The project's settings as written by ``create_project``."""
    return {row["key"]: json.loads(row["value"]) for row in conn.execute("SELECT key, value FROM project")}


def hash_token(token: str) -> str:
    """The stored form of a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def add_labeler(conn: sqlite3.Connection, name: str) -> str:
    """Register labeller ``name``; returns their new token (shown once: only its hash is kept)."""
    name = name.strip()
    if not name or len(name) > 64:
        raise ProjectError("a labeller name must be 1 to 64 characters")
    token = secrets.token_urlsafe(32)
    try:
        with immediate(conn):
            conn.execute(
                "INSERT INTO labelers (name, token_hash, created_at) VALUES (?, ?, ?)",
                (name, hash_token(token), now()),
            )
    except sqlite3.IntegrityError:
        raise ProjectError(f"labeller {name!r} already exists in this project") from None
    return token


def labeler_for_token(conn: sqlite3.Connection, token: str | None) -> Labeler | None:
    """The labeller holding ``token``, or None for a missing or unknown one."""
    if not token or len(token) > 200:
        return None
    row = conn.execute("SELECT id, name FROM labelers WHERE token_hash = ?", (hash_token(token),)).fetchone()
    return Labeler(row["id"], row["name"]) if row else None


def labelers(conn: sqlite3.Connection) -> list[Labeler]:
    """Every labeller of the project, in the order they were added."""
    return [Labeler(r["id"], r["name"]) for r in conn.execute("SELECT id, name FROM labelers ORDER BY id")]
