"""`instruct-tune label` commands: sampling a new project from a tiny policy folder, the errors users meet,
and the export pushed to a (recording) Hub as a dataset in one commit."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import sqlite3
import subprocess
from pathlib import Path

from helpers import CLI
from recording_hub import RecordingHub, hub_env

from instruct_tune.label.cli import _parser
from instruct_tune.label.cli import main as label_main

PROMPTS = [
    {"prompt": "Sort these numbers in ascending order: 32, 67, 9, 81", "task": "sort"},
    {"prompt": "What is 75 + 1?", "task": "add"},
    {"prompt": "Say the word map 2 times.", "task": "repeat"},
]


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = label_main(list(argv))
    return code, out.getvalue(), err.getvalue()


def responses_of(db: Path) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(
            "SELECT i.prompt, i.extra, r.idx, r.text, r.ended FROM responses r JOIN items i ON i.id = r.item_id "
            "ORDER BY i.id, r.idx"
        ).fetchall()


def test_new_project_samples_k_responses_from_a_policy_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    dbs = [tmp_path / "a.sqlite", tmp_path / "b.sqlite"]
    for db in dbs:
        code, out, err = run(
            "new-project", "sampled", "--prompts", str(prompts), "--policy", str(tiny_model_dir), "-k", "3",
            "--max-new-tokens", "12", "--seed", "7", "--db", str(db),
        )
        assert code == 0, err
        assert f"{db}:" in out
    first = responses_of(dbs[0])
    assert first == responses_of(dbs[1])  # seeded: the same folder and options give the same items
    per_prompt: dict[str, list[str]] = {}
    for prompt, extra, _, text, _ in first:
        per_prompt.setdefault(json.loads(prompt)[0]["content"], []).append(text)
        assert json.loads(extra)["task"] in {"sort", "add", "repeat"}
    assert per_prompt and all(2 <= len(texts) <= 3 and len(set(texts)) == len(texts) for texts in per_prompt.values())
    with contextlib.closing(sqlite3.connect(dbs[0])) as conn:
        settings = {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM project")}
    assert settings["policy"] == str(tiny_model_dir) and settings["k"] == 3


def test_commands_fail_with_one_clear_line(tmp_path: Path) -> None:
    source = tmp_path / "responses.jsonl"
    source.write_text(json.dumps({"prompt": "Say hi", "responses": ["hi", "hello"]}) + "\n")
    db = str(tmp_path / "p.sqlite")
    assert run("new-project", "p", "--prompts", str(source), "--db", db)[2].startswith("error: --prompts needs --policy")
    assert run("new-project", "p", "--responses", str(source), "--db", db)[0] == 0
    code, _, err = run("new-project", "p", "--responses", str(source), "--db", db)
    assert code == 2 and "already exists" in err
    assert run("add-labeler", db, "ann")[0] == 0
    assert "already exists" in run("add-labeler", db, "ann")[2]
    code, _, err = run("stats", str(tmp_path / "missing.sqlite"))
    assert code == 2 and "no such project database" in err
    assert "give --out FILE" in run("export", db)[2]
    assert _parser().parse_args(["serve", "p"]).host == "127.0.0.1"  # this machine only unless told
    code, out, _ = run("stats", db, "--json")
    assert code == 0 and json.loads(out)["labelers"][0]["name"] == "ann"


class DatasetHub(RecordingHub):
    """The recording Hub, answering commits to dataset repos too."""

    def _handle(self) -> None:
        path = self.path.split("?")[0]
        if path.startswith("/api/datasets/") and "/commit/" in path:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            type(self).requests.append({"method": self.command, "path": self.path, "body": body})
            repo = path.split("/api/datasets/")[1].split("/commit/")[0]
            endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
            return self._reply(200, {"commitUrl": f"{endpoint}/datasets/{repo}/commit/abc", "commitOid": "abc"})
        return super()._handle()

    do_GET = do_POST = do_PUT = _handle


def test_export_pushes_a_dataset_in_one_commit(tmp_path: Path) -> None:
    import threading
    from http.server import ThreadingHTTPServer

    from instruct_tune.label.assign import next_assignment
    from instruct_tune.label.db import labeler_for_token, open_project
    from instruct_tune.label.labels import submit_label

    source = tmp_path / "responses.jsonl"
    source.write_text(json.dumps({"prompt": "Say hi", "responses": ["hi", "hello"]}) + "\n")
    db = str(tmp_path / "p.sqlite")
    assert run("new-project", "p", "--responses", str(source), "--db", db)[0] == 0
    token = run("add-labeler", db, "ann")[1].strip()
    with contextlib.closing(open_project(db)) as conn:
        who = labeler_for_token(conn, token)
        item = next_assignment(conn, who.id)
        hi = [r["text"] for r in item.responses].index("hi")
        submit_label(conn, who.id, item.id, {"tiers": [[hi], [1 - hi]], "better_answer": "hi there"})

    DatasetHub.requests, DatasetHub.fail = [], None
    hub = ThreadingHTTPServer(("127.0.0.1", 0), DatasetHub)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{hub.server_address[1]}"
        out = subprocess.run(
            [*CLI, "label", "export", db, "--push-to-hub", "someone/labels"],
            capture_output=True, text=True, env=hub_env(endpoint, tmp_path), timeout=120,
        )
    finally:
        hub.shutdown()
    assert out.returncode == 0, out.stderr
    commits = [r for r in DatasetHub.requests if "/commit/" in r["path"]]
    assert len(commits) == 1 and commits[0]["path"].startswith("/api/datasets/someone/labels/commit/")
    lines = [json.loads(line) for line in commits[0]["body"].splitlines() if line.strip()]
    files = {
        v["value"]["path"]: base64.b64decode(v["value"]["content"]).decode() for v in lines if v["key"] == "file"
    }
    assert set(files) == {"README.md", "rankings.jsonl", "demonstrations.jsonl"}
    assert json.loads(files["rankings.jsonl"])["ranking"] == [0, 1]
    assert "config_name: demonstrations" in files["README.md"]
    created = [json.loads(r["body"]) for r in DatasetHub.requests if r["path"].startswith("/api/repos/create")]
    assert created and created[0]["type"] == "dataset"
