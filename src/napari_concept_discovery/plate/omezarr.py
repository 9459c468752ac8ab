"""OME-Zarr high-content-screening plates (NGFF plate / well / field), read through ``ome-zarr``.

A plate is a zarr group whose attributes hold ``plate`` (rows, columns, wells with their paths);
each well holds ``well.images`` (its fields, in order) and each field is a multiscale image with
axes such as ``(t, c, z, y, x)``. A field becomes one site: site number = the
field's position in the well's list + 1, channels from the field's ``omero`` labels, the first
time point and the full-resolution level. A field's ``labels/cells`` (an NGFF label image) are
its cell labels. ``ome_zarr.io.ZarrLocation`` does the reading, so NGFF 0.4 (zarr v2) and 0.5
(zarr v3, ``ome`` namespace) both work. A folder of several ``*.zarr`` plates opens as one
screen.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import PlateError

#: The label image of an NGFF field that holds the cells (``<field>/labels/<name>``), and nuclei.
CELL_LABELS = ("cells", "cell", "cytoplasm")
NUCLEUS_LABELS = ("nuclei", "nucleus")


class _NoVersionNotes(logging.Filter):
    """ome-zarr logs "version mismatch" for every NGFF 0.4 group it opens; the version is
    found and read all the same, so the note only hides the real message from the user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "version mismatch" not in record.getMessage()


_QUIET = _NoVersionNotes()


def _location(path: Path):
    from ome_zarr.io import ZarrLocation

    log = logging.getLogger("ome_zarr.io")
    log.addFilter(_QUIET)
    try:
        loc = ZarrLocation(str(path))
        return loc if loc.exists() else None
    except Exception as exc:  # noqa: BLE001 - zarr/fsspec raise many kinds; name the path
        raise PlateError(f"cannot open the OME-Zarr group {path}: {exc}") from exc
    finally:
        log.removeFilter(_QUIET)


def why_unreadable(path: Path) -> str:
    """Why the OME-Zarr group at ``path`` cannot be opened: missing, metadata that is not
    JSON, or no group metadata at all (``zarr.json`` for NGFF 0.5, ``.zattrs`` for 0.4)."""
    path = Path(path)
    if not path.exists():
        return "is listed but missing"
    for name in ("zarr.json", ".zattrs", ".zgroup"):
        meta = path / name
        if meta.is_file():
            try:
                json.loads(meta.read_text())
            except (OSError, ValueError) as exc:
                return f"has metadata {meta} that is not valid JSON ({exc})"
    if not (path / "zarr.json").is_file() and not (path / ".zattrs").is_file():
        return "has no group metadata (zarr.json for NGFF 0.5, .zattrs for NGFF 0.4)"
    return "cannot be read as an OME-Zarr group"


#: Pixel types a field may hold (unsigned and signed integers, floats).
PIXEL_KINDS = "uif"


def _check_array(arr, axes: list[str], where: Path) -> None:
    """A field's array must have one dimension per axis its metadata names, and real pixels."""
    if len(axes) != len(arr.shape):
        raise PlateError(
            f"{where}: its metadata names {len(axes)} axes ({', '.join(axes)}) but its array "
            f"has {len(arr.shape)} dimensions, shape {tuple(arr.shape)}"
        )
    dtype = np.dtype(arr.dtype)
    if dtype.kind not in PIXEL_KINDS:
        raise PlateError(
            f"{where} holds {dtype} pixels; expected integers or floats (one real value a pixel)"
        )


def is_plate(path: Path) -> bool:
    """True when ``path`` is an OME-Zarr plate group (its attributes have ``plate``)."""
    path = Path(path)
    if not ((path / ".zattrs").is_file() or (path / "zarr.json").is_file()):
        return False
    loc = _location(path)
    return loc is not None and "plate" in loc.root_attrs


def plate_roots(root: Path) -> list[Path]:
    """``root`` itself when it is a plate, else the plates directly inside it (sorted)."""
    root = Path(root)
    if is_plate(root):
        return [root]
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and is_plate(p))


def _plate_name(root: Path, attrs: dict) -> str:
    name = attrs.get("name")
    if name:
        return str(name)
    return root.name[: -len(".zarr")] if root.name.endswith(".zarr") else root.name


def _axes(image_attrs: dict, where: Path) -> list[str]:
    try:
        axes = image_attrs["multiscales"][0].get("axes")
    except (KeyError, IndexError, TypeError):
        raise PlateError(f"{where} is not an OME-Zarr image (no multiscales)") from None
    if axes is None:  # NGFF 0.1-0.3: always 5D
        return ["t", "c", "z", "y", "x"]
    return [a["name"] if isinstance(a, dict) else str(a) for a in axes]


def _channel_names(image_attrs: dict, n: int) -> list[str]:
    channels = (image_attrs.get("omero") or {}).get("channels") or []
    names = [str(c.get("label") or "") for c in channels]
    if len(names) != n or not all(names):
        return [f"ch{i + 1}" for i in range(n)]
    return names


