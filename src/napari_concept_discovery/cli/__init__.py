"""Headless command line: the same steps as the widgets, one subcommand per step.

A module per step (``plate``, ``segment``, ``embed``, ``dictionary``, ``analysis``, ``report``,
``demo``, ``models``, ``view``) holds ``add_<command>``, which registers a subcommand, and
``run_<command>``, its handler; the handler only parses arguments and calls the library, so the
CLI and the GUI share one code path. Imports of heavy modules (torch, napari) happen inside the
handlers to keep ``--help`` fast. Where output goes (``--quiet``, ``--json``, progress bars,
exit codes) is decided in ``output``, once for every subcommand; see docs/architecture.md.
"""

from __future__ import annotations

import argparse
import errno
import sys
import textwrap
import traceback
import warnings

from .. import __version__
from ..errors import ConceptDiscoveryError
from .analysis import add_analyze, add_cells, add_similar
from .common import global_options, show_warning
from .demo import add_demo
from .dictionary import add_train
from .embed import add_embed
from .models import add_models
from .output import (
    EXIT_CODES,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_REFUSED,
    Console,
    HelpFormatter,
    examples,
)
from .plate import add_convert, add_info, add_synth
from .report import add_report
from .segment import add_segment
from .view import add_view

STORY = (
    "concept-discovery synth plates/ --plates 2 --wells 24",
    "concept-discovery embed plates/ --out store.zarr",
    "concept-discovery train store.zarr --atoms 256 --out dict.safetensors",
    "concept-discovery analyze store.zarr dict.safetensors --out analysis/",
    "concept-discovery report store.zarr dict.safetensors --out report/",
)


def _top_epilog() -> str:
    codes = "\n".join(
        textwrap.fill(text, 78, initial_indent=f"  {code:<5}", subsequent_indent=" " * 7)
        for code, text in EXIT_CODES.items()
    )
    return (
        examples(*STORY, "concept-discovery demo demo-out/ --json")
        + "\n\nEvery command takes -q/--quiet, --json and --debug, before or after its name; "
        "`concept-discovery COMMAND --help` shows its options and examples. With --json, "
        "stdout holds one JSON object (command, ok, exit_code, elapsed_s, error on failure, "
        "and what the command made) and everything else goes to stderr."
        + "\n\nexit codes:\n"
        + codes
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="concept-discovery",
        description="Discover biological concepts in microscopy foundation models.",
        epilog=_top_epilog(),
        formatter_class=HelpFormatter,
        parents=[global_options(sub=False)],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (
        add_demo,
        add_synth,
        add_info,
        add_segment,
        add_embed,
        add_train,
        add_analyze,
        add_similar,
        add_cells,
        add_convert,
        add_report,
        add_models,
        add_view,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (see EXIT_CODES and docs/cli.md)."""
    args = build_parser().parse_args(argv)
    con = Console(args.command, quiet=args.quiet, json=args.json)
    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        try:
            code = int(args.func(args, con) or 0)
        except ConceptDiscoveryError as exc:
            con.error(str(exc))
            return con.finish(EXIT_REFUSED, str(exc))
        except KeyboardInterrupt as exc:
            said = f"interrupted: {exc}" if str(exc) else "interrupted"
            print(said, file=sys.stderr, flush=True)
            return con.finish(EXIT_INTERRUPTED, said)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                return _failed(args, con, exc)
            where = f" ({exc.filename})" if exc.filename else ""
            out = f" writing {args.out}" if getattr(args, "out", None) else ""
            message = f"the disk is full{out}: {exc.strerror or exc}{where}"
            if args.debug:
                traceback.print_exc()
            con.error(message)
            return con.finish(EXIT_FAILED, message)
        except Exception as exc:
            return _failed(args, con, exc)
    return con.finish(code)


def _failed(args, con: Console, exc: Exception) -> int:
    """An unexpected error: one line (the traceback with --debug), exit 1."""
    message = f"{type(exc).__name__}: {exc}"
    if args.debug:
        traceback.print_exc()
        con.error(message)
    else:
        con.error(f"{message} (rerun with --debug to see the traceback)")
    return con.finish(EXIT_FAILED, message)
