"""The Hugging Face hub as a model source: the local cache first, the network when allowed.

``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` are read when a model is asked for, not when
``huggingface_hub`` is imported, so a GUI or a test can point at another cache, or go offline,
in a running process. A snapshot's folder is named after its commit, which is how a loaded
backend records the exact revision it came from (docs/architecture.md, "Models").
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import ModelError

#: The files a model needs; README, images and other large extras are not fetched.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.pth", "*.pt"]
COMMIT = re.compile(r"[0-9a-f]{40}")
_TRUE = ("1", "true", "yes", "on")


def hub_cache_dir() -> Path:
    """The hub cache folder: ``HF_HUB_CACHE`` as set now, else huggingface_hub's default."""
    env = os.environ.get("HF_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def hub_offline() -> bool:
    """Whether the network must not be used: ``HF_HUB_OFFLINE`` as set now, else at import."""
    env = os.environ.get("HF_HUB_OFFLINE")
    if env is not None:
        return env.strip().lower() in _TRUE
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _download(repo_id: str, revision: str | None, local_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=str(hub_cache_dir()),
            local_files_only=local_only,
            allow_patterns=HUB_PATTERNS,
        )
    )


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """Local folder of a hub repository: from the cache, else downloaded unless offline.

    Failure is a ModelError saying why and how to get the files onto an offline machine.
    """
    offline = hub_offline()
    try:
        return _download(repo_id, revision, offline)
    except Exception as exc:
        kind = type(exc).__name__
        detail = f" Detail: {kind}: {exc}"
        if kind in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
            why = f"the hub refused it ({kind})"
        elif offline:
            why, detail = "HF_HUB_OFFLINE is set and it is not in the local cache", ""
        else:
            why = "the hub could not be reached and it is not in the local cache"
        name = repo_id + (f"@{revision}" if revision else "")
        raise ModelError(
            f"cannot get {name!r} from the Hugging Face hub: {why} (cache {hub_cache_dir()}). "
            f"On a machine with network, run `hf download {repo_id} --local-dir DIR`, copy DIR "
            f"here and pass DIR as the model (or run once online to fill the cache).{detail}"
        ) from exc


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The cached snapshot folder of a repository, or None; never uses the network."""
    try:
        return _download(repo_id, revision, True)
    except Exception:
        return None


def snapshot_commit(folder: Path) -> str | None:
    """The commit a cached snapshot folder holds (its name), or None for another folder."""
    name = Path(folder).name
    return name if COMMIT.fullmatch(name) and Path(folder).parent.name == "snapshots" else None


def cached_repo_ids() -> list[str]:
    """Ids of the model repositories in the hub cache (folders ``models--owner--name``)."""
    cache = hub_cache_dir()
    if not cache.is_dir():
        return []
    ids = []
    for d in sorted(cache.glob("models--*")):
        parts = d.name.split("--")[1:]
        if d.is_dir() and len(parts) == 2 and all(parts):
            ids.append("/".join(parts))
    return ids
