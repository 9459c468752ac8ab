"""Where the command line writes: result lines, progress bars, warnings, the JSON summary.

One :class:`Console` per command run, made from the global options (``--quiet``, ``--json``), so
every subcommand behaves alike:

- result lines (``wrote store.zarr: ...``) go to stdout; with ``--json`` to stderr, so stdout holds
  only the summary; with ``--quiet`` nowhere;
- notes about the run (model, device) go to stderr, and are off with ``--quiet``;
- progress bars go to stderr, and are off with ``--quiet`` or ``--json``;
- warnings and errors always go to stderr;
- with ``--json`` one JSON object is printed on stdout at the end, on success or failure.

Progress bars redraw in place (tqdm) on a terminal; when stderr is a file or a pipe (a cluster
job's log), they print a line at every tenth of the work instead. See docs/architecture.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
import time
from pathlib import Path

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_REFUSED = 2
EXIT_INTERRUPTED = 130

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_FAILED: "failed for a reason other than the input: a bug or the system (a full disk, "
    "a lost file system); one line says what, --debug shows the traceback",
    EXIT_REFUSED: "refused: a bad option, or input that cannot be used (a missing or malformed "
    "file, an unknown well or column, an output that would be overwritten); the message names the "
    "file, well or option",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); finished parts are kept (embed and train resume)",
}


class HelpFormatter(argparse.HelpFormatter):
    """Wraps prose paragraphs as argparse does but keeps indented lines (examples) as written."""

    def _fill_text(self, text, width, indent):
        paragraphs = textwrap.dedent(text).strip("\n").split("\n\n")
        out = []
        for para in paragraphs:
            lines = para.split("\n")
            if len(lines) > 1 and all(line.startswith(" ") for line in lines[1:]):
                out.append("\n".join(indent + line for line in lines))  # a heading and a list
            else:
                out.append(super()._fill_text(para, width, indent))
        return "\n\n".join(out)


def examples(*lines: str, note: str = "") -> str:
    """An epilog of runnable examples, one per line, indented so the formatter keeps them."""
    text = "example" + ("s" if len(lines) > 1 else "") + ":\n" + "\n".join(f"  {x}" for x in lines)
    return text + (f"\n\n{note}" if note else "")


def jsonable(value):
    """Plain JSON types for numpy scalars, paths, tuples and NaN (null: JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


class Console:
    """Output of one command run; see the module docstring for what goes where."""

    def __init__(self, command: str = "", *, quiet: bool = False, json: bool = False):
        self.command = command
        self.quiet = quiet
        self.json = json
        self.summary: dict = {}
        self.started = time.perf_counter()

    # Looked up on every write: tests and callers may swap sys.stdout / sys.stderr.
    @property
    def stdout(self):
        return sys.stderr if self.json else sys.stdout

    @property
    def show_progress(self) -> bool:
        return not (self.quiet or self.json)

    def say(self, message: str) -> None:
        """A result line: stdout (stderr under --json), nothing under --quiet."""
        if not self.quiet:
            print(message, file=self.stdout, flush=True)

    def note(self, message: str) -> None:
        """Information about the run (model, device): stderr, nothing under --quiet."""
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        """Something the user should know even under --quiet."""
        print(f"warning: {message}", file=sys.stderr, flush=True)

    def error(self, message: str) -> None:
        print(f"error: {message}", file=sys.stderr, flush=True)

    def result(self, **fields) -> None:
        """Add fields to the JSON summary."""
        self.summary.update(fields)

    def bar(self, total: int, desc: str) -> Bar:
        return Bar(total, desc, self.show_progress)

    def bars(self, stages: dict[str, str]) -> Bars:
        return Bars(self, stages)

    def finish(self, code: int, error: str | None = None) -> int:
        """Print the JSON summary (under --json) and return ``code``."""
        if self.json:
            head = {"command": self.command, "ok": code == EXIT_OK, "exit_code": code}
            if error is not None:
                head["error"] = error
            head["elapsed_s"] = round(time.perf_counter() - self.started, 3)
            body = {k: v for k, v in self.summary.items() if k not in head}
            text = json.dumps(jsonable({**head, **body}), indent=2)
            print(text, file=sys.stdout, flush=True)
        return code


class Bar:
    """One progress bar on stderr: tqdm on a terminal, a line per tenth of the work otherwise.

    Call it with a ``Progress`` (absolute ``done``), or ``update(n)`` to count ``n`` more units.
    """

    def __init__(self, total: int, desc: str, show: bool = True):
        self.total, self.desc, self.n = int(total), desc, 0
        self._tqdm = None
        self._printed = -1  # last tenth printed in line mode
        self._postfix: dict = {}
        self._started = time.perf_counter()
        self._show = show
        if show and _is_tty(sys.stderr):
            from tqdm.auto import tqdm

            self._tqdm = tqdm(total=self.total, desc=desc, file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.set(self.n + n)

    def set(self, done: int) -> None:
        done = int(done)
        if self._tqdm is not None:
            self._tqdm.update(done - self._tqdm.n)
        self.n = done
        if self._show and self._tqdm is None and self.total > 0:
            tenth = min(10, done * 10 // self.total)
            if tenth > self._printed:
                self._printed = tenth
                self._line()

    def __call__(self, p) -> None:
        self.set(p.done)

    def postfix(self, **fields) -> None:
        self._postfix = fields
        if self._tqdm is not None:
            self._tqdm.set_postfix(**fields)

    def _line(self) -> None:
        pct = 100 * self.n // max(self.total, 1)
        extra = "".join(f", {k} {v}" for k, v in self._postfix.items())
        took = time.perf_counter() - self._started
        print(
            f"{self.desc}: {self.n}/{self.total} ({pct}%, {took:.1f} s{extra})",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Bars:
    """Bars for ``Progress`` reports: one per stage named in ``stages``, made on demand.

    Training reports also show the latest loss, FVU and dead fraction.
    """

    def __init__(self, console: Console, stages: dict[str, str]):
        self.console = console
        self.stages = stages
        self.bars: dict[str, Bar] = {}

    def __call__(self, p) -> None:
        if p.stage not in self.stages:
            return
        bar = self.bars.get(p.stage)
        if bar is None or bar.total != p.total or p.done < bar.n:  # a new run of the stage
            if bar is not None:
                bar.close()
            bar = self.bars[p.stage] = self.console.bar(p.total, self.stages[p.stage])
        if p.stage == "train" and {"loss", "fvu", "dead_fraction"} <= set(p.info):
            i = p.info
            bar.postfix(
                loss=f"{i['loss']:.4g}", fvu=f"{i['fvu']:.3f}", dead=f"{i['dead_fraction']:.2f}"
            )
        bar(p)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
