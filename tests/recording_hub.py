"""A local stand-in for the Hugging Face Hub, and `instruct-tune push` run against it.

The Hub itself is unreachable here, so uploads go to a local HTTP server given as HF_ENDPOINT (the `hub_server`
fixture of conftest.py): it answers the few Hub API routes the real `huggingface_hub` client calls for a commit
(create repo, validate the card's YAML, preupload, commit) and records every request, so a test sees exactly
what the client sent.
"""

from __future__ import annotations

import json
import os
import subprocess
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from helpers import CLI

TOKEN = "hf_fakeTokenForTheRecordingServer0123456789"


class RecordingHub(BaseHTTPRequestHandler):
    """Answers the Hub routes of a commit; `fail` makes every route answer that HTTP status."""

    requests: list[dict] = []
    fail: int | None = None

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        type(self).requests.append(
            {
                "method": self.command,
                "path": self.path,
                "auth": self.headers.get("Authorization"),
                "body": body,
            }
        )
        if type(self).fail:
            return self._reply(type(self).fail, {"error": "refused by the recording server"})
        endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        path = self.path.split("?")[0]
        if path == "/api/repos/create":
            payload = json.loads(body)
            return self._reply(200, {"url": f"{endpoint}/{payload['organization']}/{payload['name']}"})
        if path == "/api/validate-yaml":
            return self._reply(200, {"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return self._reply(
                200,
                {
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]
                },
            )
        if "/commit/" in path:
            repo = path.split("/api/models/")[1].split("/commit/")[0]
            return self._reply(200, {"commitUrl": f"{endpoint}/{repo}/commit/abc123", "commitOid": "abc123"})
        return self._reply(404, {"error": f"no route {path}"})

    do_GET = do_POST = do_PUT = _handle


def hub_env(endpoint: str, tmp_path: Path, token: str | None = TOKEN) -> dict[str, str]:
    """This process's environment pointed at `endpoint`, online, with its own HF_HOME and `token`."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env.update({"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf-home")})
    if token:
        env["HF_TOKEN"] = token
    return env


def push(
    folder: Path,
    endpoint: str,
    tmp_path: Path,
    *extra: str,
    token: str | None = TOKEN,
    repo: str = "someone/tiny-ppo",
) -> subprocess.CompletedProcess:
    """`instruct-tune push folder --repo-id repo *extra` against the Hub at `endpoint`."""
    return subprocess.run(
        [*CLI, "push", str(folder), "--repo-id", repo, *extra],
        capture_output=True,
        text=True,
        env=hub_env(endpoint, tmp_path, token),
        timeout=120,
    )
