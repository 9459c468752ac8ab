"""Reading the label images a user brings (:mod:`.label_files` finds them): TIFF, PNG, a plain
``.npy`` array or Cellpose's ``_seg.npy``; binary masks split into cells by the nuclei (the
user's nuclei file, else our own nuclei from the site's nuclear stain), nucleus ids matched to
the cells. See docs/architecture.md, "One room per step".
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..errors import PlateError


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
            from .io import open_tiff

            with open_tiff(path) as tif:
                data = tif.asarray()
        else:
            import imageio.v3 as iio

            data = iio.imread(path)
    except FileNotFoundError:
        raise PlateError(f"label image not found: {path}") from None
    except PlateError:
        raise
    except Exception as exc:  # any reader failure is a bad file, named for the user
        raise PlateError(f"cannot read label image {path}: {exc}") from exc
    data = np.asarray(data)
    while data.ndim > 2 and data.shape[0] == 1:  # length-1 axes around the plane only
        data = data[0]
    while data.ndim > 2 and data.shape[-1] == 1:
        data = data[..., 0]
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
    from ..segment.classical import propagate

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


#: Our own nuclei of a site, asked for only when a binary mask comes without a nuclei file.
OwnNuclei = Callable[[], "np.ndarray | None"]
#: Channel names of nuclear stains (a label file named after such an image holds nuclei).
NUCLEAR_NAMES = ("dna", "dapi", "hoechst", "nuclei", "nucleus", "h33342")


def nuclear_index(channel_names: Sequence[str], nuclear: str | int | None = None) -> int | None:
    """The nuclear stain's channel: ``nuclear`` (a name or index) when the site has it, else the
    first channel named like a nuclear stain (DNA, DAPI, Hoechst, ...), else None."""
    lowered = [str(c).lower() for c in channel_names]
    if nuclear is not None:
        text = str(nuclear).strip()
        if text.isdigit() and int(text) < len(lowered):
            return int(text)
        if text.lower() in lowered:
            return lowered.index(text.lower())
    for i, name in enumerate(lowered):
        if name in NUCLEAR_NAMES:
            return i
    return None


def own_nuclei(read_image: Callable[[], np.ndarray], channel_names, nuclear=None) -> OwnNuclei:
    """Our nuclei of a site (the classical segmenter's default nuclei, as ``segment_nuclei``
    finds them), made only when asked; None when the site has no channel that names a nuclear
    stain."""

    def make() -> np.ndarray | None:
        index = nuclear_index(channel_names, nuclear)
        if index is None:
            return None
        from ..segment.classical import find_nuclei

        found = find_nuclei(np.asarray(read_image())[index])
        return np.where(found.dropped[found.labels], 0, found.labels).astype(np.int32)

    return make


def read_user_labels(
    cells_path: str | os.PathLike,
    nuclei_path: str | os.PathLike | None = None,
    shape: tuple[int, int] | None = None,
    *,
    nuclei_from: OwnNuclei | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(cells, nuclei) int32 of one site from the user's files, ids matched (module docs).

    ``shape``: the site's (H, W); a file of another shape is an error naming it. A binary cell
    mask is split by the nuclei file, or without one by ``nuclei_from()`` (our own nuclei, see
    :func:`own_nuclei`; they are returned as the nuclei); only when neither gives nuclei is it
    split into its connected pieces.
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
        if nuclei is None and nuclei_from is not None:
            nuclei = nuclei_from()
            if nuclei is not None:
                _check_shape(data, cells_path, nuclei.shape, "cell mask")
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
