"""Where a model's weights are on this machine, and fetching them from the Hugging Face Hub (only
when the caller allows it).

`engine.checkpoint.resolve_checkpoint` asks, in this order: a local folder; a registry name or
alias; then, here, `$LIGHTX2V_MODEL_ROOT/<name>`, the Hugging Face hub cache, and a download.
Each place looked is recorded (`Search`), so that a model found nowhere gets one error listing
them all.

The hub cache is read through `huggingface_hub` as it lays it out
(`<cache>/models--<org>--<name>/refs/<revision>` holding a commit hash,
`snapshots/<commit>/...` linking into `blobs/`), with its environment read at call time, not at
import (so a changed `HF_HOME` / `HF_HUB_CACHE` / `HF_HUB_OFFLINE` / `HF_ENDPOINT` is seen):
- the cache folder: `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, else
  `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub` (huggingface_hub.constants);
- `HF_HUB_OFFLINE=1` (or `TRANSFORMERS_OFFLINE=1`): downloads are refused at once;
- `HF_HUB_ETAG_TIMEOUT` (seconds, default 10): how long the first request to the Hub may take
  before a download gives up (huggingface_hub's own metadata requests have no timeout, so an
  unreachable Hub would hang them: we ask the Hub once, with this timeout, before downloading).
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.registry import ModelSpec

log = logging.getLogger(__name__)

MODEL_ROOT_ENV = "LIGHTX2V_MODEL_ROOT"
"""Folder(s) of checkpoints, each in a sub-folder named as the model (several folders separated by
os.pathsep, e.g. "/models:/data/models")."""
DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_TIMEOUT_S = 10.0
_TRUE = {"1", "ON", "YES", "TRUE"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class ModelNotFoundError(ValueError):
    """A model resolved nowhere; the message lists every place looked."""


class DownloadError(OSError):
    """A download that was allowed could not be made (no network, unknown repo, gated, ...)."""


@dataclass
class Search:
    """The places looked for one model, each with what was found there (for the error)."""

    places: list[str] = field(default_factory=list)

    def note(self, place: str, outcome: str) -> None:
        self.places.append(f"{place}: {outcome}")

    def describe(self) -> str:
        return "\n".join(f"  - {p}" for p in self.places)


# ----------------------------------------------------------------------------- environment


def hub_cache_dir() -> str:
    """The hub cache folder as huggingface_hub computes it (huggingface_hub.constants), from the
    environment now."""
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return os.path.expandvars(os.path.expanduser(explicit))
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(os.path.expandvars(os.path.expanduser(home)), "hub")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set to a true value."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_timeout() -> float:
    """Seconds the first request to the Hub may take (HF_HUB_ETAG_TIMEOUT, default 10)."""
    try:
        value = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or DEFAULT_TIMEOUT_S)
    except ValueError:
        return DEFAULT_TIMEOUT_S
    return value if value > 0 else DEFAULT_TIMEOUT_S


def model_roots() -> list[str]:
    """The folders named by $LIGHTX2V_MODEL_ROOT (none when unset)."""
    value = os.environ.get(MODEL_ROOT_ENV, "")
    return [os.path.expanduser(p) for p in value.split(os.pathsep) if p]


# ----------------------------------------------------------------------------- names


def looks_like_repo_id(name: str) -> bool:
    """"org/name" as the Hub spells repo ids (one slash; letters, digits, '-', '_', '.'; no '--'
    or '..')."""
    return bool(_REPO_ID.match(name)) and "--" not in name and ".." not in name and len(name) <= 96


def hub_ids(model: str, spec: "ModelSpec | None") -> list[str]:
    """The repo ids to look for: `model` itself when it is one (spelled as the entry's alias when it
    matches one: the cache's folder names keep the Hub's spelling), then the registry entry's
    aliases that are repo ids, in their order (the entry's author lists the preferred one first)."""
    aliases = [a for a in spec.aliases if looks_like_repo_id(a)] if spec is not None else []
    if not looks_like_repo_id(model):
        return aliases
    given = next((a for a in aliases if a.casefold() == model.casefold()), model)
    return [given] + [a for a in aliases if a != given]


def root_names(model: str, spec: "ModelSpec | None") -> list[str]:
    """Sub-folder names to try under a model root: the name as given and its last path component,
    then (for a registry entry) its name and aliases, each also by its last component
    ("Wan-AI/Wan2.1-T2V-14B-Diffusers" -> "Wan-AI/Wan2.1-T2V-14B-Diffusers", "Wan2.1-T2V-14B-Diffusers")."""
    names = [model] + ([spec.name, *spec.aliases] if spec is not None else [])
    out = []
    for name in names:
        if os.path.isabs(name) or name.startswith((".", "~")):
            continue
        out += [name, name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]]
    return _unique([n for n in out if n])


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


# ----------------------------------------------------------------------------- places


