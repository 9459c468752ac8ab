"""The segmentation of version 0.1, kept to reproduce older label folders and for comparison.

Nuclei: Otsu on the percentile-scaled, smoothed nuclear stain, split by a distance-transform
watershed. Cells: a foreground from Otsu on the log of the mean of the other stains, split by a
nucleus-seeded watershed on a border surface. On real plates its cells spread far beyond
CellProfiler's (``benchmarks/bench_segment.py``); :mod:`.segment_classical` replaces it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage import filters, measure, morphology, segmentation

#: Channel names, lower case, that mark plasma membranes (watershed ridges between cells).
MEMBRANE_NAMES = ("membrane", "wga", "agp", "cellmask", "plasma membrane")
#: Stains whose signal peaks at cell borders; every other stain is brightest inside the cell
#: and dims towards its edge, so touching cells meet in a valley of it instead.
RIDGE_NAMES = (*MEMBRANE_NAMES, "actin", "phalloidin", "f-actin")


def _robust_unit(image: np.ndarray, lo: float = 1.0, hi: float = 99.8) -> np.ndarray:
    """Scale to about [0, 1] by percentiles, so stains of any bit depth can be summed."""
    image = np.asarray(image, dtype=np.float32)
    a, b = np.percentile(image, [lo, hi])
    return np.clip((image - a) / max(float(b - a), 1e-6), 0.0, None)


def _remove_small(labels: np.ndarray, min_area: int) -> np.ndarray:
    """Zero the objects with fewer than ``min_area`` pixels."""
    small = np.bincount(labels.ravel()) < min_area
    small[0] = False
    return np.where(small[labels], 0, labels)


def legacy_nuclei(dna: np.ndarray, *, sigma: float = 1.5, min_area: int | None = None):
    """Nuclei: smooth, Otsu, fill holes, split touching nuclei by h-maxima of the distance."""
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
    if labels.max() > 0:
        dist = ndi.distance_transform_edt(labels > 0)
        dist = ndi.gaussian_filter(dist, 1.0)
        markers = measure.label(morphology.h_maxima(dist, 1.5))
        labels = segmentation.watershed(-dist, markers, mask=labels > 0)
        labels = _remove_small(labels, min_area)
    labels, _, _ = segmentation.relabel_sequential(labels)
    return labels.astype(np.int32)


def _surface(image, channel_names: Sequence[str], nuclear: int, cell: Sequence[int] | None):
    """The foreground image (mean of non-nuclear stains) and the watershed surface."""
    others = [i for i in range(image.shape[0]) if i != nuclear]
    units = {i: _robust_unit(image[i]) for i in others}
    fg = ndi.gaussian_filter(sum(units.values()) / len(others), 2.0)
    lowered = [c.lower() for c in channel_names]
    chosen = list(cell) if cell is not None else [i for i in others if lowered[i] in MEMBRANE_NAMES]
    chosen = chosen or others
    surface = sum(
        (1.0 if lowered[i] in RIDGE_NAMES else -1.0)
        * (units[i] if i in units else _robust_unit(image[i]))
        for i in chosen
    )
    return fg, ndi.gaussian_filter(surface / len(chosen), 1.0)


def _cells(fg: np.ndarray, surface: np.ndarray, nuclei: np.ndarray) -> np.ndarray:
    logf = np.log1p(50.0 * fg)
    mask = logf > filters.threshold_otsu(logf)
    mask = ndi.binary_fill_holes(mask | (nuclei > 0))
    mask = ndi.binary_opening(mask, morphology.disk(2)) | (nuclei > 0)
    dist = ndi.distance_transform_edt(nuclei == 0)
    if mask.any():
        lo, hi = np.percentile(surface[mask], [1, 99])
        surface = (surface - lo) / max(float(hi - lo), 1e-6)
    return segmentation.watershed(surface + 0.01 * dist, nuclei, mask=mask).astype(np.int32)


def segment_legacy(image, channel_names: Sequence[str], nuclear: int, cell=None):
    """(nuclei, cells) of one (C, H, W) site as version 0.1 made them."""
    nuclei = legacy_nuclei(image[nuclear])
    if image.shape[0] == 1:
        return nuclei, nuclei.copy()
    fg, surface = _surface(image, channel_names, nuclear, cell)
    return nuclei, _cells(fg, surface, nuclei)
