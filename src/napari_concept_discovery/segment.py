"""Nuclei and cell labels from a nuclear and a cytoplasm/membrane stain, or the user's own.

Classical and dependency-light on purpose (scikit-image only): cells are the unit that tokens
are pooled over, so what matters is one label per cell with the nucleus inside it, not pixel
perfect borders. Nuclei: smoothing, Otsu, a distance-transform watershed to split touching
nuclei. Cells: a foreground mask from the sum of the non-nuclear stains, then a watershed seeded
by the nuclei, so nucleus ``i`` lies in cell ``i``.

``segment_plate`` writes a whole plate into a label folder that ``open_plate`` and embedding
find again (``plate.labels``), so cells are segmented once. See docs/architecture.md, "One
room per step".
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage import filters, measure, morphology, segmentation

from . import __version__
from ._files import atomic_write_bytes, atomic_write_text
from .errors import PlateError
from .plate.labels import MARKER, default_label_folder, label_paths
from .progress import Cancel, ProgressCallback, is_cancelled, report

#: Channel names, lower case, that mark plasma membranes (watershed ridges between cells).
MEMBRANE_NAMES = ("membrane", "wga", "agp", "cellmask", "plasma membrane")
#: Stains whose signal peaks at cell borders; every other stain is brightest inside the cell
#: and dims towards its edge, so touching cells meet in a valley of it instead.
RIDGE_NAMES = (*MEMBRANE_NAMES, "actin", "phalloidin", "f-actin")
NUCLEAR_NAMES = ("dna", "hoechst", "dapi", "nuclei", "nucleus")


def _robust_unit(image: np.ndarray, lo: float = 1.0, hi: float = 99.8) -> np.ndarray:
    """Scale to about [0, 1] by percentiles, so stains of any bit depth can be summed."""
    image = np.asarray(image, dtype=np.float32)
    a, b = np.percentile(image, [lo, hi])
    return np.clip((image - a) / max(float(b - a), 1e-6), 0.0, None)


def channel_ref(value: str | int) -> str | int:
    """A channel as a user types it: an index when it is all digits, else a name."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value


def _channel_index(channel_names: Sequence[str], name: str | int, role: str) -> int:
    if isinstance(name, int | np.integer):
        if not 0 <= name < len(channel_names):
            raise ValueError(f"{role} channel index {name} out of range for {len(channel_names)}")
        return int(name)
    lowered = [c.lower() for c in channel_names]
    if name.lower() in lowered:
        return lowered.index(name.lower())
    raise ValueError(f"{role} channel {name!r} not among channels {list(channel_names)}")


def _remove_small(labels: np.ndarray, min_area: int) -> np.ndarray:
    """Zero the objects with fewer than ``min_area`` pixels."""
    small = np.bincount(labels.ravel()) < min_area
    small[0] = False
    return np.where(small[labels], 0, labels)


def segment_nuclei(
    dna: np.ndarray,
    *,
    sigma: float = 1.5,
    min_area: int | None = None,
    split: bool = True,
) -> np.ndarray:
    """Label nuclei in a nuclear stain: smooth, Otsu, fill holes, split touching nuclei.

    ``min_area`` defaults to a tenth of the median object area (at least 15 pixels), which
    removes debris without knowing the magnification. Touching nuclei are split by a watershed
    on the smoothed distance transform with h-maxima markers, which does not over-split
    elongated nuclei as local-maximum markers do.
    """
    img = ndi.gaussian_filter(_robust_unit(dna), sigma)
    if float(img.max()) <= float(img.min()):
        return np.zeros(img.shape, np.int32)
    mask = img > filters.threshold_otsu(img)
    mask = ndi.binary_fill_holes(mask)
    mask = ndi.binary_opening(mask, morphology.disk(1))
    labels = measure.label(mask)
    areas = np.bincount(labels.ravel())[1:]
    if min_area is None:
        min_area = max(15, int(np.median(areas) / 10)) if areas.size else 15
    labels = _remove_small(labels, min_area)
    if split and labels.max() > 0:
        dist = ndi.distance_transform_edt(labels > 0)
        dist = ndi.gaussian_filter(dist, 1.0)
        markers = measure.label(morphology.h_maxima(dist, 1.5))
        labels = segmentation.watershed(-dist, markers, mask=labels > 0)
        labels = _remove_small(labels, min_area)
    labels, _, _ = segmentation.relabel_sequential(labels)
    return labels.astype(np.int32)


