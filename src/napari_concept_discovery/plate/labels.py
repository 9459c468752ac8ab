"""Label folders: where ``concept-discovery segment`` writes cell labels and how plates find them.

A label folder holds, per site, ``<plate key>/<well>_s<site>_cells.tif`` (and
``_nuclei.tif``), int32 with 0 as background, nucleus ``i`` inside cell ``i``. ``segment``
writes one into ``<plate folder>/segmentation/`` by default, with a ``segmentation.json``
marker written first (``"complete": false``) and again last (``true``). ``open_plate`` never
reads a marked folder's files as images and uses a complete one by itself (an interrupted run
is not used unless named); ``open_plate(..., labels=DIR)`` names any label folder, inside the
plate or not. Labels from a label folder take the place of the
layout's own label files (the synthetic plates' ``labels/``) for the sites they cover, since
the user made them on purpose.

A label folder may also hold labels made elsewhere (:mod:`.label_files`): CellProfiler's masks
or label exports and Cellpose's ``_seg.npy`` / ``_cp_masks`` files named after the site's
images, or any label images named by a pattern, given as the folder followed by the pattern
(``labels="masks/{well}_s{site}_*.png"``). Sites the folder's own files do not cover are
looked up that way. See docs/architecture.md, "One room per step".
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from ..errors import PlateError
from .label_files import find_user_labels
from .model import Plate, Site, SiteKey, _listing

#: Default label folder inside a plate folder, found by ``open_plate`` when it holds the marker.
SEGMENTATION_FOLDER = "segmentation"
#: Written last by the segmentation of a whole plate: a folder with it is complete.
MARKER = "segmentation.json"


def label_paths(folder: str | os.PathLike, key: SiteKey) -> tuple[Path, Path]:
    """(cells, nuclei) file paths of one site in a label folder."""
    stem = f"{key.well}_s{key.site}"
    base = Path(folder) / key.plate
    return base / f"{stem}_cells.tif", base / f"{stem}_nuclei.tif"


def default_label_folder(root: str | os.PathLike) -> Path:
    """Where ``segment`` writes a plate's labels unless told otherwise."""
    return Path(root) / SEGMENTATION_FOLDER


def marked_label_folder(root: str | os.PathLike) -> Path | None:
    """The plate's own segmentation folder when it carries the marker (finished or not)."""
    folder = default_label_folder(root)
    return folder if (folder / MARKER).is_file() else None


def found_label_folder(root: str | os.PathLike) -> Path | None:
    """The plate's own segmentation folder when its segmentation finished, else None."""
    folder = marked_label_folder(root)
    return folder if folder is not None and read_marker(folder).get("complete") else None


def read_marker(folder: str | os.PathLike) -> dict:
    """What the segmentation that wrote ``folder`` used (empty when there is no marker)."""
    try:
        return json.loads((Path(folder) / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def split_label_spec(spec: str | os.PathLike) -> tuple[Path, str | None]:
    """(folder, pattern) of a label folder as a user names it: the folder, or the folder
    followed by a filename pattern (the first path component holding ``{`` or ``*`` starts
    the pattern)."""
    parts = Path(spec).expanduser().parts
    for i, part in enumerate(parts):
        if "{" in part or "*" in part:
            if i == 0:
                return Path("."), "/".join(parts)
            return Path(*parts[:i]), "/".join(parts[i:])
    return Path(*parts) if parts else Path("."), None


def label_spec(folder: Path, pattern: str | None) -> str:
    """The inverse of :func:`split_label_spec` (what ``Plate.source`` records)."""
    return str(folder) if pattern is None else f"{folder}/{pattern}"


def attach_label_folder(
    sites: dict[SiteKey, Site],
    folder: str | os.PathLike,
    *,
    explicit: bool,
    pattern: str | None = None,
) -> tuple[set[Path], list[str]]:
    """Point each site with labels in ``folder`` at them; returns (files used, notes).

    Our own files (:func:`label_paths`) first; with ``pattern``, or for the sites they leave
    out, the user's files (:func:`.label_files.find_user_labels`). A folder named by the user
    that covers no site at all is an error (most likely the wrong folder); partial coverage
    is a note, so that the rest of the sites fall back on the layout's label files or
    segmentation.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise PlateError(f"label folder not found: {folder}")
    used: set[Path] = set()
    missing = []
    for key, site in sites.items():
        cells, nuclei = label_paths(folder, key)
        if pattern is not None or not cells.is_file():
            missing.append(key)
            continue
        site.labels_path = cells
        site.user_labels = False
        used.add(cells)
        if nuclei.is_file():
            site.nuclei_path = nuclei
            used.add(nuclei)
        else:
            site.nuclei_path = None  # the layout's nuclei would not match these cells
    notes = []
    if missing:
        found, notes = find_user_labels(folder, {k: sites[k] for k in missing}, pattern)
        for key, files in found.items():
            if "cells" not in files:
                continue
            site = sites[key]
            site.labels_path = files["cells"]
            site.nuclei_path = files.get("nuclei")
            site.user_labels = True
            used.update(files.values())
        missing = [k for k in missing if "cells" not in found.get(k, {})]
    if not used and sites:
        example = label_paths(folder, next(iter(sites)))[0]
        message = (
            f"no cell labels for any site in the label folder {folder}: expected files such as "
            f"{example} (as `concept-discovery segment` writes them), files named after the "
            "site's images with a suffix naming cells or nuclei (CellProfiler's "
            "<image>_MaskCells.tiff, Cellpose's <image>_seg.npy or <image>_cp_masks.png)"
            + (f", or files matching the pattern {pattern!r}" if pattern else "")
        )
        if explicit:
            raise PlateError(message)
        notes.append(message)
    elif missing:
        notes.append(
            f"label folder {folder} has no cell labels for {len(missing)} of {len(sites)} "
            f"site(s): {_listing([str(k) for k in missing], 5, '; ')}"
        )
    return used, notes


def with_label_folder(plate: Plate, folder: str | os.PathLike) -> Plate:
    """A copy of ``plate`` whose sites take their cell labels from a label folder (which may
    end in a filename pattern, :func:`split_label_spec`)."""
    folder, pattern = split_label_spec(folder)
    folder = folder.resolve()
    sites = {k: dataclasses.replace(s) for k, s in plate.sites.items()}
    _, notes = attach_label_folder(sites, folder, explicit=True, pattern=pattern)
    out = Plate(
        plate.root,
        plate.layout,
        plate.channel_names,
        sites,
        metadata=plate.metadata,
        warnings=plate.warnings,
        source={**plate.source, "labels": label_spec(folder, pattern)},
        label_folder=folder,
    )
    for message in notes:
        out.warn(message)
    return out
