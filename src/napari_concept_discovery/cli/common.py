"""What every subcommand shares: its parser (global options, examples under ``--help``), the
plate-reading options, range checks on counts and threads, and warnings as ``warning:`` lines.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from ..errors import ConceptDiscoveryError
from .output import (
    HelpFormatter,
    examples,
)


class UsageError(ConceptDiscoveryError):
    """Command-line options that contradict each other or are out of range."""


def at_least(value, name: str, low: int = 1) -> None:
    if value is not None and value < low:
        raise UsageError(f"{name} must be at least {low}, got {value}")


def check_threads(value: int | None) -> None:
    """--threads at least 1 and at most a few per CPU: each thread takes a stack, and tens of
    thousands of them leave no memory to load anything (it surfaced as unreadable images)."""
    at_least(value, "--threads")
    most = max(64, 4 * (os.cpu_count() or 1))
    if value is not None and value > most:
        raise UsageError(
            f"--threads must be at most {most} (4 per CPU, this machine has "
            f"{os.cpu_count()}), got {value}"
        )


def human_bytes(n: float) -> str:
    from .._files import human_bytes

    return human_bytes(n)


def physical_memory() -> int | None:
    from .._files import physical_memory

    return physical_memory()


def check_synth_args(args, workers: int = 1) -> None:
    """Plate counts and site size a synthetic plate set can have, and the memory it takes."""
    from ..synth.plate import MAX_WELLS, PEAK_BYTES_PER_PIXEL, memory_needed

    for name in ("plates", "wells", "sites"):
        at_least(getattr(args, name), f"--{name}")
    if args.wells > MAX_WELLS:
        raise UsageError(
            f"--wells must be at most {MAX_WELLS} (rows B..O x 22 columns), got {args.wells}"
        )
    at_least(args.size, "--size", 64)
    need, have = memory_needed(args.size, workers), physical_memory()
    if have is not None and need > have:
        most = int((have / PEAK_BYTES_PER_PIXEL / max(1, workers)) ** 0.5)
        raise UsageError(
            f"--size {args.size} would need about {human_bytes(need)} of memory to draw "
            f"{workers} site(s) at once; this machine has {human_bytes(have)}. Use --size "
            f"{most} or less"
        )


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings about the user's data as one ``warning:`` line; others as Python shows them."""
    from ..errors import DataWarning

    out = file if file is not None else sys.stderr
    if issubclass(category, DataWarning):
        out.write(f"warning: {message}\n")
    else:
        out.write(warnings.formatwarning(message, category, filename, lineno, line))


def global_options(sub: bool) -> argparse.ArgumentParser:
    """--quiet, --json and --debug, accepted before the command and after it.

    The copy on each subcommand defaults to SUPPRESS, so an option given before the command is
    not reset by the subcommand's parser.
    """
    p = argparse.ArgumentParser(add_help=False)
    default = argparse.SUPPRESS if sub else False
    g = p.add_argument_group("output options (before or after the command)")
    g.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default,
        help="no progress bars and no result lines; warnings and errors still go to stderr",
    )
    g.add_argument(
        "--json",
        action="store_true",
        default=default,
        help="print one JSON object on stdout at the end (what was made: paths, counts, "
        "timings, metrics); result lines go to stderr and progress bars are off",
    )
    g.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="show the traceback of an unexpected error (exit code 1)",
    )
    return p


def command(sub, name: str, help: str, example_lines, *, description=None, note: str = ""):
    """A subcommand's parser: the global options and runnable examples under its --help."""
    return sub.add_parser(
        name,
        help=help,
        description=description or help[0].upper() + help[1:] + ".",
        epilog=examples(*example_lines, note=note),
        formatter_class=HelpFormatter,
        parents=[global_options(sub=True)],
    )


def add_plate_options(p) -> None:
    """How to read the plate folder: the same options for every subcommand that opens one."""
    from ..plate.layouts import PlateOptions
    from ..settings import add_arguments

    add_arguments(p, PlateOptions)


def open_plate_from_args(args, **kwargs):
    from ..plate.layouts import PlateOptions
    from ..settings import from_args

    options = from_args(PlateOptions, args)
    return options.open(args.plate, labels=getattr(args, "labels", None), **kwargs)


def labels_help() -> str:
    """The --labels help of EmbedSettings, so info and embed describe the option alike."""
    from ..embed.plate import EmbedSettings
    from ..settings import describe

    return next(d["help"] for d in describe(EmbedSettings) if d["name"] == "labels")
