"""Any plate :func:`~.plate.open_plate` reads, written as OME-Zarr HCS plates (``convert``).

One NGFF plate per plate name (``<out>/<plate>.zarr``): rows and columns from the well names,
each well's sites as its fields in site order, the channel names as ``omero`` labels, the cell
and nucleus labels a site carries as NGFF label images ``cells`` and ``nuclei``, and the sites'
metadata as ``<out>/metadata.csv`` (plate, well, site and the plate's columns), which
``open_plate(out)`` joins by itself. Sites are numbered by their position in the well, as the
OME-Zarr reader numbers fields, so the keys read back are the keys written when a well's sites
are 1..n. Pixels keep their dtype; only the full-resolution level is written. Written through
``ome-zarr``, into a folder that replaces ``out`` whole when complete (docs/architecture.md,
"One room per step").
"""

from __future__ import annotations

import os
import re
import shutil
from collections import defaultdict
from pathlib import Path

import pandas as pd

from .._files import atomic_dir, check_output
from ..errors import OutputError, PlateError
from ..progress import Cancel, Cancelled, ProgressCallback, is_cancelled, report

#: NGFF versions ``convert`` writes: 0.5 (zarr v3, the default) and 0.4 (zarr v2, for older tools).
NGFF_VERSIONS = ("0.4", "0.5")
#: A plate's per-cell ground truth (``synth`` writes it), carried over as it is.
TRUTH_FILE = "truth.csv"
_WELL = re.compile(r"^([A-Za-z]+)0*(\d+)$")


def _row_order(row: str) -> tuple[int, str]:
    return len(row), row


def _split_well(well: str, key) -> tuple[str, str]:
    m = _WELL.match(str(well))
    if m is None:
        raise PlateError(f"well {well!r} of {key} is not a row letter and a column (e.g. B07)")
    return m.group(1).upper(), str(int(m.group(2)))


def _format(ngff: str):
    from ome_zarr.format import FormatV04, FormatV05

    if ngff not in NGFF_VERSIONS:
        raise OutputError(f"NGFF version {ngff!r} cannot be written; choose {NGFF_VERSIONS}")
    return FormatV04() if ngff == "0.4" else FormatV05()


def omero_channels(names, image) -> dict:
    """The ``omero`` block of a (C, H, W) field: each channel's label, a colour and the display
    window NGFF asks for (``start``/``end`` at the channel's own range, ``min``/``max`` at the
    pixel type's), which ome-zarr's writer validates since 0.18."""
    import numpy as np

    dtype = np.dtype(image.dtype)
    lo, hi = (
        (float(np.iinfo(dtype).min), float(np.iinfo(dtype).max))
        if dtype.kind in "ui"
        else (float(np.nanmin(image)), float(np.nanmax(image)))
    )
    channels = []
    for name, plane in zip(names, image, strict=True):
        start, end = (float(plane.min()), float(plane.max())) if plane.size else (lo, hi)
        channels.append(
            {
                "label": str(name),
                "color": "FFFFFF",
                "active": True,
                "window": {"start": start, "end": max(end, start + 1), "min": lo, "max": hi},
            }
        )
    return {"channels": channels}


def _metadata_row(site, site_number: int) -> dict:
    key = site.key
    row = {k: v for k, v in (site.metadata or {}).items() if k not in ("plate", "well", "site")}
    return {"plate": key.plate, "well": key.well, "site": site_number, **row}


def _carry_truth(source: Path, dest: Path, renumbered: dict) -> None:
    """Copy the truth table, with the site numbers of sites that the fields renumbered."""
    if not renumbered:
        shutil.copyfile(source, dest)
        return
    from .model import normalize_well

    truth = pd.read_csv(source)
    new = [
        renumbered.get((str(p), normalize_well(str(w)), int(s)), s)
        for p, w, s in zip(truth["plate"], truth["well"], truth["site"], strict=True)
    ]
    truth["site"] = new
    truth.to_csv(dest, index=False)


def _inputs(plate) -> list[tuple[str, Path]]:
    """The folders and files a plate is read from: its folder, label folder and metadata."""
    found = [("plate folder", plate.root)]
    if getattr(plate, "label_folder", None) is not None:
        found.append(("label folder", plate.label_folder))
    table = (getattr(plate, "source", None) or {}).get("metadata")
    if table:
        found.append(("metadata table", Path(table)))
    return [(what, Path(p).expanduser().resolve()) for what, p in found]


