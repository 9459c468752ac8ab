"""Headless command line: the same steps as the widgets, one subcommand per step.

Each ``_add_<step>`` function registers one subcommand and its ``_run_<step>`` handler; the
handler only parses arguments and calls the library, so the CLI and the GUI share one code path.
Imports of heavy modules (torch, napari) happen inside the handlers to keep ``--help`` fast.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import ConceptDiscoveryError


def _progress(total: int, desc: str):
    """A terminal progress bar (tqdm) that writes to stderr."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)


# --- synth (issue: package, plates, synthetic data) ----------------------------------------


def _add_synth(sub) -> None:
    pass


# --- segment -------------------------------------------------------------------------------


def _add_segment(sub) -> None:
    pass


# --- info: describe a plate folder ---------------------------------------------------------


def _add_info(sub) -> None:
    pass


# --- embed (issue: foundation models and embedding) ----------------------------------------


def _add_embed(sub) -> None:
    pass


# --- train / analyze (issue: dictionary learning core) -------------------------------------


def _add_train(sub) -> None:
    pass


def _add_analyze(sub) -> None:
    pass


# --- entry point ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="concept-discovery",
        description="Discover biological concepts in microscopy foundation models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_synth, _add_info, _add_segment, _add_embed, _add_train, _add_analyze):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConceptDiscoveryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