def find_in_model_roots(names: list[str], search: Search) -> list[str]:
    """The existing folders `<root>/<name>` for every model root and name, in that order."""
    roots = model_roots()
    if not roots:
        search.note(f"${MODEL_ROOT_ENV}", "not set")
        return []
    found = []
    for root in roots:
        hits = [os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n))]
        found += hits
        if not os.path.isdir(root):
            search.note(f"${MODEL_ROOT_ENV}={root}", "no such directory")
        elif not hits:
            search.note(f"${MODEL_ROOT_ENV}={root}", f"no sub-folder {' or '.join(names)}")
    return found


def find_in_hub_cache(repo_id: str, revision: str | None, search: Search) -> str | None:
    """The snapshot folder of `repo_id` at `revision` (a branch, tag or commit hash; default
    "main") in the hub cache, or None. Never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    cache = hub_cache_dir()
    place = f"Hugging Face cache {cache}: {repo_id} at revision {revision or 'main'}"
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True)
    except LocalEntryNotFoundError as e:  # IncompleteSnapshotError (huggingface_hub 2.x) is one too
        incomplete = type(e).__name__ == "IncompleteSnapshotError"
        search.note(place, f"incomplete snapshot ({e})" if incomplete else "not cached")
        return None


def download(repo_id: str, revision: str | None, search: Search) -> str:
    """Download `repo_id` at `revision` into the hub cache (huggingface_hub's progress bars) and
    return its snapshot folder. Fails fast: refused at once when offline, and the Hub is asked
    first with a timeout (`hub_timeout`), so that no network means an error, not a hang.
    Raises `DownloadError` naming the repo, the endpoint and the places already looked."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import (GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                       RevisionNotFoundError)

    endpoint, timeout, cache = hub_endpoint(), hub_timeout(), hub_cache_dir()
    where = f"{repo_id} (revision {revision or 'main'}) from {endpoint}"

    def fail(reason: str) -> DownloadError:
        return DownloadError(f"could not download {where}: {reason}\nNot found locally either; looked in:\n"
                             f"{search.describe()}")

    if hub_offline():
        raise fail("HF_HUB_OFFLINE is set (downloads are off); unset it, or put the checkpoint in "
                   f"${MODEL_ROOT_ENV} or the cache")
    # 1. One metadata request with a timeout: an unreachable Hub fails here, quickly.
    api = HfApi(endpoint=endpoint)
    try:
        api.model_info(repo_id, revision=revision, timeout=timeout)
    except GatedRepoError:
        raise fail("the repository is gated: accept its terms on the Hub and log in "
                   "(`hf auth login` or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise fail(f"the repository has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise fail("no such repository (or it is private: log in with `hf auth login` or HF_TOKEN)") from None
    except HfHubHTTPError as e:
        raise fail(f"the Hub answered {e}") from None
    except Exception as e:  # connection refused, DNS, timeout: httpx's errors, whichever client
        raise fail(f"the Hub could not be reached ({type(e).__name__}: {e}; timeout {timeout:g} s, "
                   "HF_HUB_ETAG_TIMEOUT); check the network and HF_ENDPOINT") from None
    # 2. The files, into the cache (refs/<revision> is written, so later look-ups find it offline).
    log.warning("downloading %s into %s", where, cache)
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache, endpoint=endpoint,
                                 etag_timeout=timeout)
    except Exception as e:
        raise fail(f"{type(e).__name__}: {e}") from e


@dataclass(frozen=True)
class Found:
    """A checkpoint folder and where it was found."""

    path: str
    place: str


def locate(model: str, spec: "ModelSpec | None", search: Search, *, revision: str | None = None,
           download_allowed: bool = False) -> Found | None:
    """Places 3-5 of the resolution order for `model` (a name or hub id; `spec` its registry entry,
    if any): $LIGHTX2V_MODEL_ROOT, the hub cache, a download when allowed. The first folder found
    wins; None when there is none (every place looked is noted in `search`). A failed download
    raises `DownloadError`."""
    # 3. $LIGHTX2V_MODEL_ROOT/<name>
    hits = find_in_model_roots(root_names(model, spec), search)
    if hits:
        return Found(hits[0], f"${MODEL_ROOT_ENV}")
    # 4. The Hugging Face hub cache, by every repo id the name or the entry gives.
    ids = hub_ids(model, spec)
    if not ids:
        search.note(f"Hugging Face cache {hub_cache_dir()}", f"not looked: {model!r} is not a hub id (org/name)"
                    + (" and its registry entry lists none" if spec is not None else ""))
    for repo_id in ids:
        path = find_in_hub_cache(repo_id, revision, search)
        if path is not None:
            return Found(path, f"Hugging Face cache ({repo_id})")
    # 5. A download, only when allowed: the id the caller named, else the entry's first.
    if download_allowed and ids:
        return Found(download(ids[0], revision, search), f"downloaded ({ids[0]})")
    if download_allowed:
        search.note("download", "no hub id to download from: pass one (org/name)")
    elif ids:
        search.note("download", f"not allowed (pass download=True, or --download on the command line, "
                                f"to fetch {ids[0]} from {hub_endpoint()})")
    return None
