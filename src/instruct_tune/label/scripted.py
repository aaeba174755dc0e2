"""A labeller in code: it labels through the same HTTP API the page uses, ranking by a judge function.

For automated rounds (sample -> label -> train the reward model -> PPO -> sample again) on the tiny task, where
the gold judge plays the human, as it does when the shipped comparisons are built:

    token=$(instruct-tune label add-labeler round1 gold-bot)
    python -m instruct_tune.label.scripted --url http://127.0.0.1:8765 --token "$token"

Responses of equal score (within ``tie_tolerance``) are tied; with ``none_below``, an item whose best
response scores under it is marked "none acceptable"; ``answer`` may write a better answer (the tiny task's
gold answer, with ``--write-answers``), which the export turns into a demonstration.
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

# (prompt text: the last user turn, responses, whether each ended with EOS) -> one score per response
Judge = Callable[[str, Sequence[str], Sequence[bool]], Sequence[float]]


class APIError(RuntimeError):
    """An answer of the labelling server other than 2xx; ``status`` is its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class Client:
    """The labelling API with a bearer token (the page uses a cookie; the server takes either)."""

    def __init__(self, base_url: str, token: str, timeout: float = 30.0) -> None:
        self.base_url, self.token, self.timeout = base_url.rstrip("/"), token, timeout

    def call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """GET ``path`` (POST ``body`` as JSON when given); the decoded JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base_url + path, data=data, method="GET" if body is None else "POST"
        )
        request.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read()).get("error", e.reason)
            except ValueError:
                message = e.reason
            raise APIError(e.code, str(message)) from None


def gold_judge(prompt: str, responses: Sequence[str], ended: Sequence[bool]) -> list[float]:
    """The tiny task's gold score of each response."""
    from instruct_tune.tiny.task import gold_score

    return [gold_score(prompt, r, e) for r, e in zip(responses, ended, strict=True)]


def gold_answer(prompt: str) -> str | None:
    """The tiny task's correct answer to ``prompt`` (None for a prompt that is not one of the task's)."""
    from instruct_tune.tiny.task import parse_prompt

    try:
        return parse_prompt(prompt).answer
    except ValueError:
        return None


def tiers_by_score(scores: Sequence[float], tie_tolerance: float = 1e-9) -> list[list[int]]:
    """Indices grouped best first; a score within ``tie_tolerance`` of its tier's best joins that tier."""
    tiers: list[list[int]] = []
    for i in sorted(range(len(scores)), key=lambda i: -scores[i]):
        if tiers and scores[tiers[-1][0]] - scores[i] <= tie_tolerance:
            tiers[-1].append(i)
        else:
            tiers.append([i])
    return tiers


def label_all(
    client: Client,
    judge: Judge = gold_judge,
    *,
    limit: int | None = None,
    tie_tolerance: float = 1e-9,
    none_below: float | None = None,
    answer: Callable[[str], str | None] | None = None,
) -> int:
    """Label the items the server hands this labeller (at most ``limit``) by ``judge``; returns how many."""
    done = 0
    while limit is None or done < limit:
        item = client.call("/api/next")["item"]
        if item is None:
            break
        prompt = next((m["content"] for m in reversed(item["prompt"]) if m["role"] == "user"), "")
        slots = item["responses"]
        scores = list(judge(prompt, [r["text"] for r in slots], [r["ended"] for r in slots]))
        none = none_below is not None and max(scores) < none_below
        tiers = [[slots[i]["slot"] for i in tier] for tier in tiers_by_score(scores, tie_tolerance)]
        written = answer(prompt) if answer else None
        client.call(
            "/api/label",
            {
                "assignment_id": item["assignment_id"],
                "tiers": tiers,
                "none_acceptable": none,
                "flags": {},
                "better_answer": written,
            },
        )
        done += 1
    return done


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: label every item given to the token's labeller with the tiny task's gold judge."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--url", default="http://127.0.0.1:8765", help="the server of `instruct-tune label serve`"
    )
    ap.add_argument("--token", required=True, help="the labeller's token (from `label add-labeler`)")
    ap.add_argument("--limit", type=int, default=None, help="label at most this many items")
    ap.add_argument(
        "--none-below", type=float, default=None, help="'none acceptable' when the best scores under this"
    )
    ap.add_argument("--write-answers", action="store_true", help="write the gold answer as a better answer")
    args = ap.parse_args(argv)
    n = label_all(
        Client(args.url, args.token),
        limit=args.limit,
        none_below=args.none_below,
        answer=gold_answer if args.write_answers else None,
    )
    print(f"labelled {n} items")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