def cell_surface(
    image: np.ndarray, channel_names: Sequence[str], nuclear: str | int = "DNA", cell=None
) -> tuple[np.ndarray, np.ndarray]:
    """The foreground image (mean of non-nuclear stains) and the watershed surface for cells.

    ``cell`` names one channel or a list of channels for the surface; None picks a membrane
    stain by name if there is one and otherwise all non-nuclear stains. Border stains (membrane,
    actin: ``RIDGE_NAMES``) enter the surface as they are, other stains inverted, so that
    borders between touching cells are ridges of the surface either way.
    """
    n = _channel_index(channel_names, nuclear, "nuclear")
    others = [i for i in range(image.shape[0]) if i != n]
    if not others:
        raise ValueError("cell segmentation needs at least one channel besides the nuclear one")
    units = {i: _robust_unit(image[i]) for i in others}
    foreground = ndi.gaussian_filter(sum(units.values()) / len(others), 2.0)
    if cell is None:
        lowered = [c.lower() for c in channel_names]
        chosen = [i for i in others if lowered[i] in MEMBRANE_NAMES]
    elif isinstance(cell, str | int | np.integer):
        chosen = [_channel_index(channel_names, cell, "cell")]
    else:
        chosen = [_channel_index(channel_names, c, "cell") for c in cell]
    if not chosen:
        chosen = others
    lowered = [c.lower() for c in channel_names]
    surface = sum(
        (1.0 if lowered[i] in RIDGE_NAMES else -1.0)
        * (units[i] if i in units else _robust_unit(image[i]))
        for i in chosen
    )
    surface = ndi.gaussian_filter(surface / len(chosen), 1.0)
    return foreground, surface


def segment_cells(
    foreground: np.ndarray,
    surface: np.ndarray,
    nuclei: np.ndarray,
    *,
    min_area: int | None = None,
) -> np.ndarray:
    """Cells by a nucleus-seeded watershed on ``surface`` inside the foreground mask.

    The mask is Otsu on the log of the foreground (cell edges are dim, so a linear threshold
    cuts them off), joined with the nuclei. Pixels of the mask that no seed reaches stay 0;
    cell ``i`` always contains nucleus ``i``.
    """
    logf = np.log1p(50.0 * foreground)
    mask = logf > filters.threshold_otsu(logf)
    mask = ndi.binary_fill_holes(mask | (nuclei > 0))
    mask = ndi.binary_opening(mask, morphology.disk(2)) | (nuclei > 0)
    # The surface gets a little of the distance from the nucleus so that flat regions are
    # shared out by proximity instead of by noise.
    dist = ndi.distance_transform_edt(nuclei == 0)
    if mask.any():  # scale the surface's range inside cells to about 1
        lo, hi = np.percentile(surface[mask], [1, 99])
        surface = (surface - lo) / max(float(hi - lo), 1e-6)
    flood = surface + 0.01 * dist
    cells = segmentation.watershed(flood, nuclei, mask=mask)
    if min_area is not None:
        small = np.bincount(cells.ravel())[1:] < min_area
        small_ids = np.flatnonzero(small) + 1
        keep = ~np.isin(cells, small_ids) | (nuclei > 0)
        cells = np.where(keep, cells, 0)
    return cells.astype(np.int32)


