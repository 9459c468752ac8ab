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
mask; mask pieces without a nucleus are dropped), or into connected pieces without nuclei.
Nuclei take the id of the cell they lie in, so nucleus ``i`` is inside cell ``i`` as everywhere
else. See docs/architecture.md, "One room per step".
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from ..errors import PlateError
from .model import SiteKey, normalize_well, well_from_row_col
from .pattern import FilenamePattern

#: File types read as label images.
LABEL_SUFFIXES = (".tif", ".tiff", ".png", ".npy")
#: Words in a file name that mark it as something other than whole objects.
NOT_OBJECTS = ("cytoplasm", "outline", "flow", "overlay", "prob")
#: Channel names of nuclear stains (a label file named after such an image holds nuclei).
NUCLEAR_NAMES = ("dna", "dapi", "hoechst", "nuclei", "nucleus", "h33342")
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
        stems = {}
        for key, site in sites.items():
            names = getattr(site, "channel_names", ())
            paths = getattr(site, "paths", ())
            for i, path in enumerate(paths):
                channel = names[i] if len(paths) == len(names) else ""
                stems[_stem(Path(path))] = (key, str(channel))
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


# --- reading ------------------------------------------------------------------------------


def _read_npy(path: Path) -> np.ndarray:
    """A plain array, or the ``masks`` of a Cellpose ``_seg.npy`` (a pickled dict).

    Unpickling runs code from the file, so it is done only for files named ``*_seg.npy``,
    which the user put in their own label folder.
    """
    try:
        return np.load(path, allow_pickle=False)
    except ValueError:
        if not path.name.lower().endswith("_seg.npy"):
            raise
    data = np.load(path, allow_pickle=True)
    if data.dtype == object and data.shape == ():
        data = data.item()
    if not isinstance(data, dict) or "masks" not in data:
        raise PlateError(f"{path} is not a Cellpose _seg.npy file: it holds no 'masks'")
    return np.asarray(data["masks"])


def read_label_image(path: str | os.PathLike) -> np.ndarray:
    """One label image or mask as a 2-D integer array; every error names the file."""
    path = Path(path)
    try:
        suffix = path.suffix.lower()
        if suffix == ".npy":
            data = _read_npy(path)
        elif suffix in (".tif", ".tiff"):
            import tifffile

            data = tifffile.imread(path)
        else:
            import imageio.v3 as iio

            data = iio.imread(path)
    except FileNotFoundError:
        raise PlateError(f"label image not found: {path}") from None
    except PlateError:
        raise
    except Exception as exc:  # any reader failure is a bad file, named for the user
        raise PlateError(f"cannot read label image {path}: {exc}") from exc
    data = np.squeeze(np.asarray(data))
    if data.ndim == 3 and data.shape[-1] in (3, 4) and np.all(data[..., :3] == data[..., :1]):
        data = data[..., 0]  # a grey mask saved as RGB(A)
    if data.ndim != 2:
        raise PlateError(f"label image {path} must be 2-D, got shape {data.shape}")
    if data.dtype.kind == "b":
        data = data.astype(np.uint8)
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or not np.all(data == np.round(data)):
            raise PlateError(f"label image {path} holds non-integer values")
        data = data.astype(np.int64)
    if data.dtype.kind not in "iu":
        raise PlateError(f"label image {path} has unsupported type {data.dtype}")
    if data.size and data.min() < 0:
        raise PlateError(f"label image {path} holds negative labels")
    if data.size and int(data.max()) > np.iinfo(np.int32).max:
        raise PlateError(f"label image {path} holds labels beyond int32")
    return data


def is_binary(labels: np.ndarray) -> bool:
    """True for a mask: one foreground value, and one a mask uses (1, 255, 65535, the type's
    maximum). A label image holding one cell numbered otherwise keeps its id."""
    values = np.unique(labels)
    values = values[values > 0]
    if values.size != 1:
        return values.size == 0
    top = np.iinfo(labels.dtype).max if labels.dtype.kind in "iu" else None
    return int(values[0]) in (1, 255, 65535, top)


def split_by_nuclei(mask: np.ndarray, nuclei: np.ndarray) -> np.ndarray:
    """Cells from a binary ``mask``: each mask pixel joins the nucleus nearest inside the mask.

    Distance is measured along paths inside the mask (propagation on a flat image), so a cell
    does not jump a gap to a nucleus across it. Cells are the mask's pixels only: a nucleus
    outside the mask (CellProfiler keeps the nuclei of the border cells it discards) makes no
    cell, and mask pieces that hold no nucleus are dropped.
    """
    from ..segment_classical import propagate

    mask = np.asarray(mask) > 0
    nuclei = np.asarray(nuclei, np.int32)
    grown = propagate(np.zeros(mask.shape), nuclei, mask, regularization=1.0)
    return np.where(mask, grown, 0).astype(np.int32)


def _as_objects(data: np.ndarray) -> np.ndarray:
    """Labels as they are, or a binary mask's connected pieces."""
    from skimage import measure

    if is_binary(data):
        return measure.label(data > 0, connectivity=1).astype(np.int32)
    return data.astype(np.int32)


def _check_shape(data: np.ndarray, path: Path, shape, what: str) -> None:
    if shape is not None and tuple(data.shape) != tuple(shape):
        raise PlateError(
            f"{what} {path} has shape {tuple(data.shape)} but the site's images are {tuple(shape)}"
        )


def read_user_labels(
    cells_path: str | os.PathLike,
    nuclei_path: str | os.PathLike | None = None,
    shape: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(cells, nuclei) int32 of one site from the user's files, ids matched (module docs).

    ``shape``: the site's (H, W); a file of another shape is an error naming it.
    """
    cells_path = Path(cells_path)
    data = read_label_image(cells_path)
    _check_shape(data, cells_path, shape, "cell labels")
    nuclei = None
    if nuclei_path is not None:
        nuclei_path = Path(nuclei_path)
        raw = read_label_image(nuclei_path)
        _check_shape(raw, nuclei_path, data.shape, "nucleus labels")
        nuclei = _as_objects(raw)
    if is_binary(data):
        cells = (
            split_by_nuclei(data, nuclei)
            if nuclei is not None and nuclei.any()
            else _as_objects(data)
        )
    else:
        cells = data.astype(np.int32)
    if nuclei is not None:
        nuclei = np.where(nuclei > 0, cells, 0).astype(np.int32)
    return cells, nuclei