def check_convert_out(plate, out: str | os.PathLike) -> Path:
    """Refuse an output folder that ``convert`` cannot write, or whose replacement would take
    the plate it reads along: the plate's folder itself, a folder inside it or one that holds
    it (and likewise its label folder and metadata table), whatever ``overwrite`` says.
    Returns the output folder as an absolute path."""
    out = check_output(out, folder=True, what="OME-Zarr output folder").absolute()
    real = out.resolve()
    for what, source in _inputs(plate):
        if real == source or real in source.parents:
            where = "is" if real == source else "holds"
            raise OutputError(
                f"OME-Zarr output folder {out} {where} the {what} {source} being converted; "
                "convert replaces its output folder whole, so choose a folder outside it"
            )
        if source in real.parents:
            raise OutputError(
                f"OME-Zarr output folder {out} is inside the {what} {source} being converted; "
                "choose a folder outside it"
            )
    if real == Path.cwd().resolve():
        raise OutputError(
            f"OME-Zarr output folder {out} is the current folder, which convert cannot replace "
            "whole; give a new folder"
        )
    return out


def convert_plate(
    plate,
    out: str | os.PathLike,
    *,
    ngff: str = "0.5",
    overwrite: bool = False,
    progress: ProgressCallback = None,
    cancel: Cancel = None,
) -> list[Path] | None:
    """Write ``plate`` (a :class:`~.plate.Plate` or a folder) as OME-Zarr plates under ``out``.

    Returns the plate folders written, or None when ``cancel`` stopped it (then ``out`` is as it
    was). An existing non-empty ``out`` is refused unless ``overwrite``. Progress: stage
    "convert", done/total sites.
    """
    import zarr
    from ome_zarr.writer import (
        write_image,
        write_labels,
        write_plate_metadata,
        write_well_metadata,
    )

    from . import Plate, open_plate

    fmt = _format(ngff)
    plate = plate if isinstance(plate, Plate) else open_plate(plate)
    out = check_convert_out(plate, out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(
            f"{out} exists and is not empty; choose another --out, or pass --overwrite "
            "(overwrite=True) to replace it once the new plates are complete"
        )
    by_plate: dict[str, dict[tuple[str, str], list]] = defaultdict(lambda: defaultdict(list))
    for site in sorted(plate, key=lambda s: (s.key.plate, s.key.well, s.key.site)):
        by_plate[site.key.plate][_split_well(site.key.well, site.key)].append(site)
    names = {p: re.sub(r"[^A-Za-z0-9._-]+", "_", p) for p in by_plate}
    if len(set(names.values())) < len(names):
        raise PlateError(f"plate names {sorted(by_plate)} clash as folder names")
    zarr_format = 2 if ngff == "0.4" else 3
    total, done = len(plate), 0
    rows_out: list[dict] = []
    renumbered: dict[tuple[str, str, int], int] = {}
    report(progress, "convert", 0, total)
    try:
        with atomic_dir(out) as tmp:
            for pname, wells in by_plate.items():
                root = zarr.open_group(
                    str(tmp / f"{names[pname]}.zarr"), mode="w", zarr_format=zarr_format
                )
                rows = sorted({r for r, _ in wells}, key=_row_order)
                cols = sorted({c for _, c in wells}, key=int)
                paths = [
                    f"{r}/{c}"
                    for r, c in sorted(wells, key=lambda w: (_row_order(w[0]), int(w[1])))
                ]
                most = max(len(s) for s in wells.values())
                write_plate_metadata(root, rows, cols, paths, fmt=fmt, field_count=most, name=pname)
                for (r, c), sites in wells.items():
                    well = root.require_group(r).require_group(c)
                    write_well_metadata(well, [str(i) for i in range(len(sites))], fmt=fmt)
                    for i, site in enumerate(sites):
                        if is_cancelled(cancel):
                            raise Cancelled("conversion cancelled")
                        field = well.require_group(str(i))
                        pixels = site.read()
                        write_image(
                            pixels,
                            field,
                            scale_factors=[],
                            axes="cyx",
                            fmt=fmt,
                            omero=omero_channels(plate.channel_names, pixels),
                        )
                        for name, labels in (
                            ("cells", site.read_labels()),
                            ("nuclei", site.read_nuclei()),
                        ):
                            if labels is not None:
                                # scaler=None: ome-zarr's default Scaler would override
                                # scale_factors and write four downsampled levels
                                write_labels(
                                    labels,
                                    field,
                                    name,
                                    axes="yx",
                                    fmt=fmt,
                                    scaler=None,
                                    scale_factors=[],
                                )
                        rows_out.append(_metadata_row(site, i + 1))
                        if site.key.site != i + 1:
                            renumbered[(str(site.key.plate), site.key.well, site.key.site)] = i + 1
                        done += 1
                        report(progress, "convert", done, total, site=str(site.key))
            table = pd.DataFrame(rows_out)
            if len(table.columns) > 3:  # the plate had metadata beyond the keys
                table.to_csv(tmp / "metadata.csv", index=False)
            truth = Path(plate.root) / TRUTH_FILE
            if truth.is_file():  # per-cell truth keyed by plate, well, site and label
                _carry_truth(truth, tmp / TRUTH_FILE, renumbered)
    except Cancelled:
        return None
    return [out / f"{names[p]}.zarr" for p in by_plate]


__all__ = ["NGFF_VERSIONS", "check_convert_out", "convert_plate"]