def segment_site(
    image: np.ndarray,
    channel_names: Sequence[str],
    nuclear: str | int = "DNA",
    cell: str | int | Sequence[str | int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Nuclei and cell labels (int32, same ids) of one (C, H, W) site."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] != len(channel_names):
        raise ValueError(
            f"image must be (C, H, W) with C = {len(channel_names)} channels, got {image.shape}"
        )
    n = _channel_index(channel_names, nuclear, "nuclear")
    nuclei = segment_nuclei(image[n])
    if image.shape[0] == 1:
        return nuclei, nuclei.copy()
    foreground, surface = cell_surface(image, channel_names, nuclear, cell)
    cells = segment_cells(foreground, surface, nuclei)
    return nuclei, cells


def match_counts(pred: np.ndarray, truth: np.ndarray, iou: float = 0.5) -> tuple[int, int, int]:
    """(true positives, number of predicted objects, number of true objects) at an IoU.

    At IoU >= 0.5 a match is unique, so matches are simply the pairs above the threshold;
    below 0.5 an optimal one-to-one assignment is used.
    """
    pred = np.asarray(pred).ravel()
    truth = np.asarray(truth).ravel()
    if pred.shape != truth.shape:
        raise ValueError(f"label images differ in shape: {pred.shape} vs {truth.shape}")
    pred_ids = np.unique(pred[pred > 0])
    truth_ids = np.unique(truth[truth > 0])
    if pred_ids.size == 0 or truth_ids.size == 0:
        return 0, int(pred_ids.size), int(truth_ids.size)
    p = np.searchsorted(pred_ids, pred)  # dense indices; background handled by the mask
    t = np.searchsorted(truth_ids, truth)
    both = (pred > 0) & (truth > 0)
    pairs = p[both].astype(np.int64) * truth_ids.size + t[both]
    uniq, inter = np.unique(pairs, return_counts=True)
    pi, ti = np.divmod(uniq, truth_ids.size)
    parea = np.bincount(p[pred > 0], minlength=pred_ids.size)
    tarea = np.bincount(t[truth > 0], minlength=truth_ids.size)
    ious = inter / (parea[pi] + tarea[ti] - inter)
    if iou >= 0.5:
        tp = int(np.sum(ious > iou) if iou == 0.5 else np.sum(ious >= iou))
    else:
        from scipy.optimize import linear_sum_assignment

        m = np.zeros((pred_ids.size, truth_ids.size))
        m[pi, ti] = ious
        r, c = linear_sum_assignment(-m)
        tp = int(np.sum(m[r, c] >= iou))
    return tp, int(pred_ids.size), int(truth_ids.size)


def matched_f1(pred: np.ndarray, truth: np.ndarray, iou: float = 0.5) -> float:
    """F1 of one-to-one object matches at an IoU threshold (1.0 when both are empty)."""
    tp, n_pred, n_truth = match_counts(pred, truth, iou)
    if n_pred + n_truth == 0:
        return 1.0
    return 2.0 * tp / (n_pred + n_truth)


def load_user_labels(path: str | os.PathLike, shape: tuple[int, int]) -> np.ndarray:
    """Read the user's label image (or binary mask) for a site of ``shape`` as int32 labels.

    A binary mask (two values, e.g. 0/1 or 0/255, as CellProfiler writes) becomes connected
    components; an integer image is taken as labels. Errors name the file.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            data = tifffile.imread(path)
        else:
            import imageio.v3 as iio

            data = iio.imread(path)
    except FileNotFoundError:
        raise PlateError(f"label image not found: {path}") from None
    except Exception as exc:  # any reader failure is a bad file, named for the user
        raise PlateError(f"cannot read label image {path}: {exc}") from exc
    data = np.squeeze(np.asarray(data))
    if data.ndim == 3 and data.shape[-1] in (3, 4) and tuple(data.shape[:2]) == tuple(shape):
        if np.all(data[..., :3] == data[..., :1]):  # a grey mask saved as RGB(A)
            data = data[..., 0]
    if data.ndim != 2:
        raise PlateError(f"label image {path} must be 2-D, got shape {data.shape}")
    if tuple(data.shape) != tuple(shape):
        raise PlateError(
            f"label image {path} has shape {data.shape} but the site is {tuple(shape)}"
        )
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or not np.all(data == np.round(data)):
            raise PlateError(f"label image {path} holds non-integer values")
        data = data.astype(np.int64)
    if data.dtype.kind not in "biu":
        raise PlateError(f"label image {path} has unsupported type {data.dtype}")
    if data.min() < 0:
        raise PlateError(f"label image {path} holds negative labels")
    values = np.unique(data)
    if values.size <= 2:  # binary mask: 0 and one foreground value
        return measure.label(data > 0, connectivity=1).astype(np.int32)
    if values.max() > np.iinfo(np.int32).max:
        raise PlateError(f"label image {path} holds labels beyond int32")
    return data.astype(np.int32)


def _write_tiff(path: Path, labels: np.ndarray) -> None:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.asarray(labels, np.int32), compression="zlib")
    atomic_write_bytes(path, buf.getvalue())


def segment_plate(
    plate,
    out: str | os.PathLike | None = None,
    *,
    nuclear: str | int = "DNA",
    cell: str | int | Sequence[str | int] | None = None,
    progress: ProgressCallback = None,
    cancel: Cancel = None,
) -> Path | None:
    """Segment every site of a plate into a label folder; returns the folder (None if cancelled).

    ``out`` defaults to ``<plate folder>/segmentation``, which ``open_plate`` then uses by
    itself; any other folder is given to it (and to ``embed``) as ``labels=``. Each label file
    lands atomically and the folder's marker says "complete" only at the end, so an
    interrupted run is never taken for a finished one. Progress: stage "segment", done/total
    sites, info ``site``.
    """
    folder = Path(out).expanduser() if out is not None else default_label_folder(plate.root)
    names = plate.channel_names
    total = len(plate)
    try:  # a channel the plate lacks is found before anything is written
        _channel_index(names, nuclear, "nuclear")
    except ValueError as exc:
        raise PlateError(f"cannot segment {plate.root}: {exc}") from exc
    marker = {
        "written_by": f"napari-concept-discovery {__version__} segment",
        "complete": False,
        "plate": str(Path(plate.root).resolve()),
        "channels": list(names),
        "nuclear": nuclear,
        "cell": cell if cell is None or isinstance(cell, str | int) else list(cell),
        "sites": total,
    }
    try:  # marked unfinished first, so the folder is never read as images nor used half done
        atomic_write_text(folder / MARKER, json.dumps(marker, indent=1))
    except OSError as exc:
        raise PlateError(
            f"cannot write cell labels to {folder}: {exc}; choose another folder (--out) and "
            "give it to embed as --labels"
        ) from exc
    report(progress, "segment", 0, total)
    for done, site in enumerate(plate, start=1):
        if is_cancelled(cancel):
            return None
        try:
            nuclei, cells = segment_site(site.read(), names, nuclear, cell)
        except ValueError as exc:  # a channel name or shape the user can fix
            raise PlateError(f"cannot segment site {site.key}: {exc}") from exc
        cells_path, nuclei_path = label_paths(folder, site.key)
        _write_tiff(cells_path, cells)
        _write_tiff(nuclei_path, nuclei)
        report(progress, "segment", done, total, site=str(site.key))
    marker["complete"] = True
    atomic_write_text(folder / MARKER, json.dumps(marker, indent=1))
    return folder
