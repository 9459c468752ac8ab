"""Label images a user brings: CellProfiler's masks and label exports, Cellpose's outputs, any
folder of label images named by a pattern.

Which file belongs to which site, without a convention of ours:

- named after one of the site's image files (CellProfiler's SaveImages "from image filename"
  with a suffix, Cellpose writing beside the image): ``<image stem><suffix>``, e.g.
  ``B7_01_3_3_RFP_001_MaskCells.tiff``, ``r01c01f01p01-ch2sk1fk1fl1_seg.npy``,
  ``img_cp_masks.png``;
- or matched by a filename pattern with ``{well}`` (or ``{row}`` and ``{col}``), ``{site}`` and
  optionally ``{plate}`` (the syntax of the plate patterns), e.g. ``{well}_s{site}_*.png``.

What a file holds is read from the rest of its name (:func:`role_of`): "nuc" says nuclei,
"cytoplasm", "outline" or "flow" say it is not a label image of whole objects, anything else
is cells. A binary mask (one foreground value, as CellProfiler's ``Mask*`` images) is split
into cells by the site's nuclei (each mask pixel joins the nucleus nearest to it inside the
mask; mask pieces without a nucleus are dropped): the nuclei file's, else our own nuclei of the
site's nuclear stain; only a site with no nuclear stain to find keeps the mask's connected
pieces.
Nuclei take the id of the cell they lie in, so nucleus ``i`` is inside cell ``i`` as everywhere
else. See docs/architecture.md, "One room per step".
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..errors import PlateError
from .label_images import NUCLEAR_NAMES
from .model import SiteKey, normalize_well, well_from_row_col
from .pattern import FilenamePattern

#: File types read as label images.
LABEL_SUFFIXES = (".tif", ".tiff", ".png", ".npy")
#: Words in a file name that mark it as something other than whole objects.
NOT_OBJECTS = ("cytoplasm", "outline", "flow", "overlay", "prob")
#: Words that mark a file named after an image as a label image at all.
OBJECT_WORDS = ("nuc", "cell", "mask", "seg", "label", "object")


def role_of(text: str, *, need_word: bool = False) -> str | None:
    """ "cells", "nuclei" or None (not whole objects) from the part of a name that is not the key.

    ``need_word``: the text must also hold one of :data:`OBJECT_WORDS` (for files named after
    an image, where the image itself and its other derivatives share the stem).
    """
    text = text.lower()
    if any(word in text for word in NOT_OBJECTS):
        return None
    if need_word and not any(word in text for word in OBJECT_WORDS):
        return None
    return "nuclei" if "nuc" in text else "cells"


def _stem(path: Path) -> str:
    name = path.name.lower()
    for ext in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name.rsplit(".", 1)[0] if "." in name else name


def _label_files(folder: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in LABEL_SUFFIXES:
                files.append(Path(dirpath) / name)
    return files


def _by_image_stem(files: Iterable[Path], stems: Mapping[str, tuple[SiteKey, str]]):
    """(key, role, path) for files named ``<image stem><suffix>``, the longest stem winning.

    A suffix that names neither cells nor nuclei (Cellpose's ``_seg.npy``, ``_cp_masks.png``)
    holds nuclei when the image it is named after is a nuclear stain (:data:`NUCLEAR_NAMES`):
    Cellpose run on the DNA channel finds nuclei.
    """
    longest = max((len(s) for s in stems), default=0)
    for path in files:
        name = path.name.lower()
        for n in range(min(len(name) - 1, longest), 0, -1):
            hit = stems.get(name[:n])
            if hit is None:
                continue
            key, channel = hit
            rest = name[n:].rsplit(".", 1)[0]
            role = role_of(rest, need_word=True)
            if role == "cells" and "cell" not in rest and channel.lower() in NUCLEAR_NAMES:
                role = "nuclei"
            if role is not None:
                yield key, role, path
            break


def _by_pattern(files: Iterable[Path], folder: Path, pattern: FilenamePattern, keys):
    """(key, role, path) for files the pattern matches; a pattern without {plate} fits any."""
    by_place: dict[tuple[str, int], list[SiteKey]] = {}
    for key in keys:
        by_place.setdefault((key.well, key.site), []).append(key)
    for path in files:
        parts = path.relative_to(folder).parts
        fields = pattern.match(parts)
        if fields is None:
            continue
        try:
            if fields.get("well"):
                well = normalize_well(fields["well"])
            else:
                well = well_from_row_col(fields["row"], fields["col"])
        except (PlateError, ValueError):
            continue
        site = int(fields.get("site") or fields.get("field") or 1)
        role = role_of(pattern.literal_text(parts).rsplit(".", 1)[0])
        if role is None:
            continue
        for key in by_place.get((well, site), ()):
            if "plate" not in fields or fields["plate"].lower() == key.plate.lower():
                yield key, role, path


def named_after_others(files: Iterable[Path]) -> set[Path]:
    """The label files among ``files`` that are named after another of them (``<stem><suffix
    naming objects>``, in the same folder): kept out of a plate's images when its label files
    lie beside them."""
    files = list(files)
    stems: dict[Path, set[str]] = {}
    for path in files:
        stems.setdefault(path.parent, set()).add(_stem(path))
    out = set()
    for path in files:
        if path.suffix.lower() not in LABEL_SUFFIXES:
            continue
        name, near = path.name.lower(), stems.get(path.parent, set())
        for n in range(len(name) - 1, 0, -1):
            if name[:n] in near and name[:n] != _stem(path):
                if role_of(name[n:].rsplit(".", 1)[0], need_word=True) is not None:
                    out.add(path)
                break
    return out


#: When several files of a site claim one role, the first kind in this order is taken.
_PREFERENCE = (".tif", ".tiff", ".png", ".npy")


def find_user_labels(
    folder: str | os.PathLike, sites: Mapping[SiteKey, object], pattern: str | None = None
) -> tuple[dict[SiteKey, dict[str, Path]], list[str]]:
    """{key: {"cells": path, "nuclei": path}} for the sites with label files in ``folder``.

    Files are matched by ``pattern`` when given, else by the names of each site's image files
    (module docs). Returns notes for sites where several files claimed the same role (the
    first by :data:`_PREFERENCE`, then by name, is used).
    """
    folder = Path(folder)
    files = _label_files(folder)
    if pattern is not None:
        found = _by_pattern(files, folder, FilenamePattern(pattern), sites)
    else:
        stems, shared = {}, set()
        for key, site in sites.items():
            names = getattr(site, "channel_names", ())
            paths = getattr(site, "paths", ())
            for i, path in enumerate(paths):
                channel = names[i] if len(paths) == len(names) else ""
                stem = _stem(Path(path))
                if stem in stems and stems[stem][0] != key:
                    shared.add(stem)  # e.g. OME-Zarr fields "0": names no single site
                stems[stem] = (key, str(channel))
        for stem in shared:
            del stems[stem]
        found = _by_image_stem(files, stems)
    claims: dict[SiteKey, dict[str, list[Path]]] = {}
    for key, role, path in found:
        claims.setdefault(key, {}).setdefault(role, []).append(path)
    out: dict[SiteKey, dict[str, Path]] = {}
    notes = []
    for key, roles in claims.items():
        out[key] = {}
        for role, paths in roles.items():
            paths = sorted(paths, key=lambda p: (_rank(p), p.name))
            out[key][role] = paths[0]
            if len(paths) > 1:
                notes.append(
                    f"{key}: {len(paths)} files hold {role}; using {paths[0].name} "
                    f"(not {', '.join(p.name for p in paths[1:3])})"
                )
    return out, notes


def _rank(path: Path) -> int:
    suffix = path.suffix.lower()
    return _PREFERENCE.index(suffix) if suffix in _PREFERENCE else len(_PREFERENCE)
