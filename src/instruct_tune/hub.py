"""Push a run folder to the Hugging Face Hub: the model (or adapter), tokenizer and card, in one commit.

What goes up is decided here and only here (`upload_plan`), so `push --dry-run` lists exactly what a push
sends. Checkpoints, optimizer/scheduler/RNG states, logs and pickles stay local unless asked for; a token is
read by `huggingface_hub` (HF_TOKEN or `hf auth login`) and never printed or written anywhere.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from instruct_tune.artifacts import CARD_FILE, CONFIG_FILE, HUB_FILE, hub_id_of

# Files of a run folder that make up the usable model: weights (adapter or full), configs, tokenizer, card.
MODEL_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "reward_normalization.json",  # the reward stage's score bias: part of what its scores mean
)
MODEL_FILE_PATTERNS = ("model-*-of-*.safetensors",)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
# Inside checkpoint-* folders these never go up, even with include_checkpoints: they are large and only
# serve resuming (and some are pickles).
CHECKPOINT_STATE_PATTERNS = ("optimizer*", "scheduler*", "rng_state*", "*.pt", "*.bin", "*.pkl")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


class PushError(RuntimeError):
    """A push that cannot go ahead; the message names the cause and the fix."""


@dataclass(frozen=True)
class Upload:
    """One file of a push: where it is and where it goes in the repo."""

    local: Path
    path_in_repo: str
    size: int


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if it reads `owner/name`, else PushError."""
    if not _REPO_ID.match(repo_id or "") or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise PushError(
            f"--repo-id {repo_id!r} is not a Hub repo id: use owner/name (letters, digits, '-', '_', '.'), "
            "e.g. my-user/tiny-ppo"
        )
    return repo_id


