"""A Hugging Face hub cache written by hand, laid out exactly as huggingface_hub lays it out
(huggingface_hub/file_download.py: `repo_folder_name`, `_create_symlink`):

    <cache>/models--<org>--<name>/
        blobs/<sha256 of the content>         the files' bytes, once each
        refs/<branch or tag>                  the commit hash it points at (no newline)
        snapshots/<commit>/<path in repo>     relative symlinks into blobs/
"""
from __future__ import annotations

import hashlib
import os


def repo_folder(cache: str, repo_id: str) -> str:
    return os.path.join(str(cache), "models--" + repo_id.replace("/", "--"))


def write_snapshot(cache: str, repo_id: str, src: str, commit: str, refs: tuple[str, ...] = ("main",)) -> str:
    """Put every file of the folder `src` in the cache as `repo_id` at `commit`, with `refs`
    pointing at it. Returns the snapshot folder."""
    assert len(commit) == 40 and all(c in "0123456789abcdef" for c in commit), "a commit hash is 40 hex digits"
    repo = repo_folder(cache, repo_id)
    snapshot = os.path.join(repo, "snapshots", commit)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    for root, _, files in os.walk(src):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                data = f.read()
            blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
            if not os.path.exists(blob):
                with open(blob, "wb") as f:
                    f.write(data)
            pointer = os.path.join(snapshot, os.path.relpath(os.path.join(root, name), src))
            os.makedirs(os.path.dirname(pointer), exist_ok=True)
            os.symlink(os.path.relpath(blob, os.path.dirname(pointer)), pointer)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    for ref in refs:
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(commit)
    return snapshot
