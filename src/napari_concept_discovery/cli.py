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
    p = sub.add_parser(
        "info",
        help="describe a plate folder: layout, plates, wells, sites, channels, metadata, problems",
    )
    p.add_argument("plate", help="plate folder (RxRx, Phenix/JUMP, per-site TIFF, or --pattern)")
    p.add_argument(
        "--layout",
        default="auto",
        choices=["auto", "rxrx", "phenix", "jump", "tiff-csv", "pattern"],
        help="folder layout (default: detect it)",
    )
    p.add_argument(
        "--pattern",
        help="filename pattern with named fields, e.g. '{well}_01_{channel_index}_{site}_{channel}_001.tif'",
    )
    p.add_argument("--metadata", help="metadata table (csv/tsv/parquet) joined by plate/well/site")
    p.add_argument("--channel-names", help="comma-separated channel names in channel order")
    p.add_argument(
        "--check", action="store_true", help="read every file header, even on a big plate"
    )
    p.set_defaults(func=_run_info)


def _run_info(args) -> int:
    import warnings

    from .plate import PlateWarning, open_plate

    names = args.channel_names.split(",") if args.channel_names else None
    with warnings.catch_warnings():
        # Printed below from plate.warnings, once and in order.
        warnings.simplefilter("ignore", PlateWarning)
        plate = open_plate(
            args.plate,
            layout=args.layout,
            pattern=args.pattern,
            metadata=args.metadata,
            channel_names=names,
            check=True if args.check else None,
        )
    wells = plate.wells
    distinct = sorted({w for _, w in wells})
    shown = ", ".join(distinct[:12]) + (" ..." if len(distinct) > 12 else "")
    print(f"folder:   {plate.root}")
    print(f"layout:   {plate.layout}")
    more = " ..." if len(plate.plates) > 6 else ""
    print(f"plates:   {len(plate.plates)} ({', '.join(plate.plates[:6])}{more})")
    print(f"wells:    {len(wells)} on all plates ({shown})")
    print(f"sites:    {len(plate)}")
    print(f"channels: {len(plate.channel_names)} ({', '.join(plate.channel_names)})")
    print(f"shape:    {plate.image_shape} (C, H, W)")
    print(f"dtype:    {plate.dtype}")
    if plate.metadata is None:
        print("metadata: none")
    else:
        cols = [str(c) for c in plate.metadata.columns]
        print(f"metadata: {len(plate.metadata)} rows; columns: {', '.join(cols)}")
    labelled = sum(site.labels_path is not None for site in plate)
    if labelled:
        print(f"labels:   {labelled} of {len(plate)} sites carry cell labels")
    print(f"warnings: {len(plate.warnings)}")
    for message in plate.warnings:
        print(f"  - {message}")
    return 0


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
