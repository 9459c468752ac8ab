"""Quality control of a segmentation, per site: what a user needs to see that the cells are wrong.

Per site (:func:`site_qc`): the share of the site covered by cells (``foreground``), the
numbers of cells and nuclei, cells without a nucleus, the median cell / nucleus area ratio, and
the share of cells ``enclosed`` by their neighbours (no pixel of the cell borders the
background: true of the inner cells of a confluent culture, and of every cell when the cell
foreground has flooded the site and the cells became a Voronoi tiling of it), and, given the
image, the share of the cells' area that is background in every cell stain. Then
:func:`flags` says, with a reason, when these are implausible. :func:`write_qc` keeps the table
beside the label files (``qc.csv``), where ``segment`` writes it and ``info`` reads it. No Qt:
the viewer, CLI and report read the same table.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from .._files import atomic_write_text

#: File name of the table in a label folder.
QC_FILE = "qc.csv"

COLUMNS = (
    "foreground",
    "cells",
    "nuclei",
    "cells_without_nucleus",
    "cell_nucleus_ratio",
    "enclosed",
    "background_share",
    "stains_left_out",
    "flag",
    "reason",
)

#: Cells enclosed by neighbours on every side, over this share of them, over this share of the
#: site, with cells this many times their nuclei: the cells tile the site (a flooded foreground).
TILED_ENCLOSED = 0.8
TILED_FOREGROUND = 0.85
TILED_RATIO = 3.0
#: A median cell larger than this many times its nucleus is implausible for a cultured cell.
MAX_RATIO = 15.0
#: A median cell below this many times its nucleus has no cytoplasm found.
MIN_RATIO = 1.3
#: Share of cells without a nucleus above which the labels are suspect.
MAX_WITHOUT_NUCLEUS = 0.05
#: Share of the cells' area where every cell stain is within its background's noise above
#: which the cells reach over the background.
MAX_BACKGROUND_SHARE = 0.3


def background_share(
    image: np.ndarray, channels: Iterable[int], cells: np.ndarray, noise_floor: float = 4.0
) -> float:
    """The share of the cells' area where no cell stain rises above its background's noise
    floor (:func:`.segment_classical.background`, level + ``noise_floor`` deviations, on the
    lightly smoothed stain): background that the cells took in. NaN without cells or stains."""
    from .classical import background, smooth

    inside = np.asarray(cells) > 0
    channels = list(channels)
    if not inside.any() or not channels:
        return float("nan")
    lit = np.zeros(inside.shape, bool)
    for c in channels:
        s = smooth(image[c], 1.0)
        if float(s.max()) <= float(s.min()):
            continue
        lit |= s > background(s).floor(noise_floor)
    return float((inside & ~lit).sum() / inside.sum())


def site_qc(
    nuclei: np.ndarray,
    cells: np.ndarray,
    stains_left_out: Iterable[str] = (),
    *,
    image: np.ndarray | None = None,
    channels: Iterable[int] = (),
) -> dict:
    """The quality measures of one site's labels (module docs), with its flag and reason.

    With the site's ``image`` and its cell stains ``channels`` also the share of the cells'
    area that is background in every stain (:func:`background_share`; else NaN).
    """
    nuclei = np.asarray(nuclei)
    cells = np.asarray(cells)
    n = int(max(cells.max(initial=0), nuclei.max(initial=0)))
    cell_area = np.bincount(cells.ravel(), minlength=n + 1)[1:]
    nucleus_area = np.bincount(nuclei.ravel(), minlength=n + 1)[1:]
    present = cell_area > 0
    with_nucleus = present & (nucleus_area > 0)
    ratio = cell_area[with_nucleus] / nucleus_area[with_nucleus]
    # a cell reaches the background when one of its pixels has a background pixel in its 3 x 3
    # neighbourhood; the image edge is not background, nor are pinholes in the cells (pieces
    # of background smaller than half the median nucleus)
    ground = cells == 0
    pieces, count = ndi.label(ground)
    if count:
        small = np.median(nucleus_area[nucleus_area > 0]) / 2 if (nucleus_area > 0).any() else 0
        sizes = np.bincount(pieces.ravel())
        ground &= (sizes >= small)[pieces]
    near_background = ndi.binary_dilation(ground, structure=np.ones((3, 3), bool))
    reaching = np.zeros(n + 1, bool)
    reaching[np.unique(cells[near_background & (cells > 0)])] = True
    enclosed = float((~reaching[1:][present]).mean()) if present.any() else float("nan")
    row = {
        "foreground": float((cells > 0).mean()),
        "cells": int(present.sum()),
        "nuclei": int(np.unique(nuclei[nuclei > 0]).size),
        "cells_without_nucleus": int((present & (nucleus_area == 0)).sum()),
        "cell_nucleus_ratio": float(np.median(ratio)) if ratio.size else float("nan"),
        "enclosed": enclosed,
        "background_share": (
            background_share(image, channels, cells) if image is not None else float("nan")
        ),
        "stains_left_out": "; ".join(stains_left_out),
    }
    reasons = flags(row)
    row["flag"] = bool(reasons)
    row["reason"] = "; ".join(reasons)
    return row


def flags(row: dict) -> list[str]:
    """The reasons a site's measures are implausible (empty when none)."""
    reasons = []
    cells, ratio, fg, enclosed = (
        row["cells"],
        row["cell_nucleus_ratio"],
        row["foreground"],
        row["enclosed"],
    )
    if cells == 0:
        return ["no cells found"]
    if fg > TILED_FOREGROUND and enclosed > TILED_ENCLOSED and ratio > TILED_RATIO:
        reasons.append(
            f"cells tile the site ({fg:.0%} of it, {enclosed:.0%} of cells enclosed by "
            f"neighbours, {ratio:.1f}x their nuclei): the cell foreground likely floods the "
            "background"
        )
    elif ratio > MAX_RATIO:
        reasons.append(f"cells are {ratio:.1f}x their nuclei (more than {MAX_RATIO:g}x)")
    share = row.get("background_share", float("nan"))
    if share == share and share > MAX_BACKGROUND_SHARE:
        reasons.append(
            f"{share:.0%} of the cells' area is background in every cell stain: the cells reach "
            "over the background"
        )
    if ratio < MIN_RATIO:
        reasons.append(f"cells are {ratio:.2f}x their nuclei: no cytoplasm found")
    without = row["cells_without_nucleus"]
    if without > MAX_WITHOUT_NUCLEUS * cells:
        reasons.append(f"{without} of {cells} cells have no nucleus")
    if row.get("stains_left_out"):
        reasons.append(f"stain(s) left out: {row['stains_left_out']}")
    return reasons


