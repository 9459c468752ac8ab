"""Printing a benchmark's output and keeping it: ``with results_file(path): ...``.

Every line printed inside the block also goes to ``path`` (benchmarks/results/<name>.txt by
default), written atomically when the block ends, so that one command both shows the table and
records it for the quiet-machine rerun.

Also the ``--threads`` option the torch benchmarks share: ``add_threads(parser, default)`` where
the option stands in the parser, ``use_threads(args.threads)`` once the arguments are parsed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

from napari_concept_discovery._files import atomic_write_text

RESULTS = Path(__file__).parent / "results"


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s: str) -> int:
        for stream in self.streams:
            stream.write(s)
        return len(s)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@contextlib.contextmanager
def results_file(path: Path | str | None, header: str = ""):
    """Mirror stdout into ``path`` (nothing kept when ``path`` is None or empty)."""
    if not path:
        yield
        return
    buf = io.StringIO()
    old = sys.stdout
    sys.stdout = _Tee(old, buf)
    try:
        yield
    finally:
        sys.stdout = old
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(path), header + buf.getvalue())
        print(f"wrote {path}")


def default_path(name: str) -> str:
    return str(RESULTS / f"{name}.txt")


def print_and_keep(lines, out: Path | str | None) -> None:
    """Print a benchmark's result lines and, with ``out``, keep them there (atomically)."""
    text = "\n".join(lines)
    print(text)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out), text + "\n")


def stamped_log():
    """A ``log(msg)`` that prints to stderr with the seconds since it was made (progress of a
    long benchmark, kept apart from the result lines on stdout)."""
    import time

    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:5.0f} s] {msg}", file=sys.stderr, flush=True)

    return log


@contextlib.contextmanager
def kernels_off():
    """Inside: bf16 runs torch's SDPA and ops instead of the compiled kernels (the 'before' arm
    of a comparison). Sets the process-wide switch, so only for single-threaded benchmark code."""
    import os

    from napari_concept_discovery.models.cpu_bf16 import ENV

    old = os.environ.get(ENV)
    os.environ[ENV] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[ENV]
        else:
            os.environ[ENV] = old


def add_threads(parser: argparse.ArgumentParser, default: int = 1) -> None:
    """The ``--threads`` option: how many CPU threads torch may use."""
    parser.add_argument("--threads", type=int, default=default)


def use_threads(n: int) -> None:
    """Let torch use ``n`` CPU threads (torch imported here, so that ``--help`` stays quick)."""
    import torch

    torch.set_num_threads(n)
