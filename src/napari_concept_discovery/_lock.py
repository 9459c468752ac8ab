"""A lock file beside a folder while it is written, so that two writers never interleave.

The lock ``.<name>.lock`` sits beside the folder (not inside it, since a folder built beside
and swapped into place would take a lock inside it along). It holds the owner's pid, host and
start time, and appears whole: it is written under a temporary name and hard-linked into
place, which fails when a lock is already there. A lock left by a process that is gone (same
host, pid no longer running) is stale and taken over; any other lock is an error that names
the owner (docs/architecture.md, "The activation store").
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ._files import atomic_write_text
from ._files import process_alive as _alive


def lock_path(target: str | os.PathLike) -> Path:
    """Where the lock of ``target`` (a folder) lives."""
    target = Path(target)
    return target.with_name(f".{target.name}.lock")


def read_lock(target: str | os.PathLike) -> dict | None:
    """The owner recorded in ``target``'s lock, or None when there is none (or it is unreadable)."""
    try:
        owner = json.loads(lock_path(target).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def is_stale(owner: dict) -> bool:
    """A lock of this host whose process no longer runs."""
    if owner.get("host") != socket.gethostname():
        return False
    try:
        pid = int(owner.get("pid"))
    except (TypeError, ValueError):
        return True
    return pid != os.getpid() and not _alive(pid)


def describe_owner(target: str | os.PathLike, owner: dict, what: str) -> str:
    """``store S is being written by process P since T`` (with the host when it is another)."""
    since = owner.get("since")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(since)))
        if isinstance(since, int | float)
        else "an unknown time"
    )
    text = f"{what} {target} is being written by process {owner.get('pid', '?')} since {when}"
    host = owner.get("host")
    if host and host != socket.gethostname():
        text += (
            f" on host {host}; wait for it to finish (if that process is gone, delete "
            f"{lock_path(target)})"
        )
    else:
        text += "; wait for it to finish, or stop that process"
    return text


def _take_over(path: Path, seen: dict) -> None:
    """Remove a stale lock, unless another process replaced it meanwhile."""
    aside = path.with_name(f"{path.name}.{uuid.uuid4().hex}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    try:
        taken = json.loads(aside.read_text())
    except (OSError, ValueError):
        taken = None
    if taken is not None and taken != seen:  # a live lock taken by mistake: put it back
        try:
            os.link(aside, path)
        except OSError:
            pass
    aside.unlink(missing_ok=True)


def _create(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text`` whole; False when it exists already."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    atomic_write_text(tmp, text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links on this file system: exclusive create
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        return True
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def write_lock(target: str | os.PathLike, *, what: str, error: type[Exception]) -> Iterator[dict]:
    """Hold the lock of ``target`` while the block runs; ``error`` (naming the owner) if held."""
    target = Path(target)
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    text = json.dumps(mine)
    for _ in range(5):
        if _create(path, text):
            break
        owner = read_lock(target)
        if owner is None:  # vanished between the two calls (or unreadable): try again
            if path.exists() and time.time() - path.stat().st_mtime > 60:
                _take_over(path, {})
            continue
        if is_stale(owner):
            _take_over(path, owner)
            continue
        raise error(describe_owner(target, owner, what))
    else:
        owner = read_lock(target) or {}
        raise error(describe_owner(target, owner, what))
    try:
        yield mine
    finally:
        if read_lock(target) == mine:
            path.unlink(missing_ok=True)
