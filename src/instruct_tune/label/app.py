"""The labelling app's HTTP routes (Starlette), served by ``instruct-tune label serve``.

**Authentication: a cookie for the page, a bearer header for scripts.** Logging in posts the token once;
the server answers with an ``HttpOnly; SameSite=Strict`` cookie holding it. HttpOnly keeps the token out of
reach of any script in the page (a token in ``localStorage``, sent as a header by the page's JS, would be
readable by injected script); SameSite=Strict (and a same-origin ``Origin`` check on every POST) keeps other
sites' pages from sending it. Scripts (``scripted.py``, tests) send ``Authorization: Bearer <token>``
instead: no cookie jar needed. Both are checked by one indexed lookup of the token's hash; an unknown or
missing token gets 401 and no data, on the page as on the JSON API.

**What a labeller sees.** Only their own assignments: ``/api/next`` hands out theirs and ``/api/label``
accepts a label only for an assignment of theirs. Responses are identified by display slot, never by their
stored index. The page builds its DOM with ``textContent`` only, and the Content-Security-Policy allows no
script but the page's own (by hash), so text such as ``<script>`` in a response is shown, never run.

**Writes.** Every POST that changes data commits its transaction (``db.immediate``) before answering.

Routes: ``GET /`` and ``GET /stats`` (the page), ``POST /api/login``, ``POST /api/logout``, ``GET /api/me``,
``GET /api/next``, ``POST /api/label``, ``POST /api/undo``, ``GET /api/stats``, ``GET /healthz``.
"""

from __future__ import annotations

import base64
import hashlib
import re
import sqlite3
from collections.abc import Callable
from contextlib import closing
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from instruct_tune.label.assign import next_assignment, progress
from instruct_tune.label.db import Labeler, connect, labeler_for_token, open_project
from instruct_tune.label.labels import LabelError, submit_label, undo_last
from instruct_tune.label.stats import project_stats

COOKIE = "instruct_tune_label"
COOKIE_MAX_AGE = 7 * 24 * 3600
NO_STORE = {"Cache-Control": "no-store"}
Handler = Callable[[sqlite3.Connection, Labeler, Any], tuple[int, dict[str, Any]]]


@lru_cache(maxsize=1)
def page() -> tuple[str, str]:
    """The page's HTML and its Content-Security-Policy (its inline script and style allowed by hash)."""
    html = files("instruct_tune.label").joinpath("static/label.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'" for body in found
        )

    csp = (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return html, csp


def _token(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.cookies.get(COOKIE)


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    return origin is None or origin == f"{request.url.scheme}://{request.headers.get('host', '')}"


def create_app(db_path: str | Path) -> Starlette:
    """The app over the project database at ``db_path`` (checked now: a missing project fails at start)."""
    db_path = Path(db_path)
    open_project(db_path).close()

    def with_labeler(request: Request, work: Callable[[sqlite3.Connection, Labeler], Any]) -> Any:
        with closing(connect(db_path)) as conn:
            who = labeler_for_token(conn, _token(request))
            return None if who is None else work(conn, who)

    def api(handler: Handler) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            body: Any = None
            if request.method == "POST":
                if not _same_origin(request):
                    return JSONResponse({"error": "cross-origin request refused"}, 403, headers=NO_STORE)
                if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
                    return JSONResponse({"error": "send JSON (Content-Type: application/json)"}, 415)
                try:
                    body = await request.json()
                except ValueError:
                    return JSONResponse({"error": "the body is not JSON"}, 400, headers=NO_STORE)
            result = await run_in_threadpool(
                with_labeler, request, lambda conn, who: handler(conn, who, body)
            )
            if result is None:
                return JSONResponse({"error": "log in with your token"}, 401, headers=NO_STORE)
            status, payload = result
            return JSONResponse(payload, status, headers=NO_STORE)

        return endpoint

    def me(conn: sqlite3.Connection, who: Labeler, body: Any) -> tuple[int, dict[str, Any]]:
        return 200, {"name": who.name, "progress": progress(conn, who.id)}

    def next_item(conn: sqlite3.Connection, who: Labeler, body: Any) -> tuple[int, dict[str, Any]]:
        item = next_assignment(conn, who.id)
        return 200, {"item": item.as_json() if item else None, "progress": progress(conn, who.id)}

    def label(conn: sqlite3.Connection, who: Labeler, body: Any) -> tuple[int, dict[str, Any]]:
        if not isinstance(body, dict):
            return 400, {"error": "send a JSON object"}
        try:
            label_id = submit_label(conn, who.id, body.get("assignment_id"), body)
        except LabelError as e:
            return e.status, {"error": str(e)}
        return 200, {"label_id": label_id, "progress": progress(conn, who.id)}

    def undo(conn: sqlite3.Connection, who: Labeler, body: Any) -> tuple[int, dict[str, Any]]:
        return 200, {"undone": undo_last(conn, who.id), "progress": progress(conn, who.id)}

    def stats(conn: sqlite3.Connection, who: Labeler, body: Any) -> tuple[int, dict[str, Any]]:
        return 200, project_stats(conn)

    async def show_page(request: Request) -> Response:
        html, csp = page()
        who = await run_in_threadpool(with_labeler, request, lambda conn, who: who)
        headers = {
            "Content-Security-Policy": csp,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            **NO_STORE,
        }
        return Response(html, 200 if who else 401, headers=headers, media_type="text/html; charset=utf-8")

    async def login(request: Request) -> Response:
        if not _same_origin(request):
            return JSONResponse({"error": "cross-origin request refused"}, 403, headers=NO_STORE)
        try:
            body = await request.json()
        except ValueError:
            body = None
        token = body.get("token") if isinstance(body, dict) and isinstance(body.get("token"), str) else None

        def check() -> Labeler | None:
            with closing(connect(db_path)) as conn:
                return labeler_for_token(conn, token)

        who = await run_in_threadpool(check)
        if who is None:
            return JSONResponse({"error": "unknown token"}, 401, headers=NO_STORE)
        response = JSONResponse({"name": who.name}, headers=NO_STORE)
        response.set_cookie(
            COOKIE, token or "", max_age=COOKIE_MAX_AGE, httponly=True, samesite="strict", path="/"
        )
        return response

    async def logout(request: Request) -> Response:
        response = JSONResponse({"ok": True}, headers=NO_STORE)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    return Starlette(
        routes=[
            Route("/", show_page),
            Route("/stats", show_page),
            Route("/healthz", healthz),
            Route("/api/login", login, methods=["POST"]),
            Route("/api/logout", logout, methods=["POST"]),
            Route("/api/me", api(me)),
            Route("/api/next", api(next_item)),
            Route("/api/label", api(label), methods=["POST"]),
            Route("/api/undo", api(undo), methods=["POST"]),
            Route("/api/stats", api(stats)),
        ]
    )


def serve(db_path: str | Path, host: str = "127.0.0.1", port: int = 8765, log_level: str = "info") -> None:
    """Run the app with uvicorn (one process; SQLite serialises the writes)."""
    import uvicorn

    uvicorn.run(create_app(db_path), host=host, port=port, log_level=log_level)
