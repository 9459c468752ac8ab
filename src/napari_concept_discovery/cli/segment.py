"""``segment``: nuclei and cell labels of a plate into a label folder, with its quality table."""

from __future__ import annotations

from pathlib import Path

from .common import add_plate_options, command, open_plate_from_args
from .output import (
    Console,
)


def add_segment(sub) -> None:
    from ..settings import SegmentSettings, add_arguments

    p = command(
        sub,
        "segment",
        "segment nuclei and cells of every site of a plate into a label folder",
        [
            "concept-discovery segment plates/ --out labels/",
            "concept-discovery embed plates/ --labels labels/ --out store.zarr",
        ],
        description=(
            "Write <plate>/<well>_s<site>_cells.tif and _nuclei.tif per site. The default "
            "folder, <plate folder>/segmentation, is found by info and embed by themselves; "
            "give any other folder to them with --labels. The classical segmenter is "
            "CellProfiler's: nuclei from a per-image threshold, cells grown from them by "
            "Propagation through a per-image foreground; to reproduce a CellProfiler pipeline, "
            "give the same channel (--cell), threshold (--cell-threshold, --cell-log) and "
            "correction factor."
        ),
    )
    p.add_argument("plate", help="plate folder (any layout that 'info' understands)")
    p.add_argument(
        "--out", default=None, help="label folder (default: <plate folder>/segmentation)"
    )
    add_plate_options(p)
    add_arguments(p, SegmentSettings)
    p.set_defaults(func=run_segment)


def say_quality(con: Console, qc, sites: int, where: str = "the store's quality table") -> int:
    """Print a segmentation quality table's summary and flagged sites; warn (even under
    --quiet) when sites are flagged. Returns the number flagged."""
    from ..segment.qc import summary

    for line in summary(qc):
        con.say(line)
    flagged = int(qc["flag"].sum()) if qc is not None and len(qc) else 0
    if flagged:  # said even under --quiet: the cells of these sites are likely wrong
        con.warn(
            f"{flagged} of {sites} site(s) flagged by segmentation quality control; see {where}"
        )
    return flagged


def run_segment(args, con: Console) -> int:
    from ..plate.segmentation import segment_plate
    from ..settings import SegmentSettings, from_args

    settings = from_args(SegmentSettings, args)
    plate = open_plate_from_args(args)
    from ..segment.qc import QC_FILE, read_qc

    with con.bar(len(plate), "segment sites") as bar:
        out = segment_plate(plate, args.out, settings=settings, progress=bar)
    con.say(f"wrote labels of {len(plate)} sites to {out}")
    flagged = say_quality(con, read_qc(out), len(plate), str(Path(out) / QC_FILE))
    con.result(
        out=Path(out).resolve(),
        plate=plate.root,
        sites=len(plate),
        settings=settings.to_dict(),
        qc=str(Path(out) / QC_FILE),
        flagged=flagged,
    )
    return 0