def read_image(path: Path) -> np.ndarray:
    """The (C, H, W) full-resolution pixels of one field (first time point; a z stack gives
    its first plane); PlateError names the field at fault."""
    loc = _location(Path(path))
    if loc is None:
        raise PlateError(f"OME-Zarr field not found: {path}")
    attrs = loc.root_attrs
    axes = _axes(attrs, path)
    try:
        arr = loc.load(attrs["multiscales"][0]["datasets"][0]["path"])
        _check_array(arr, axes, path)
        data = np.asarray(arr)
    except PlateError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise PlateError(f"cannot read the OME-Zarr field {path}: {exc}") from exc
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        bad = int(data.size - np.isfinite(data).sum())
        raise PlateError(
            f"{path} holds {bad} NaN or Inf pixels of {data.size}; a pixel must be a number"
        )
    index = tuple(slice(None) if a in ("c", "y", "x") else 0 for a in axes)
    data = data[index]
    kept = [a for a in axes if a in ("c", "y", "x")]
    if "c" not in kept:
        data, kept = data[None], ["c", *kept]
    return np.transpose(data, [kept.index(a) for a in ("c", "y", "x")])


def image_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """(C, H, W) and dtype of one field from its metadata and array header, no pixels."""
    loc = _location(Path(path))
    if loc is None:
        raise PlateError(f"OME-Zarr field not found: {path}")
    attrs = loc.root_attrs
    axes = _axes(attrs, path)
    arr = loc.load(attrs["multiscales"][0]["datasets"][0]["path"])
    _check_array(arr, axes, path)
    shape = dict(zip(axes, arr.shape, strict=True))
    return (shape.get("c", 1), shape["y"], shape["x"]), np.dtype(arr.dtype)


def read_labels(path: Path) -> np.ndarray:
    """An NGFF label image of a field as (H, W) int32."""
    img = read_image(path)
    return np.asarray(img[0], dtype=np.int32)


def is_field(path: Path) -> bool:
    """True for a folder that is an OME-Zarr image (a field or a label image)."""
    path = Path(path)
    return path.is_dir() and ((path / ".zattrs").is_file() or (path / "zarr.json").is_file())


def _label_image(field: Path, names: tuple[str, ...]) -> Path | None:
    loc = _location(field / "labels")
    if loc is None:
        return None
    listed = [str(n) for n in loc.root_attrs.get("labels", [])]
    for name in names:
        if name in listed and _location(field / "labels" / name) is not None:
            return field / "labels" / name
    return None


@dataclass(frozen=True)
class Field:
    """One field of a well: where its pixels and label images are (no pixels read)."""

    plate: str
    well: str  # as the plate names it: row name + column name, e.g. "B3"
    site: int  # 1-based position in the well's image list
    path: Path
    labels: Path | None
    nuclei: Path | None


def find_fields(root: Path) -> tuple[list[str], list[Field], list[str]]:
    """Channel names, fields and notes of the OME-Zarr plate(s) at ``root``."""
    roots = plate_roots(root)
    if not roots:
        raise PlateError(f"no OME-Zarr plate at {root} (a zarr group with 'plate' attributes)")
    sites: list[Field] = []
    notes: list[str] = []
    names: list[str] | None = None
    for proot in roots:
        loc = _location(proot)
        plate = loc.root_attrs["plate"]
        pname = _plate_name(proot, plate)
        for well in plate.get("wells", []):
            wpath = str(well["path"])
            wloc = _location(proot / wpath)
            if wloc is None:
                notes.append(f"{proot}: well {wpath} {why_unreadable(proot / wpath)}; skipped")
                continue
            well_name = "".join(wpath.strip("/").split("/")[-2:])
            images = (wloc.root_attrs.get("well") or {}).get("images") or []
            if not images:
                meta = ".zattrs (NGFF 0.4)" if (proot / ".zattrs").is_file() else "zarr.json"
                notes.append(
                    f"{proot}: well {wpath} has no well metadata listing its fields (the 'well' "
                    f"attributes of its {meta}); skipped"
                )
                continue
            for i, image in enumerate(images):
                field = proot / wpath / str(image["path"])
                floc = _location(field)
                if floc is None:
                    notes.append(
                        f"{field}: field listed in its well {why_unreadable(field)}; skipped"
                    )
                    continue
                attrs = floc.root_attrs
                axes = _axes(attrs, field)
                arr = floc.load(attrs["multiscales"][0]["datasets"][0]["path"])
                try:
                    _check_array(arr, axes, field)
                except PlateError as exc:
                    notes.append(f"{exc}; skipped")
                    continue
                n_channels = dict(zip(axes, arr.shape, strict=True)).get("c", 1)
                channels = _channel_names(attrs, n_channels)
                if names is None:
                    names = channels
                elif channels != names:
                    notes.append(
                        f"{field}: channels {channels} differ from the plate's {names}; skipped"
                    )
                    continue
                sites.append(
                    Field(
                        pname,
                        well_name,
                        i + 1,
                        field,
                        _label_image(field, CELL_LABELS),
                        _label_image(field, NUCLEUS_LABELS),
                    )
                )
    if not sites:
        why = (": " + "; ".join(notes[:5]) + (" ..." if len(notes) > 5 else "")) if notes else ""
        raise PlateError(f"the OME-Zarr plate(s) at {root} hold no readable fields{why}")
    return list(names or []), sites, notes
