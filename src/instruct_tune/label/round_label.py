"""The labelling half of a feedback round (`label.round`): the prompt slice, serving the project while it is
labelled (by the scripted gold judge through the HTTP API, or by people: then the round waits), the split of
the export into training and held-out rankings; and how the round runs a command (shown, logged, failing with
the step's name).
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import closing
from pathlib import Path
from typing import Any

from instruct_tune.config.parsing import read_yaml_config
from instruct_tune.label.db import ProjectError


def command_line(*head: Any, dashes: bool = False, **flags: Any) -> list[str]:
    """`head` then `--flag value...` for each of `flags` (None left out; `dashes`: flag_name -> flag-name)."""
    out = [str(h) for h in head]
    for key, value in flags.items():
        if value is not None:
            out.append("--" + (key.replace("_", "-") if dashes else key))
            out += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return out


def label_cmd(*args: Any, **flags: Any) -> list[str]:
    return command_line(sys.executable, "-m", "instruct_tune.cli", "label", *args, dashes=True, **flags)


def run_logged(cmd: list[str], log: Path, step: str) -> str:
    """Run `cmd`, its output shown and appended to `log`; returns the output, or fails naming the step."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"==> round step {step}: {shlex.join(cmd)}", flush=True)
    out = []
    with (
        log.open("a") as f,
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p,
    ):
        for line in p.stdout:
            f.write(line)
            out.append(line)
            print(line, end="", flush=True)
    if p.returncode:
        raise ProjectError(
            f"round step '{step}' failed (exit {p.returncode}; its output is in {log}). Fix the cause, run "
            "the round again: finished steps are skipped, a training stage resumes from its checkpoint."
        )
    return "".join(out)


def run_here(cmd: list[str], log: Path, step: str) -> str:
    """Run a `label_cmd` command in this process (sampling then loads torch and the policy here, once with
    the report's reward models, not in one more Python), its output shown and appended to `log`."""
    from instruct_tune.label.cli import main

    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"==> round step {step}: {shlex.join(cmd)}", flush=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(cmd[cmd.index("label") + 1 :])
    with log.open("a") as f:
        f.write(out.getvalue())
    print(out.getvalue(), end="", flush=True)
    if code:
        raise ProjectError(f"round step '{step}' failed: {out.getvalue().strip().splitlines()[-1]}")
    return out.getvalue()


def project_counts(db: Path) -> dict[str, Any]:
    """The project's stats, as `instruct-tune label stats` prints them."""
    from instruct_tune.label.db import open_project
    from instruct_tune.label.stats import project_stats

    with closing(open_project(db)) as conn:
        return project_stats(conn)


def fully_labelled(db: Path) -> bool:
    stats = project_counts(db)
    return 0 < stats["items"] == stats["items_labelled"]


def slice_prompts(o: dict[str, Any], out: Path) -> int:
    """Rows first_prompt.. of the prompt file (num_prompts of them), less any in the eval config's prompts."""
    eval_file = Path(read_yaml_config(Path(o["config_dir"]) / "eval.yaml").get("dataset_name") or "-")
    lines = eval_file.read_text().splitlines() if eval_file.is_file() else []
    taken = {repr(json.loads(line).get("prompt")) for line in lines if line.strip()}
    rows = [line for line in Path(o["prompts"]).read_text().splitlines() if line.strip()]
    rows = [
        r for r in rows[o["first_prompt"] :][: o["num_prompts"]] if repr(json.loads(r)["prompt"]) not in taken
    ]
    if not rows:
        raise ProjectError(
            f"{o['prompts']}: no prompt from row {o['first_prompt']} on that eval does not use"
        )
    out.write_text("".join(r + "\n" for r in rows))
    return len(rows)


def _free_port(host: str) -> int:
    with closing(socket.socket()) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def label(o: dict[str, Any], rd: Path, db: Path) -> None:
    """Serve the project in the background, have it labelled (scripted or by people), stop the server."""
    url = f"http://{o['host']}:{o['port'] or _free_port(o['host'])}"
    log = rd / "logs" / "serve.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        server = subprocess.Popen(
            label_cmd("serve", db, host=o["host"], port=url.rsplit(":", 1)[1], log_level="warning"),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.time() + 120
        while True:
            if server.poll() is not None or time.time() > deadline:
                raise ProjectError(
                    f"label serve did not start (exit {server.poll()}; its output is in {log})"
                )
            try:
                urllib.request.urlopen(url + "/healthz", timeout=2).read()
                break
            except OSError:
                time.sleep(0.2)
        if o["labeller"] == "scripted":
            from instruct_tune.label.scripted import Client, label_all

            token_file = rd / "labeller.token"  # kept (owner-only) so that a stopped round resumes its items
            if not token_file.is_file():  # its output is the token: not shown, not logged
                added = subprocess.run(
                    label_cmd("add-labeler", db, "scripted-gold"), capture_output=True, text=True
                )
                if added.returncode:
                    raise ProjectError(
                        f"round step 'label': label add-labeler failed: {added.stderr.strip()}"
                    )
                token_file.touch(mode=0o600)
                token_file.write_text(added.stdout.split()[-1])
            n = label_all(Client(url, token_file.read_text().strip()))
            print(f"the scripted labeller (the tiny gold judge) labelled {n} items through {url}", flush=True)
        else:
            print(
                f"label at {url}; add labellers with `instruct-tune label add-labeler {db} NAME` (prints "
                "their token). Waiting until every item is labelled.",
                flush=True,
            )
            wait_until_labelled(db, o["poll_seconds"], server)
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
    if not fully_labelled(db):
        raise ProjectError(f"{db}: items are left unlabelled after the label step")


def wait_until_labelled(db: Path, poll_seconds: float, server: subprocess.Popen | None = None) -> dict:
    """Poll the project's stats (those `label stats` prints) until every item has a label; returns them."""
    seen = None
    while True:
        stats = project_counts(db)
        if (stats["items_labelled"], stats["items"]) != seen:
            seen = stats["items_labelled"], stats["items"]
            print(f"{db}: {seen[0]}/{seen[1]} items labelled", flush=True)
        if stats["items_labelled"] >= stats["items"]:
            return stats
        if server is not None and server.poll() is not None:
            raise ProjectError(
                f"label serve stopped (exit {server.returncode}) before every item was labelled"
            )
        time.sleep(poll_seconds)


def split_rankings(rankings: Path, train: Path, heldout: Path, fraction: float, seed: int) -> tuple[int, int]:
    """Hold out `fraction` of the prompts (the rows of one prompt_id stay together); returns both counts."""
    rows = [json.loads(line) for line in rankings.read_text().splitlines() if line.strip()]
    ids = sorted({r["prompt_id"] for r in rows})
    if len(ids) < 2:
        raise ProjectError(f"{rankings}: {len(ids)} prompts exported; the round needs 2 or more")
    random.Random(seed).shuffle(ids)
    held = set(ids[: min(len(ids) - 1, max(1, round(fraction * len(ids))))])
    for path, keep in ((heldout, True), (train, False)):  # train last: its file marks the step done
        path.write_text("".join(json.dumps(r) + "\n" for r in rows if (r["prompt_id"] in held) == keep))
    return len(ids) - len(held), len(held)
