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

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import PlateError

#: The label image of an NGFF field that holds the cells (``<field>/labels/<name>``), and nuclei.
CELL_LABELS = ("cells", "cell", "cytoplasm")
NUCLEUS_LABELS = ("nuclei", "nucleus")


def _location(path: Path):
    from ome_zarr.io import ZarrLocation

    try:
        loc = ZarrLocation(str(path))
    except Exception as exc:  # noqa: BLE001 - zarr/fsspec raise many kinds; name the path
        raise PlateError(f"cannot open the OME-Zarr group {path}: {exc}") from exc
    return loc if loc.exists() else None


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
        data = np.asarray(loc.load(attrs["multiscales"][0]["datasets"][0]["path"]))
    except Exception as exc:  # noqa: BLE001
        raise PlateError(f"cannot read the OME-Zarr field {path}: {exc}") from exc
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
                notes.append(f"{proot}: well {wpath} is listed but missing; skipped")
                continue
            well_name = "".join(wpath.strip("/").split("/")[-2:])
            images = (wloc.root_attrs.get("well") or {}).get("images") or []
            for i, image in enumerate(images):
                field = proot / wpath / str(image["path"])
                floc = _location(field)
                if floc is None:
                    notes.append(f"{field}: field listed in its well but missing; skipped")
                    continue
                attrs = floc.root_attrs
                axes = _axes(attrs, field)
                arr = floc.load(attrs["multiscales"][0]["datasets"][0]["path"])
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
        raise PlateError(f"the OME-Zarr plate(s) at {root} hold no readable fields")
    return list(names or []), sites, notes
