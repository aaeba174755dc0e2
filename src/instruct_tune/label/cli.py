"""``instruct-tune label``: create a labelling project, add labellers, serve the app, see stats, export.

    instruct-tune label new-project round1 --prompts data/tiny/heldout_prompts.jsonl --policy outputs/tiny/sft -k 4
    instruct-tune label new-project round1 --responses candidates.jsonl      # {"prompt": ..., "responses": [...]}
    instruct-tune label add-labeler round1 alice                               # prints the token, once
    instruct-tune label serve round1 --port 8765                               # 127.0.0.1 unless --host
    instruct-tune label stats round1
    instruct-tune label export round1 --out rankings.jsonl --demonstrations demos.jsonl [--push-to-hub me/labels]
    instruct-tune label round --config recipes/configs/tiny/round.yaml --run_dir outputs/tiny   # `make round`

PROJECT is a name, stored as ``labels/<NAME>.sqlite`` under the working directory, or a path to the
database (``--db`` says it explicitly). The rankings file is read by the reward stage as it is.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from collections.abc import Sequence

from instruct_tune.label.db import ProjectError, project_path

DEFAULT_PORT = 8765


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="instruct-tune label",
        description="The labelling app: create a project, add labellers, serve it, see stats, export rankings; "
        "run a whole round of the feedback loop.",
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--db", default=None, help="the project database (default: labels/<PROJECT>.sqlite)")
        return p

    new = command("new-project", "create a project: K responses per prompt, sampled or from a file")
    new.add_argument("name", metavar="NAME")
    source = new.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", help="prompt file (any prompt format); sample responses with --policy")
    source.add_argument(
        "--responses", help='JSONL (or JSON/Parquet/CSV) of {"prompt": ..., "responses": [...]}'
    )
    new.add_argument("--policy", help="run folder (or Hub id) of the policy to sample from, with --prompts")
    new.add_argument("-k", type=int, default=4, help="responses sampled per prompt (2..9; default 4)")
    new.add_argument("--overlap", type=float, default=0.1, help="share of prompts given to several labellers")
    new.add_argument("--overlap-labelers", type=int, default=2, help="labellers per overlapping prompt")
    new.add_argument(
        "--seed", type=int, default=0, help="seeds sampling, the overlap draw and the orders shown"
    )
    new.add_argument("--max-new-tokens", type=int, default=64)
    new.add_argument("--temperature", type=float, default=1.0)
    new.add_argument("--top-p", type=float, default=1.0)
    new.add_argument("--batch-size", type=int, default=32)

    add = command("add-labeler", "add a labeller; prints their token (only its hash is stored)")
    add.add_argument("project", metavar="PROJECT")
    add.add_argument("labeler", metavar="NAME")

    serve = command("serve", "serve the labelling app")
    serve.add_argument("project", metavar="PROJECT")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.add_argument("--log-level", default="info")

    stats = command("stats", "per-labeller counts and agreement on shared prompts")
    stats.add_argument("project", metavar="PROJECT")
    stats.add_argument("--json", action="store_true", help="print the stats as JSON")

    export = command("export", "write the rankings (ranking format) and the written answers (messages)")
    export.add_argument("project", metavar="PROJECT")
    export.add_argument("--out", help="rankings JSONL for the reward stage")
    export.add_argument(
        "--demonstrations", help="JSONL of messages rows made of the labellers' answers, for SFT"
    )
    export.add_argument(
        "--push-to-hub", metavar="OWNER/NAME", help="also push both as a dataset, in one commit"
    )
    export.add_argument("--private", action="store_true", help="create the Hub dataset private")

    from instruct_tune.label.round import add_arguments as round_arguments

    about = "one round of the feedback loop: sample, label, export, retrain the reward model, PPO, eval both rounds"
    round_arguments(sub.add_parser("round", help=about, description=f"{about} (instruct_tune.label.round)"))
    return ap


def _new_project(args: argparse.Namespace) -> int:
    from instruct_tune.label.assign import plan_overlap
    from instruct_tune.label.db import create_project
    from instruct_tune.label.sampling import items_from_responses, sample_items

    path = project_path(args.name, args.db)
    if path.exists():
        raise ProjectError(f"{path}: already exists (choose another name, or remove the file to start over)")
    if args.prompts and not args.policy:
        raise ProjectError("--prompts needs --policy, the run folder to sample responses from")
    if args.responses and args.policy:
        raise ProjectError("--policy samples responses for --prompts; --responses brings its own")
    plan_overlap(0, args.overlap, args.overlap_labelers, args.seed)  # checks the options before sampling
    if args.prompts:
        items, skipped = sample_items(
            args.policy,
            args.prompts,
            args.k,
            seed=args.seed,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            batch_size=args.batch_size,
        )
    else:
        items, skipped = items_from_responses(args.responses)
    if not items:
        raise ProjectError("no prompt has two distinct non-empty responses: nothing to rank")
    copies, order = plan_overlap(len(items), args.overlap, args.overlap_labelers, args.seed)
    project_settings = {
        "name": args.name,
        "source": args.prompts or args.responses,
        "policy": args.policy,
        "k": args.k if args.policy else None,
        "overlap": args.overlap,
        "overlap_labelers": args.overlap_labelers,
        "seed": args.seed,
    }
    create_project(path, items, copies=copies, order=order, settings=project_settings).close()
    shared = sum(c > 1 for c in copies)
    print(
        f"{path}: {len(items)} prompts ({shared} go to {args.overlap_labelers} labellers), "
        f"{sum(len(i.responses) for i in items)} responses; {skipped} prompts skipped "
        "(fewer than 2 distinct responses)"
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from instruct_tune.label.app import serve

    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(
            f"warning: serving on {args.host}: anyone who can reach it may try tokens, and plain HTTP is not "
            "encrypted (put it behind HTTPS to serve other machines)",
            file=sys.stderr,
        )
    path = project_path(args.project, args.db)
    print(f"serving {path} on http://{args.host}:{args.port}", file=sys.stderr)
    serve(path, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _export(args: argparse.Namespace, conn) -> int:
    from instruct_tune.label.export import export_project, push_export

    if not (args.out or args.push_to_hub):
        raise ProjectError("give --out FILE and/or --push-to-hub OWNER/NAME")
    if args.out:
        report = export_project(conn, args.out, args.demonstrations)
        print(f"{args.out}: {report.summary()}")
        if args.demonstrations:
            print(f"{args.demonstrations}: {report.demonstrations} demonstrations")
    elif args.demonstrations:
        raise ProjectError("--demonstrations goes with --out")
    if args.push_to_hub:
        from instruct_tune.hub import PushError

        try:
            report, url = push_export(conn, args.push_to_hub, private=args.private)
        except PushError as e:
            raise ProjectError(str(e)) from None
        print(f"pushed to {args.push_to_hub}: {url} ({report.summary()})")
    return 0


def main(argv: Sequence[str]) -> int:
    """Run one ``label`` subcommand; errors print one line to stderr and return 2."""
    args = _parser().parse_args(list(argv))
    try:
        if args.command == "new-project":
            return _new_project(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "round":
            from instruct_tune.label.round import run_from_args

            return run_from_args(args)
        from instruct_tune.label.db import add_labeler, open_project

        conn = open_project(project_path(args.project, args.db))
        try:
            if args.command == "add-labeler":
                token = add_labeler(conn, args.labeler)
                print(f"labeller {args.labeler!r} added; their token (shown only now):", file=sys.stderr)
                print(token)
                return 0
            if args.command == "stats":
                from instruct_tune.label.stats import format_stats, project_stats

                stats = project_stats(conn)
                print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
                return 0
            return _export(args, conn)
        finally:
            conn.close()
    except (ProjectError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
