"""The labelling app for real: `instruct-tune label serve` in a subprocess on a free port, driven by headless
Chromium (Playwright, Debian's /usr/bin/chromium) and by threads over the JSON API.

Set INSTRUCT_TUNE_LABEL_SCREENSHOTS=docs to write the page and stats screenshots to docs/label-*.png.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import CLI, REPO, TINY_DATA
from playwright.sync_api import expect

from instruct_tune.label.cli import main as label_main
from instruct_tune.label.scripted import Client, label_all

CHROMIUM = "/usr/bin/chromium"
SCRIPT = '<script>window.__pwned = 1</script>rat, tea <img src=x onerror="window.__pwned = 2">'
SORT = "Sort these numbers in ascending order: 32, 67, 9, 81"
REVERSE = "Reverse this list: toy, horse, tea, rat"
ITEMS = [
    {"prompt": SORT, "responses": ["9, 32, 67, 81", "9, 32, 81, 67", "81, 67, 32, 9", "9, 32, 67, 81 Easy!"], "task": "sort"},
    {"prompt": REVERSE, "responses": ["rat, tea, horse, toy", SCRIPT, "tea, rat, horse, toy"], "task": "reverse"},
]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def new_project(tmp_path: Path, rows: list[dict], *options: str) -> Path:
    db = tmp_path / "project.sqlite"
    source = write_jsonl(rows, tmp_path / "responses.jsonl")
    out = subprocess.run(
        [*CLI, "label", "new-project", "round1", "--responses", str(source), "--db", str(db), *options],
        capture_output=True, text=True, check=False,
    )
    assert out.returncode == 0, out.stderr
    return db


def add_labeler(db: Path, name: str) -> str:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        assert label_main(["add-labeler", str(db), name]) == 0
    return stdout.getvalue().strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(db: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`label serve` on a free port until the block ends; yields its URL and process."""
    port = free_port()
    proc = subprocess.Popen(
        [*CLI, "label", "serve", str(db), "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)
    try:
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=10)
        proc.stderr.close()


def status_of(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def card(page, text: str):
    return page.locator(".card", has=page.get_by_text(text, exact=True))


def zone(page, rank: int):
    return page.locator(f'.zone[data-rank="{rank}"]')


def log_in(page, url: str, token: str) -> None:
    first = page.goto(url)
    assert first.status == 401
    expect(page.locator("#login")).to_be_visible()  # waits for the page's script: a busy machine renders late
    assert SORT not in page.content() and "rat, tea" not in page.content()
    page.fill("#token", "not-a-token")
    page.click("#login button")
    expect(page.locator("#login-error")).not_to_be_empty()
    assert page.locator("#login").is_visible() and not page.locator("#labelling").is_visible()
    page.fill("#token", token)
    page.click("#login button")
    page.locator("#labelling").wait_for()


def shown_prompt(page) -> str:
    return page.locator("#prompt").inner_text().strip()


def submit(page, how: str = "click") -> None:
    before = page.locator("#progress").inner_text()
    if how == "keys":
        page.keyboard.press("Control+Enter")
    else:
        page.click("#submit")
    expect(page.locator("#progress")).not_to_have_text(before)


def screenshot(page, name: str, tmp_path: Path) -> None:
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("INSTRUCT_TUNE_LABEL_SCREENSHOTS"):
        shutil.copy(shot, REPO / os.environ["INSTRUCT_TUNE_LABEL_SCREENSHOTS"] / name)


def test_two_labellers_rank_in_the_browser_and_the_export_matches(browser, tmp_path: Path) -> None:
    from instruct_tune.data import load_source

    db = new_project(tmp_path, ITEMS, "--overlap", "1", "--overlap-labelers", "2")
    tokens = {name: add_labeler(db, name) for name in ("alice", "bob")}
    with server(db) as (url, _):
        # alice ranks by dragging: a tie, a flag, a better answer; undo of her second label
        alice = browser.new_context(viewport={"width": 1000, "height": 900}).new_page()
        log_in(alice, url, tokens["alice"])
        done = []
        while alice.locator("#labelling").is_visible() and len(done) < 2:
            prompt = shown_prompt(alice)
            if prompt == SORT:
                card(alice, "9, 32, 67, 81").drag_to(zone(alice, 1))
                card(alice, "9, 32, 67, 81 Easy!").drag_to(zone(alice, 1))
                card(alice, "9, 32, 81, 67").drag_to(zone(alice, 2))
                assert alice.locator("#submit").is_disabled()  # one response still unranked
                card(alice, "81, 67, 32, 9").drag_to(zone(alice, 3))
                card(alice, "81, 67, 32, 9").locator('input[data-flag="fails_instruction"]').check()
                alice.fill("#answer", "9, 32, 67, 81")
                assert zone(alice, 1).locator(".card").count() == 2
                screenshot(alice, "label-page.png", tmp_path)
            else:
                assert prompt == REVERSE
                assert card(alice, SCRIPT).locator(".text").text_content() == SCRIPT  # shown as text
                assert alice.evaluate("window.__pwned") is None and alice.locator(".card img").count() == 0
                card(alice, "rat, tea, horse, toy").drag_to(zone(alice, 1))
                card(alice, SCRIPT).drag_to(zone(alice, 3))
                card(alice, "tea, rat, horse, toy").drag_to(zone(alice, 2))
            submit(alice)
            done.append(prompt)
        assert sorted(done) == sorted([SORT, REVERSE]) and alice.locator("#done").is_visible()
        alice.locator("#done .undo").click()
        alice.locator("#labelling").wait_for()
        assert shown_prompt(alice) == done[-1]
        if done[-1] == REVERSE:  # the undone label comes back as it was; alice changes her mind
            assert zone(alice, 3).locator(".card .text").text_content() == SCRIPT
            card(alice, SCRIPT).drag_to(zone(alice, 2))
            card(alice, "tea, rat, horse, toy").drag_to(zone(alice, 3))
            reverse_by_alice = ["rat, tea, horse, toy", SCRIPT, "tea, rat, horse, toy"]
        else:
            assert alice.input_value("#answer") == "9, 32, 67, 81"
            assert zone(alice, 1).locator(".card").count() == 2
            reverse_by_alice = ["rat, tea, horse, toy", "tea, rat, horse, toy", SCRIPT]
        submit(alice)
        assert alice.locator("#done").is_visible()
        assert alice.locator("#progress").inner_text() == "2 done \u00b7 0 remaining"

        # bob ranks with the keyboard only: number keys, arrows, space on a flag, Ctrl+Enter
        bob = browser.new_context(viewport={"width": 1000, "height": 900}).new_page()
        log_in(bob, url, tokens["bob"])
        for _ in range(2):
            if shown_prompt(bob) == SORT:
                for text, key in [("9, 32, 81, 67", "1"), ("9, 32, 67, 81", "2"), ("9, 32, 67, 81 Easy!", "3")]:
                    card(bob, text).focus()
                    bob.keyboard.press(key)
                card(bob, "81, 67, 32, 9").focus()
                for _ in range(4):
                    bob.keyboard.press("ArrowDown")
                assert zone(bob, 4).locator(".card").count() == 1
                card(bob, "9, 32, 81, 67").locator('input[data-flag="made_up_facts"]').focus()
                bob.keyboard.press("Space")
                submit(bob, "keys")
            else:
                bob.locator("#none").focus()
                bob.keyboard.press("Space")
                card(bob, SCRIPT).locator('input[data-flag="harmful"]').check()
                submit(bob)
        assert bob.locator("#done").is_visible()

        stats = alice.context.new_page()
        stats.set_viewport_size({"width": 1000, "height": 440})
        assert stats.goto(url + "/stats").status == 200
        stats.locator("#stats-table tbody tr").first.wait_for()
        assert "0.500" in stats.locator("#figures").inner_text()  # pairwise agreement on the sort prompt
        assert stats.locator("#stats-table tbody tr").count() == 2
        screenshot(stats, "label-stats.png", tmp_path)
        assert alice.evaluate("window.__pwned") is None and bob.evaluate("window.__pwned") is None

    out = subprocess.run(
        [*CLI, "label", "stats", str(db)], capture_output=True, text=True, check=True
    ).stdout
    assert "pairwise 0.500" in out
    rankings, demos = tmp_path / "rankings.jsonl", tmp_path / "demos.jsonl"
    subprocess.run(
        [*CLI, "label", "export", str(db), "--out", str(rankings), "--demonstrations", str(demos)],
        capture_output=True, text=True, check=True,
    )
    rows = {r["prompt"][0]["content"]: r for r in map(json.loads, rankings.read_text().splitlines())}
    best_first = {p: [r["responses"][i] for i in r["ranking"]] for p, r in rows.items()}
    # sort: mean ranks 9,32,67,81 (1.5+2)/2, Easy! (1.5+3)/2, swapped (3+1)/2, reversed 4
    assert best_first[SORT] == ["9, 32, 67, 81", "9, 32, 81, 67", "9, 32, 67, 81 Easy!", "81, 67, 32, 9"]
    assert rows[SORT]["n_labelers"] == 2 and rows[SORT]["task"] == "sort"
    # reverse: bob found none acceptable (left out); alice's label after her undo
    assert best_first[REVERSE] == reverse_by_alice
    assert rows[REVERSE]["n_labelers"] == 1
    assert [json.loads(line)["messages"][-1]["content"] for line in demos.read_text().splitlines()] == [
        "9, 32, 67, 81"
    ]
    pairs, report = load_source(str(rankings), "preference")
    assert report.format == "ranking" and len(pairs) == 6 + 3

    with contextlib.closing(sqlite3.connect(db)) as conn:  # flags and display orders as they were given
        stored = conn.execute(
            "SELECT b.name, i.prompt, l.flags, l.display_order, a.display_order, l.undone_at IS NOT NULL "
            "FROM labels l JOIN assignments a ON a.id = l.assignment_id JOIN labelers b ON b.id = a.labeler_id "
            "JOIN items i ON i.id = a.item_id"
        ).fetchall()
    texts = {item["prompt"]: item["responses"] for item in ITEMS}
    flags = {
        (name, json.loads(prompt)[0]["content"]): {
            texts[json.loads(prompt)[0]["content"]][int(i)]: f for i, f in json.loads(given).items()
        }
        for name, prompt, given, _, _, undone in stored
        if not undone
    }
    assert flags[("alice", SORT)] == {"81, 67, 32, 9": ["fails_instruction"]}
    assert flags[("bob", SORT)] == {"9, 32, 81, 67": ["made_up_facts"]}
    assert flags[("bob", REVERSE)] == {SCRIPT: ["harmful"]}
    assert all(shown == assigned for _, _, _, shown, assigned, _ in stored)
    assert sum(undone for *_, undone in stored) == 1


def test_no_data_without_a_valid_token(tmp_path: Path) -> None:
    db = new_project(tmp_path, ITEMS)
    alice, mallory = add_labeler(db, "alice"), add_labeler(db, "mallory")
    with server(db) as (url, _):
        json_post = {"Content-Type": "application/json"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Cookie": "instruct_tune_label=wrong"}):
            for path in ("/", "/stats"):
                code, body = status_of(url + path, headers=headers)
                assert code == 401 and b"Sort these" not in body
            for path in ("/api/me", "/api/next", "/api/stats"):
                code, body = status_of(url + path, headers=headers)
                assert code == 401 and json.loads(body) == {"error": "log in with your token"}
            for path in ("/api/label", "/api/undo"):
                assert status_of(url + path, b"{}", {**headers, **json_post})[0] == 401
        code, body = status_of(url + "/api/login", b'{"token": "wrong"}', json_post)
        assert code == 401
        # a labeller sees and labels only their own assignments
        mine = Client(url, alice).call("/api/next")["item"]
        assert SORT in json.dumps(mine) or REVERSE in json.dumps(mine)
        label = {"assignment_id": mine["assignment_id"], "tiers": [[0], [1, 2]]}
        theirs = status_of(
            url + "/api/label", json.dumps(label).encode(), {"Authorization": f"Bearer {mallory}", **json_post}
        )
        assert theirs[0] == 404
        foreign = {"Authorization": f"Bearer {alice}", "Origin": "http://evil.example", **json_post}
        assert status_of(url + "/api/label", json.dumps(label).encode(), foreign)[0] == 403
        code, _ = status_of(url + "/", headers={"Authorization": f"Bearer {alice}"})
        assert code == 200


def tiny_rows(n: int, *, distinct_scores: bool = False) -> list[dict]:
    from instruct_tune.tiny.task import gold_score

    rows = []
    for line in (TINY_DATA / "comparisons.jsonl").read_text().splitlines():
        row = json.loads(line)
        scores = [gold_score(row["prompt"], r) for r in row["responses"]]
        if distinct_scores and len(set(scores)) < len(scores):
            continue
        rows.append(row)
        if len(rows) == n:
            break
    return rows


def test_sigkill_loses_no_submitted_label_and_a_restart_carries_on(tmp_path: Path) -> None:
    rows = tiny_rows(30)
    db = new_project(tmp_path, [{"prompt": r["prompt"], "responses": r["responses"]} for r in rows], "--overlap", "0")
    token = add_labeler(db, "worker")
    acked: list[str] = []
    with server(db) as (url, proc):
        client = Client(url, token, timeout=5)

        def work() -> None:
            with contextlib.suppress(Exception):  # the server dies under it
                while True:
                    item = client.call("/api/next")["item"]
                    k = len(item["responses"])
                    client.call("/api/label", {"assignment_id": item["assignment_id"], "tiers": [[s] for s in range(k)]})
                    acked.append(item["prompt"][0]["content"])

        worker = threading.Thread(target=work)
        worker.start()
        deadline = time.time() + 60
        while len(acked) < 8:
            assert worker.is_alive() and time.time() < deadline, "the labeller stopped before the kill"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        worker.join(timeout=30)
    got = list(acked)
    with server(db) as (url, _):
        client = Client(url, token)
        done = client.call("/api/me")["progress"]["done"]
        assert len(got) <= done <= len(got) + 1  # at most one committed label whose answer was lost
        assert label_all(client, lambda prompt, texts, ended: list(range(len(texts)))) == 30 - done
    out = tmp_path / "rankings.jsonl"
    subprocess.run([*CLI, "label", "export", str(db), "--out", str(out)], check=True, capture_output=True)
    exported = Counter(json.loads(line)["prompt"][0]["content"] for line in out.read_text().splitlines())
    assert set(got) <= set(exported) and len(exported) == 30 and set(exported.values()) == {1}


def test_concurrent_assignment_never_doubles_a_single_overlap_item(tmp_path: Path) -> None:
    rows = [{"prompt": f"Say the word w{i} {1 + i % 3} times.", "responses": ["a", "b"]} for i in range(40)]
    db = new_project(tmp_path, rows, "--overlap", "0.25", "--overlap-labelers", "2")
    tokens = [add_labeler(db, f"l{n}") for n in range(8)]
    seen: dict[int, list[str]] = defaultdict(list)
    errors: list[BaseException] = []
    with server(db) as (url, _):
        start = threading.Barrier(len(tokens))

        def work(n: int) -> None:
            client = Client(url, tokens[n])
            try:
                start.wait()
                while (item := client.call("/api/next")["item"]) is not None:
                    seen[n].append(item["prompt"][0]["content"])
                    client.call("/api/label", {"assignment_id": item["assignment_id"], "tiers": [[0], [1]]})
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(len(tokens))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert not errors
    with contextlib.closing(sqlite3.connect(db)) as conn:
        copies = {json.loads(p)[0]["content"]: c for p, c in conn.execute("SELECT prompt, copies FROM items")}
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    holders = defaultdict(list)
    for n, prompts in seen.items():
        assert len(prompts) == len(set(prompts))  # never the same item twice to one labeller
        for p in prompts:
            holders[p].append(n)
    assert Counter(copies.values()) == {1: 30, 2: 10}
    assert {p: len(h) for p, h in holders.items()} == copies  # single items once, shared ones twice


def test_scripted_labeller_ranks_by_the_gold_judge(tmp_path: Path) -> None:
    rows = tiny_rows(6, distinct_scores=True)
    db = new_project(tmp_path, rows, "--overlap", "0")
    with server(db) as (url, _):
        assert label_all(Client(url, add_labeler(db, "gold"))) == 6
    out = tmp_path / "rankings.jsonl"
    subprocess.run([*CLI, "label", "export", str(db), "--out", str(out)], check=True, capture_output=True)
    exported = {r["prompt"][0]["content"]: r for r in map(json.loads, out.read_text().splitlines())}
    for row in rows:  # the shipped rankings are the gold judge's
        got = exported[row["prompt"]]
        assert [got["responses"][i] for i in got["ranking"]] == [row["responses"][i] for i in row["ranking"]]
