"""The plate commands: ``synth`` (synthetic plates with ground truth), ``info`` (what a plate
folder holds) and ``convert`` (a plate as OME-Zarr HCS).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from .common import (
    add_plate_options,
    at_least,
    check_synth_args,
    command,
    labels_help,
    open_plate_from_args,
)
from .output import (
    Console,
)


def add_synth(sub) -> None:
    from ..settings import add_arguments
    from ..synth.plate import SynthSettings

    p = command(
        sub,
        "synth",
        "write synthetic Cell Painting plates (RxRx layout) with labels and per-cell truth",
        [
            "concept-discovery synth plates/ --plates 2 --wells 24 --sites 2",
            "concept-discovery synth small/ --plates 1 --wells 6 --size 256 --json",
        ],
        note="The plates carry cell and nucleus label images, metadata.csv and truth.csv (one "
        "row per cell); `concept-discovery embed plates/ --out store.zarr` comes next.",
    )
    p.add_argument("out", help="output folder (created; the plates' files in it are overwritten)")
    add_arguments(p, SynthSettings, with_defaults=True)
    p.set_defaults(func=run_synth)


def run_synth(args, con: Console) -> int:
    from .._files import check_output
    from ..synth import write_synthetic_plates
    from ..synth.plate import EXPERIMENT

    at_least(args.workers, "--workers")
    total = args.plates * args.wells * args.sites
    workers = args.workers or min(max(total, 1), os.cpu_count() or 1, 4)
    check_synth_args(args, workers)
    check_output(args.out, folder=True, what="output folder")
    with con.bar(total, "synth sites") as bar:
        out = write_synthetic_plates(
            args.out,
            n_plates=args.plates,
            n_wells=args.wells,
            n_sites=args.sites,
            size=args.size,
            seed=args.seed,
            variant=args.variant,
            workers=args.workers,
            progress=bar.update,
        )
    out = Path(out).resolve()
    con.say(f"wrote {total} sites to {out}")
    con.result(
        out=out,
        plates=[out / "images" / EXPERIMENT / f"Plate{i}" for i in range(1, args.plates + 1)],
        n_plates=args.plates,
        wells_per_plate=args.wells,
        sites_per_well=args.sites,
        sites=total,
        size=args.size,
        seed=args.seed,
        metadata=out / "metadata.csv",
        truth=out / "truth.csv",
    )
    return 0


def add_info(sub) -> None:
    p = command(
        sub,
        "info",
        "describe a plate folder (layout, plates, wells, sites, channels, metadata, problems) "
        "or an activation store (its plate, model, tokens and segmentation quality)",
        [
            "concept-discovery info plates/",
            "concept-discovery info plates/ --check --json",
            "concept-discovery info screen/ --pattern '{well}_{site}_{channel}.tif' "
            "--metadata platemap.csv",
        ],
    )
    p.add_argument(
        "plate",
        help="plate folder (RxRx, Phenix/JUMP, per-site TIFF, or --pattern), or a store (.zarr)",
    )
    add_plate_options(p)
    p.add_argument(
        "--check",
        action="store_true",
        help="read every file header and decode every site's pixels, even on a big plate "
        "(without it: headers up to a few thousand files, pixels of the first site)",
    )
    p.add_argument("--labels", default=None, metavar="DIR", help=labels_help())
    p.set_defaults(func=run_info)


def _is_store(path) -> bool:
    """Whether ``path`` is an activation store (a plate folder, or anything else, is not)."""
    from ..embed.store import check_store_folder
    from ..errors import StoreError

    if not Path(path).is_dir():
        return False
    try:
        return check_store_folder(path) is not None
    except StoreError:  # a folder that holds something else: a plate, for info
        return False


def run_info(args, con: Console) -> int:
    from ..embed.store import ActivationStore
    from ..errors import PlateError
    from ..plate import PlateWarning
    from ..plate.layouts import CHECK_LIMIT

    if _is_store(args.plate):
        store = ActivationStore.open(args.plate)  # a store, not a plate: describe it
        for line in store.describe():
            con.say(line)
        con.result(store=Path(args.plate).resolve(), sites=len(store.sites()))
        return 0

    with warnings.catch_warnings():
        # Printed below from plate.warnings, once and in order.
        warnings.simplefilter("ignore", PlateWarning)
        plate = open_plate_from_args(args, check=True if args.check else None)
    # Headers can be whole while the pixels are not (a truncated PNG): decode to be sure.
    sites = list(plate) if args.check else list(plate)[:1]
    undecodable = []
    with con.bar(len(sites), "decode sites") as bar:
        for site in sites:
            try:
                site.check()
            except PlateError as exc:
                undecodable.append(str(exc))
            bar.update()
    problems = list(plate.warnings)
    if undecodable:
        problems.append(
            f"{len(undecodable)} of {len(sites)} decoded site(s) cannot be read: "
            + "; ".join(undecodable[:5])
            + (" ..." if len(undecodable) > 5 else "")
        )
    wells = plate.wells
    distinct = sorted({w for _, w in wells})
    shown = ", ".join(distinct[:12]) + (" ..." if len(distinct) > 12 else "")
    say = con.say
    say(f"folder:   {plate.root}")
    say(f"layout:   {plate.layout}")
    more = " ..." if len(plate.plates) > 6 else ""
    say(f"plates:   {len(plate.plates)} ({', '.join(plate.plates[:6])}{more})")
    say(f"wells:    {len(wells)} on all plates ({shown})")
    say(f"sites:    {len(plate)}")
    say(f"channels: {len(plate.channel_names)} ({', '.join(plate.channel_names)})")
    say(f"shape:    {plate.image_shape} (C, H, W)")
    say(f"dtype:    {plate.dtype}")
    if plate.metadata is None:
        say("metadata: none")
    else:
        cols = [str(c) for c in plate.metadata.columns]
        say(f"metadata: {len(plate.metadata)} rows; columns: {', '.join(cols)}")
    labelled = sum(site.labels_path is not None for site in plate)
    qc_lines: list[str] = []
    if labelled:
        from ..segment.qc import read_qc, summary

        where = f" (label folder {plate.label_folder})" if plate.label_folder else ""
        say(f"labels:   {labelled} of {len(plate)} sites carry cell labels{where}")
        qc_lines = summary(read_qc(plate.label_folder))
        for line in qc_lines:
            say(line)
    if args.check:
        say(f"checked:  file headers, pixels and label files of all {len(plate)} sites")
    else:
        say(
            f"checked:  file headers (of every site when the folder holds up to {CHECK_LIMIT} "
            "files), pixels of the first site only (--check decodes every site)"
        )
    say(f"warnings: {len(problems)}")
    for message in problems:
        if con.quiet:
            con.warn(message)  # the problems are what info is for: said even under --quiet
        say(f"  - {message}")
    con.result(
        folder=Path(plate.root).resolve(),
        layout=plate.layout,
        plates=list(plate.plates),
        wells=len(wells),
        sites=len(plate),
        channels=list(plate.channel_names),
        shape=list(plate.image_shape),
        dtype=str(plate.dtype),
        metadata=None
        if plate.metadata is None
        else {"rows": len(plate.metadata), "columns": [str(c) for c in plate.metadata.columns]},
        labelled_sites=labelled,
        label_folder=plate.label_folder,
        quality=qc_lines,
        checked="all sites" if args.check else "first site",
        warnings=problems,
    )
    return 0


def add_convert(sub) -> None:
    from ..plate.convert import NGFF_VERSIONS

    p = command(
        sub,
        "convert",
        "write a plate folder of any layout as OME-Zarr HCS plates",
        [
            "concept-discovery convert plates/ --out plates-zarr/",
            "concept-discovery convert plates/ --out plates-zarr-v04/ --ngff 0.4",
            "concept-discovery info plates-zarr/",
        ],
        description=(
            "Write one OME-Zarr (NGFF) plate per plate of PLATE into --out: wells with their "
            "sites as fields, channel names, the cell and nucleus labels the plate carries as "
            "label images, and the metadata as --out/metadata.csv, which every command reads "
            "with the plates (concept-discovery info OUT). The folder appears "
            "only when complete."
        ),
    )
    p.add_argument("plate", help="plate folder (any layout `info` reads)")
    p.add_argument("--out", required=True, help="folder for the OME-Zarr plates")
    p.add_argument(
        "--ngff",
        default="0.5",
        choices=NGFF_VERSIONS,
        help="NGFF version: 0.5 (zarr v3) or 0.4 (zarr v2, for older tools) (default: 0.5)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    add_plate_options(p)
    p.set_defaults(func=run_convert)


def run_convert(args, con: Console) -> int:
    from .._files import check_output
    from ..plate.convert import check_convert_out, convert_plate

    check_output(args.out, folder=True, what="OME-Zarr output folder")
    plate = open_plate_from_args(args)
    check_convert_out(plate, args.out)
    with con.bar(len(plate), "convert sites") as bar:
        written = convert_plate(
            plate, args.out, ngff=args.ngff, overwrite=args.overwrite, progress=bar
        )
    con.say(
        f"wrote {len(plate)} sites as {len(written)} OME-Zarr plate(s) in {args.out}: "
        + ", ".join(w.name for w in written)
    )
    con.result(
        out=Path(args.out).resolve(),
        plates=[Path(w).resolve() for w in written],
        sites=len(plate),
        ngff=args.ngff,
    )
    return 0