def qc_table(rows: list[dict]) -> pd.DataFrame:
    """Rows (each with the site's key fields first, then :data:`COLUMNS`) as a table."""
    return pd.DataFrame(rows)


def write_qc(folder: str | os.PathLike, table: pd.DataFrame) -> Path:
    """Write the table as ``qc.csv`` in the label folder (atomically); returns its path."""
    path = Path(folder) / QC_FILE
    atomic_write_text(path, table.to_csv(index=False))
    return path


def read_qc(folder: str | os.PathLike | None) -> pd.DataFrame | None:
    """The QC table of a label folder, or None when it has none."""
    if folder is None:
        return None
    path = Path(folder) / QC_FILE
    if not path.is_file():
        return None
    table = pd.read_csv(path, keep_default_na=False, na_values=[""])
    table["flag"] = table["flag"].astype(str).str.lower() == "true"
    table["reason"] = table["reason"].fillna("").astype(str)
    table["stains_left_out"] = table["stains_left_out"].fillna("").astype(str)
    return table


def summary(table: pd.DataFrame | None, limit: int = 20) -> list[str]:
    """Lines for a person: the plate's medians and each flagged site with its reason (the
    first ``limit`` of them)."""
    if table is None or table.empty:
        return []
    med = table[["foreground", "cells", "cell_nucleus_ratio", "enclosed"]].median()
    flagged = table[table["flag"]]
    lines = [
        f"quality:  {len(table)} sites; median foreground {med['foreground']:.0%}, "
        f"{med['cells']:.0f} cells, cell/nucleus area {med['cell_nucleus_ratio']:.1f}x, "
        f"{med['enclosed']:.0%} of cells enclosed by neighbours; {len(flagged)} flagged"
    ]
    keys = [c for c in ("plate", "well", "site") if c in table.columns]
    for _, r in flagged.head(limit).iterrows():
        where = " ".join(f"{k} {r[k]}" for k in keys)
        lines.append(f"  flagged {where}: {r['reason']}")
    if len(flagged) > limit:
        lines.append(f"  ... and {len(flagged) - limit} more flagged site(s) (see qc.csv)")
    return lines


#: What a plate map can colour wells by, from the QC table: (title, column, how per well).
WELL_MEASURES = (
    ("segmentation: share of sites flagged", "flag", "mean"),
    ("segmentation: cells per site", "cells", "mean"),
    ("segmentation: cell / nucleus area", "cell_nucleus_ratio", "median"),
    ("segmentation: cell foreground share", "foreground", "mean"),
)


def per_well(table: pd.DataFrame | None) -> dict[str, pd.DataFrame]:
    """Per-well values of the QC table, one (plate, well, value) frame per measure of
    :data:`WELL_MEASURES` the table has, so a plate map shows where the cells are doubtful."""
    if table is None or table.empty:
        return {}
    out = {}
    for title, column, how in WELL_MEASURES:
        if column not in table.columns:
            continue
        frame = table[["plate", "well"]].assign(value=table[column].astype(float))
        out[title] = frame.groupby(["plate", "well"], sort=True)["value"].agg(how).reset_index()
    return out
