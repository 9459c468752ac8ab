"""A whole plate segmented into a label folder (``<plate>/segmentation`` by default) that
``open_plate`` and embedding find again (:mod:`.labels`), so cells are segmented once: a
marker written first as incomplete, one cell and one nucleus file per site, and the quality
table (``segment.qc``) beside them. The segmenters themselves are in ``segment/``."""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .. import __version__
from .._files import atomic_write_bytes, atomic_write_text, check_not_foreign
from ..errors import DataWarning, PlateError
from ..progress import Cancel, ProgressCallback, is_cancelled, report
from ..segment.classical import StainWarning
from ..segment.qc import QC_FILE, qc_table, site_qc, write_qc
from ..segment.site import (
    cell_refs,
    channel_index,
    channel_ref,
    make_segmenter,
    quality_channels,
    resolve_settings,
)
from ..settings import SegmentSettings
from .label_images import read_user_labels
from .labels import MARKER, default_label_folder, label_paths


def load_user_labels(path: str | os.PathLike, shape: tuple[int, int]) -> np.ndarray:
    """Read the user's label image (or binary mask) for a site of ``shape`` as int32 labels.

    A binary mask (two values, e.g. 0/1 or 0/255, as CellProfiler writes) becomes connected
    components; an integer image is taken as labels. Errors name the file. To split a binary
    mask by nuclei, see :func:`.plate.label_images.read_user_labels`.
    """
    return read_user_labels(path, None, shape)[0]


def _write_tiff(path: Path, labels: np.ndarray) -> None:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.asarray(labels, np.int32), compression="zlib")
    atomic_write_bytes(path, buf.getvalue())


def segment_plate(
    plate,
    out: str | os.PathLike | None = None,
    *,
    nuclear: str | int | None = None,
    cell: str | int | Sequence[str | int] | None = None,
    settings: SegmentSettings | None = None,
    progress: ProgressCallback = None,
    cancel: Cancel = None,
) -> Path | None:
    """Segment every site of a plate into a label folder; returns the folder (None if cancelled).

    ``settings`` (default :class:`SegmentSettings`) says how; ``nuclear`` and ``cell`` override
    its channels. ``out`` defaults to ``<plate folder>/segmentation``, which ``open_plate`` then
    uses by itself; any other folder is given to it (and to ``embed``) as ``labels=``. Each
    label file lands atomically and the folder's marker (which records the settings) says
    "complete" only at the end, so an interrupted run is never taken for a finished one.
    Progress: stage "segment", done/total sites, info ``site``.
    """
    settings = resolve_settings(settings, nuclear, cell)
    folder = Path(out).expanduser() if out is not None else default_label_folder(plate.root)
    names = plate.channel_names
    total = len(plate)
    try:  # a channel the plate lacks is found before anything is written or loaded
        channel_index(names, channel_ref(settings.nuclear), "nuclear")
        for c in cell_refs(settings.cell) or ():
            channel_index(names, c, "cell")
    except ValueError as exc:
        raise PlateError(f"cannot segment {plate.root}: {exc}") from exc
    files = [
        path.relative_to(folder).as_posix()
        for key in plate.keys
        for path in label_paths(folder, key)
    ] + [QC_FILE]
    # the one rule of every writer: label files this package did not write are never replaced
    if not _older_own_folder(folder):
        check_not_foreign(
            folder,
            marker=MARKER,
            what="label folder",
            kind="labels written by segment",
            writes=files,
        )
    segmenter = make_segmenter(settings)
    stains = quality_channels(settings, names)
    marker = {
        "written_by": f"napari-concept-discovery {__version__} segment",
        "complete": False,
        "plate": str(Path(plate.root).resolve()),
        "channels": list(names),
        "nuclear": settings.nuclear,
        "cell": settings.cell,
        "settings": settings.to_dict(),
        "sites": total,
        "files": files,
    }
    try:  # marked unfinished first, so the folder is never read as images nor used half done
        atomic_write_text(folder / MARKER, json.dumps(marker, indent=1))
    except OSError as exc:
        raise PlateError(
            f"cannot write cell labels to {folder}: {exc}; choose another folder (--out) and "
            "give it to embed as --labels"
        ) from exc
    report(progress, "segment", 0, total)
    rows: list[dict] = []
    nuclear_index = channel_index(names, channel_ref(settings.nuclear), "nuclear")
    empty, flat = [], []  # sites without a cell; those whose nuclear stain has one value
    for done, site in enumerate(plate, start=1):
        if is_cancelled(cancel):
            return None
        image = site.read()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", StainWarning)
                nuclei, cells = segmenter(image, names)
        except ValueError as exc:  # a channel name or shape the user can fix
            raise PlateError(f"cannot segment site {site.key}: {exc}") from exc
        left_out = []
        for w in caught:
            if issubclass(w.category, StainWarning):
                left_out.append(str(w.message).replace(" left out of the cell foreground", ""))
            else:  # not ours to keep: passed on as it came
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        rows.append(
            {"plate": site.key.plate, "well": site.key.well, "site": site.key.site}
            | site_qc(nuclei, cells, left_out, image=image, channels=stains(image))
        )
        cells_path, nuclei_path = label_paths(folder, site.key)
        _write_tiff(cells_path, cells)
        _write_tiff(nuclei_path, nuclei)
        if not np.any(cells):
            empty.append(str(site.key))
            plane = image[nuclear_index]
            if plane.min() == plane.max():
                flat.append(str(site.key))
        report(progress, "segment", done, total, site=str(site.key))
    write_qc(folder, qc_table(rows))
    marker["complete"] = True
    atomic_write_text(folder / MARKER, json.dumps(marker, indent=1))
    if empty:
        warnings.warn(_no_cells_note(empty, flat, total, names[nuclear_index]), DataWarning, 2)
    return folder


def _older_own_folder(folder: Path) -> bool:
    """A label folder that an earlier version of ``segment`` wrote (its marker names no files):
    its label files are this package's."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and "files" not in marker
        and str(marker.get("written_by", "")).startswith("napari-concept-discovery")
    )


def _no_cells_note(empty: list[str], flat: list[str], total: int, stain: str) -> str:
    """What to tell a user whose sites gave no cell: which, and whether their images are blank."""
    shown = "; ".join(empty[:5]) + (f"; ... and {len(empty) - 5} more" if len(empty) > 5 else "")
    note = f"{len(empty)} of {total} site(s) gave no cell: {shown}"
    if flat:
        note += (
            f"; the {stain} image of {len(flat)} of them holds a single value (all zero or "
            "constant), so there is nothing to segment: check those files"
        )
    else:
        note += f"; check their {stain} images, or the nuclear channel and thresholds"
    return note