def upload_plan(folder: str | Path, *, include_checkpoints: bool = False) -> list[Upload]:
    """The files a push of `folder` sends: model or adapter, tokenizer, card (and checkpoints if asked).

    Only regular files inside the folder go up: a symlink is followed only when it resolves to a file inside
    the folder; one leading anywhere else (or nowhere) makes this a PushError naming it, dry run included.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PushError(f"{folder}: no such run folder")
    root = folder.resolve()
    names = set(MODEL_FILES) | set(TOKENIZER_FILES) | {CARD_FILE}
    chosen = [p for p in folder.iterdir() if p.name in names and (p.is_file() or p.is_symlink())]
    chosen += [p for pattern in MODEL_FILE_PATTERNS for p in folder.glob(pattern)]
    if not any(p.name in ("adapter_model.safetensors", "model.safetensors") or p.match("model-*") for p in chosen):
        raise PushError(f"{folder}: no adapter_model.safetensors or model.safetensors: not a finished run folder")
    refused: list[Path] = []
    if include_checkpoints:
        for checkpoint in sorted(folder.glob("checkpoint-*")):
            if not _inside(root, checkpoint):
                refused.append(checkpoint)
                continue
            for parent, dirs, files in os.walk(checkpoint):  # does not descend into symlinked folders
                here = Path(parent)
                refused += [here / d for d in dirs if not _inside(root, here / d)]
                chosen += [
                    here / f
                    for f in files
                    if not any((here / f).match(pattern) for pattern in CHECKPOINT_STATE_PATTERNS)
                ]
    refused += [p for p in chosen if not (_inside(root, p) and p.resolve().is_file())]
    if refused:
        links = ", ".join(f"{p.relative_to(folder).as_posix()} -> {os.path.realpath(p)}" for p in sorted(set(refused)))
        raise PushError(
            f"{folder}: refusing to upload symlinks that lead out of the run folder (or to no file): {links}. "
            "Replace each with the file itself or remove it; nothing was uploaded"
        )
    return [
        Upload(p.resolve() if p.is_symlink() else p, p.relative_to(folder).as_posix(), p.stat().st_size)
        for p in sorted(set(chosen))
    ]


def _inside(root: Path, path: Path) -> bool:
    """Whether `path`, every symlink on the way resolved, lies inside the (resolved) folder `root`."""
    return path.resolve().is_relative_to(root)


def format_plan(plan: list[Upload]) -> str:
    """One line per file (size, path in repo) and a total."""
    lines = [f"{u.size:>12,d}  {u.path_in_repo}" for u in plan]
    return "\n".join([*lines, f"{sum(u.size for u in plan):>12,d}  total, {len(plan)} files"])


def card_for_upload(folder: str | Path, repo_id: str | None = None) -> bytes | None:
    """The card as it goes up: `base_model` re-resolved now, since the run folder this one was trained from
    may have been pushed after this card was written (its repo then becomes this card's `base_model`).

    In the usage code, the folder's own path becomes `repo_id`, and each run folder it loads that was pushed
    becomes that repo's id: readers of the Hub page load from the Hub, not from this machine's paths.
    """
    from huggingface_hub import ModelCard

    from instruct_tune.models.adapter_base import adapter_chain, base_hub_id

    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return None
    card = ModelCard.load(path)
    config = Path(folder) / CONFIG_FILE
    source = (yaml.safe_load(config.read_text()) or {}).get("model_name_or_path") if config.is_file() else None
    pushed_source = bool(source) and (Path(source) / HUB_FILE).is_file()
    if pushed_source or not card.data.base_model:
        card.data.base_model = hub_id_of(source) or card.data.base_model
    root, adapters = adapter_chain(folder)
    names = {str(Path(p).resolve()): base_hub_id(p) for p in [root, *adapters[:-1]] if Path(p).exists()}
    names[str(Path(folder).resolve())] = repo_id
    for path, hub_id in names.items():
        if hub_id:
            card.text = card.text.replace(f'"{path}"', f'"{hub_id}"')
    return str(card).encode()


def _http_status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def push_files(
    uploads: Sequence[Upload],
    repo_id: str,
    *,
    repo_type: str = "model",
    private: bool = False,
    revision: str | None = None,
    commit_message: str,
    contents: Mapping[str, bytes] | None = None,
) -> str:
    """Upload `uploads` to the `repo_type` repo `repo_id` in one commit; returns the commit URL.

    `contents` sends bytes in place of the local file of a path in the repo (the card as it goes up). The repo
    (and `revision`'s branch) is created when missing. Every failure is a PushError naming its cause.
    """
    check_repo_id(repo_id)
    import huggingface_hub
    from huggingface_hub import CommitOperationAdd, HfApi

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise PushError("HF_HUB_OFFLINE is set: unset it to push (nothing was uploaded)")
    token = huggingface_hub.get_token()
    if not token:
        raise PushError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access); "
            "nothing was uploaded"
        )
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    contents = contents or {}
    operations = [
        CommitOperationAdd(path_in_repo=u.path_in_repo, path_or_fileobj=contents.get(u.path_in_repo, str(u.local)))
        for u in uploads
    ]
    try:
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, repo_type=repo_type, branch=revision, exist_ok=True)
        info = api.create_commit(
            repo_id, repo_type=repo_type, operations=operations, commit_message=commit_message, revision=revision
        )
    except Exception as error:  # the Hub client raises HTTP, connection and validation errors alike
        status = _http_status(error)
        if status in (401, 403):
            raise PushError(
                f"the Hub refused the token for {repo_id} (HTTP {status}): it needs write access to that "
                "namespace; nothing was uploaded"
            ) from None
        if status == 404:
            branch = f", or it has no branch {revision!r}" if revision else ""
            raise PushError(
                f"the Hub answered HTTP 404 for {repo_id}: the repo does not exist or this token has no access "
                f"to it{branch}; nothing was uploaded"
            ) from None
        if status is not None:
            raise PushError(f"the Hub answered HTTP {status} for {repo_id}: {str(error)[:300]}") from None
        if isinstance(error, (OSError, ConnectionError)) or "connect" in type(error).__name__.lower():
            raise PushError(f"cannot reach {api.endpoint}: {type(error).__name__} (offline?)") from None
        raise
    return str(info.commit_url)


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    include_checkpoints: bool = False,
    dry_run: bool = False,
) -> tuple[list[Upload], str | None]:
    """Upload the run folder's plan to `repo_id` in one commit (`push_files`); returns the plan and the commit
    URL.

    With `dry_run` nothing is contacted and the URL is None. Local files are only read.
    """
    check_repo_id(repo_id)
    plan = upload_plan(folder, include_checkpoints=include_checkpoints)
    if dry_run:
        return plan, None
    card = card_for_upload(folder, repo_id)
    url = push_files(
        plan,
        repo_id,
        private=private,
        revision=revision,
        commit_message=commit_message or f"Upload {Path(folder).name} from instruct-tune",
        contents={CARD_FILE: card} if card is not None else None,
    )
    record = {"repo_id": repo_id, "revision": revision, "commit_url": url}
    (Path(folder) / HUB_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return plan, url
