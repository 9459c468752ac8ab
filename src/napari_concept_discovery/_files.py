"""File helpers every step shares: atomic writes and content hashes.

A reader must never see half a file, so every write goes to a temporary name in the same folder
and is renamed into place (``os.replace`` is atomic on one file system). Hashes identify content,
not names: a renamed copy of the same weights or image hashes the same.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

_CHUNK = 1 << 22
_UMASK_LOCK = threading.Lock()


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: 0666 less the umask."""
    with _UMASK_LOCK:  # the umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def _temp_beside(path: Path) -> tuple[int, str]:
    """A temporary file beside ``path`` with an ordinary file's mode (mkstemp's is 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return fd, tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file, fsync and a rename."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (parquet, tiff).

    On normal exit the temporary file replaces ``path``; on an exception it is removed and
    ``path`` is left as it was.
    """
    path = Path(path)
    fd, tmp = _temp_beside(path)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_parquet(df, path: str | os.PathLike) -> Path:
    """Write a DataFrame to parquet atomically (no index)."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(path)


def process_alive(pid: int) -> bool:
    """Whether a process of this host with this pid runs (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    except OSError:
        return False
    return True


def _owner_tag() -> str:
    """``<host>-<pid>-<random>``: whose temporary folder this is, so an orphan can be told."""
    import socket

    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40]
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex}"


def remove_orphans(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders beside ``path`` (``.<name>.<host>-<pid>-<hex>.tmp`` or
    ``.old``) left by a process of this host that no longer runs (killed with ``kill -9``, a
    power cut); the folders of a live process, or of another host, are left alone."""
    import socket

    path = Path(path)
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40]
    pattern = re.compile(
        rf"^\.{re.escape(path.name)}\.{re.escape(host)}-(\d+)-[0-9a-f]{{32}}\.(tmp|old)$"
    )
    removed = []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        m = pattern.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not process_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder that replaces the folder ``path`` as a whole on normal exit.

    The old folder (if any) stays whole until the new one is complete; on an exception the
    temporary folder is removed and the old one is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    tmp = path.with_name(f".{path.name}.{_owner_tag()}.tmp")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.{_owner_tag()}.old")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output(path: str | os.PathLike, *, folder: bool, what: str) -> Path:
    """Refuse, before any work is done, an output path that cannot be written.

    A file where a folder is asked for (or the reverse), a parent that is a file, or a folder
    without write permission is an :class:`~.errors.OutputError` naming ``what`` and the path.
    Returns the path with ``~`` expanded.
    """
    from .errors import OutputError

    path = Path(path).expanduser()
    kind = "folder" if folder else "file"
    if path.exists() and path.is_dir() != folder:
        other = "a folder" if path.is_dir() else "a file"
        raise OutputError(f"{what} {path} is {other}; give a {kind} path")
    places = [path] if folder and path.is_dir() else []
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot write {what} {path}: {ancestor} is a file, not a folder")
    places.append(ancestor)
    for place in places:
        if not os.access(place, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write {what} {path}: no write permission in {place}")
    return path


def physical_memory() -> int | None:
    """This machine's memory in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def human_bytes(n: float) -> str:
    """``40.1 GB``: a size in powers of 1000, three significant digits."""
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} EB"


#: Room left free beyond what a write is expected to take (file system and HDF5 overheads).
FREE_MARGIN = 1 << 20


def check_free_space(folder: str | os.PathLike, need: int, *, what: str) -> None:
    """Refuse, before writing, a write of about ``need`` bytes into ``folder`` that the disk
    has no room for: an ``OSError`` (ENOSPC) naming ``what`` and both sizes. Some writers
    (HDF5 through h5py) do not fail cleanly on a full disk, so they are not started."""
    import errno

    free = shutil.disk_usage(folder).free
    if free < need + FREE_MARGIN:
        raise OSError(
            errno.ENOSPC,
            f"not enough free space to write {what}: it needs about "
            f"{(need + FREE_MARGIN) / 1e6:.1f} MB, {free / 1e6:.1f} MB are free on that disk; "
            "free some space or choose another output folder",
        )


def owned_files(folder: str | os.PathLike, marker: str) -> set[str]:
    """The names of the files in ``folder`` that this package wrote there, by the folder's
    ``marker`` (a JSON object whose ``files`` lists them, as a list or as a dict's values),
    the marker itself included; empty when there is no readable marker."""
    import json

    try:
        listed = json.loads((Path(folder) / marker).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return set()
    if isinstance(listed, dict):
        listed = list(listed.values())
    if not isinstance(listed, list):
        return set()
    return {str(n) for n in listed} | {marker}


def check_not_foreign(
    folder: str | os.PathLike,
    *,
    marker: str,
    what: str,
    kind: str,
    writes: Iterable[str] | None = None,
) -> Path:
    """The one rule of every command that writes: never write over a file it did not write.

    ``folder`` (``what``, e.g. "report folder") is an output folder that a command fills with
    the files ``writes`` (names or relative paths; or, with ``writes=None``, replaces whole, so that every file in it
    counts) and in which it leaves ``marker`` listing them (:func:`owned_files`). A file that
    would be replaced and that the marker does not list is somebody else's: an
    :class:`~.errors.OutputError` names it before any work. ``kind`` names what the command
    writes ("an analysis"). Returns the folder with ``~`` expanded.
    """
    from .errors import OutputError

    out = check_output(folder, folder=True, what=what)
    if not out.is_dir():
        return out
    if writes is None:
        at_risk = sorted(p.name for p in out.iterdir())
    else:  # names in the folder, or paths below it
        at_risk = [str(n) for n in writes if (out / n).exists() or (out / n).is_symlink()]
    foreign = sorted(set(at_risk) - owned_files(out, marker))
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        how = "replaces its folder whole" if writes is None else "would replace them"
        raise OutputError(
            f"{out} exists and holds files that are not {kind} ({shown}); {kind} {how}, so "
            "choose another output folder (or move those files away)"
        )
    return out


def hash_file(path: str | os.PathLike, *, algorithm: str = "sha256") -> str:
    """Hex digest of one file's bytes."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _files_under(path: Path) -> list[Path]:
    """``path`` itself when it is a file; every file under a folder (a zarr image), in a fixed
    order (by relative path), hidden ones (``.zarray``, ``.zattrs``) too."""
    if not path.is_dir():
        return [path]
    found = []
    for folder, dirs, names in os.walk(path):
        dirs.sort()
        found.extend(Path(folder) / n for n in sorted(names))
    return sorted(found, key=lambda f: f.relative_to(path).as_posix())


def hash_files(paths: Iterable[str | os.PathLike]) -> str:
    """blake2b over the given files' names, sizes and full contents, in order.

    A folder (an OME-Zarr field or label image) stands for every file under it: their paths
    relative to the folder, sizes and contents, in sorted order. Raises ``OSError`` for a file
    that cannot be read; callers turn it into their own error naming the file.
    """
    h = hashlib.blake2b(digest_size=20)
    for p in paths:
        p = Path(p)
        for f in _files_under(p):
            name = p.name if f == p else f"{p.name}/{f.relative_to(p).as_posix()}"
            h.update(f"{name}:{f.stat().st_size};".encode())
            with open(f, "rb") as fh:
                while block := fh.read(_CHUNK):
                    h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    """``$NAPARI_CONCEPT_DISCOVERY_CACHE``, else ``$XDG_CACHE_HOME`` or ``~/.cache``, per plugin."""
    env = os.environ.get("NAPARI_CONCEPT_DISCOVERY_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "napari-concept-discovery"
