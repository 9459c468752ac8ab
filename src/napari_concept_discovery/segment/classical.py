"""Nuclei and cells the way CellProfiler's standard Cell Painting pipelines find them.

Every threshold knows where the background is: each stain's background level and noise are
estimated from the image itself (:func:`background`: the mode of the darker half of the
smoothed stain and the spread below it, CellProfiler's "Robust Background" in spirit), and no
threshold lies within ``noise_floor`` robust deviations of that level, so a dark, noisy
background never counts as foreground. Nuclei: a threshold chosen per image (minimum
cross-entropy, Otsu or three-class Otsu, on the intensities or their log), compared with the
lightly smoothed stain, holes filled, touching nuclei split by shape, size limits. Cells: a
foreground threshold per cell stain, by default the stain's background plus a share (0.15) of
its bright level above it (the 99.5th percentile, saturated pixels left out); CellProfiler's
per-image methods (Otsu on the log intensities was the default before) stay available. Each
stain's mask is judged before it joins the others (:func:`judge_stain`): one that covers most
of a sparse site, or does not follow the nuclei, is left out with a :class:`StainWarning`
naming the stain. The union over the stains is the foreground; then every nucleus grows inside
it by CellProfiler's *Propagation*, on the cell stains weighted by how far each fills its cells
(:func:`propagation_weights`: a perinuclear or uneven stain, which fades long before the cell's
border, would otherwise hand a bright cell's periphery to a dimmer neighbour): a pixel joins
the nucleus nearest to it, where the length of a step between neighbouring pixels is
``sqrt(d**2 + lambda**2 * step)`` with ``d`` the summed absolute intensity difference of the
two pixels' 3 x 3 windows and ``lambda`` the regularisation factor (0: follow the image's edges only; large: plain distance). This is the algorithm of
Jones et al. (2005), "Voronoi-based segmentation of cells on image manifolds", solved here as a
shortest-path problem on the pixel graph (scipy's Dijkstra with all seeds as sources).

Nucleus ``i`` always lies inside cell ``i``. Objects whose nucleus fails the size limits, or
that touch the image edge when asked, are still grown (so their neighbours do not take their
cytoplasm) and dropped afterwards, with their nucleus. Touching the edge means, as in
CellProfiler, the nucleus touching it (IdentifyPrimaryObjects' "discard objects touching the
border": a cell grown from an interior nucleus is whole enough to keep even where it reaches
the edge), or, by choice, the cell touching it (IdentifySecondaryObjects' option of the same
name, which the NF1 pipeline also sets). See docs/architecture.md, "One room per step".
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy import sparse
from scipy.sparse import csgraph
from skimage import filters, measure, morphology, segmentation

from ..settings import PROPAGATION_RULES

#: Names of transmitted-light channels, which carry no fluorescent foreground.
TRANSMITTED_NAMES = ("brightfield", "bf", "phase", "dic", "transmitted", "tl")


def threshold(
    image: np.ndarray, method: str = "otsu", *, log: bool = False, factor: float = 1.0
) -> float:
    """A global threshold of one image, as CellProfiler's Threshold module computes it.

    ``method``: "otsu" (two classes), "otsu3" (three classes, the middle class counted as
    foreground: the lower of the two thresholds, on 128 bins as CellProfiler does) or "mce"
    (minimum cross-entropy, Li's method). ``log`` thresholds the log of the intensities, floored
    at 1/256 of the range above the minimum (CellProfiler's log transform), which suits dim
    cell edges next to bright cell bodies. ``factor`` multiplies the result (CellProfiler's
    correction factor).
    """
    values = np.asarray(image, dtype=np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return hi * factor
    if log:
        floor = lo + (hi - lo) / 256.0
        if floor <= 0:  # log needs positive values: shift so the floor sits at 1/256
            shift = (hi - lo) / 256.0 - floor
            values, floor = values + shift, floor + shift
        else:
            shift = 0.0
        values = np.log(np.maximum(values, floor))
    if method == "otsu":
        t = filters.threshold_otsu(values)
    elif method == "otsu3":
        try:
            t = filters.threshold_multiotsu(values, classes=3, nbins=128)[0]
        except ValueError:  # two levels only (a binary or posterised image): no middle class,
            t = (values.min() + values.max()) / 2  # so halfway, where a blurred edge is
    elif method == "mce":
        t = filters.threshold_li(values)
    else:
        raise ValueError(f"unknown threshold method {method!r}; use otsu, otsu3 or mce")
    if log:
        t = float(np.exp(t)) - shift
    return float(t) * factor


class StainWarning(UserWarning):
    """A stain left out of the cell foreground (the message names it and says why)."""


@dataclass(frozen=True)
class Background:
    """A stain's background: its level and the robust deviation of its noise (smoothed image)."""

    level: float
    noise: float

    def floor(self, k: float) -> float:
        """The lowest threshold that is not inside the noise: level + k deviations."""
        return self.level + k * self.noise


def background(smoothed: np.ndarray) -> Background:
    """The background level and noise of a (smoothed) fluorescence image.

    Level: the lowest clear peak (the highest within 15 bins, and at least a fifth of the
    highest) of the histogram of the darker half of the pixels (200 bins, lightly smoothed),
    which is the background's peak whether the cells cover a tenth of the site or nine tenths
    of it. Noise: the median
    distance below that level of the pixels under it, as a normal deviation (/ 0.6745); the
    pixels above it hold the cells, so only the lower side measures the noise. Clipped at zero
    (an 8-bit background a count above 0), the lower side is short and the noise comes out
    small, never large.
    """
    values = np.asarray(smoothed, dtype=np.float64)
    lo, med = np.percentile(values, [0.05, 50])
    if med <= lo:
        return Background(float(med), 0.0)
    low = values[values <= med]
    try:
        hist, edges = np.histogram(low, bins=200, range=(lo, med))
    except ValueError:  # a range too narrow for 200 bins: the darker half is one level
        return Background(float(med), 0.0)
    hist = ndi.gaussian_filter1d(hist.astype(np.float64), 3.0)
    # peaks: the highest within 15 bins either side, and at least a fifth of the highest
    local = ndi.maximum_filter1d(hist, 31, mode="constant", cval=-1.0)
    peaks = (hist >= local) & (hist >= 0.2 * hist.max())
    mode = float(0.5 * (edges[:-1] + edges[1:])[np.flatnonzero(peaks)[0]])
    below = low[low < mode]
    noise = float(np.median(mode - below) / 0.6745) if below.size else 0.0
    return Background(mode, noise)


def bright_level(image: np.ndarray, smoothed: np.ndarray, percentile: float = 99.5) -> float:
    """The stain's bright level: a high percentile of the smoothed image, leaving out pixels
    saturated in the raw image (at its maximum, when more than one in 10,000 are), so that
    saturated blobs do not set it."""
    raw = np.asarray(image)
    top = raw.max()
    at_top = raw == top
    keep = ~at_top if at_top.mean() > 1e-4 and not at_top.all() else np.ones(raw.shape, bool)
    return float(np.percentile(smoothed[keep], percentile))


def stain_threshold(
    image: np.ndarray,
    method: str = "background",
    *,
    log: bool = False,
    factor: float = 1.0,
    sigma: float = 1.0,
    noise_floor: float = 4.0,
    fraction: float = 0.15,
) -> tuple[float, Background, np.ndarray]:
    """(threshold, background, smoothed image) of one stain (module docs).

    ``method`` "background": level + max(k noise, ``fraction`` (bright level - level)), times
    ``factor``; else :func:`threshold` of the raw image. Either way never below the noise
    floor, level + ``noise_floor`` deviations.
    """
    smoothed = smooth(image, sigma)
    bg = background(smoothed)
    floor = bg.floor(noise_floor)
    if method == "background":
        level = bright_level(image, smoothed)
        t = (bg.level + max(noise_floor * bg.noise, fraction * (level - bg.level))) * factor
    else:
        t = threshold(image, method, log=log, factor=factor)
    return max(float(t), floor), bg, smoothed


def smooth(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing that does not darken the image edge (normalised by the kernel mass)."""
    image = np.asarray(image, dtype=np.float64)
    if sigma <= 0:
        return image
    num = ndi.gaussian_filter(image, sigma, mode="constant", cval=0.0)
    den = ndi.gaussian_filter(np.ones(image.shape), sigma, mode="constant", cval=0.0)
    return num / den


def foreground(
    image: np.ndarray,
    method: str,
    *,
    log: bool,
    factor: float,
    sigma: float,
    noise_floor: float = 4.0,
    fraction: float = 0.15,
):
    """Pixels of the smoothed image at or above the stain's threshold (:func:`stain_threshold`)
    and above its background level; none in a constant image (a missing stain)."""
    image = np.asarray(image)
    if image.size == 0 or float(image.max()) <= float(image.min()):
        return np.zeros(image.shape, bool)
    t, bg, smoothed = stain_threshold(
        image,
        method,
        log=log,
        factor=factor,
        sigma=sigma,
        noise_floor=noise_floor,
        fraction=fraction,
    )
    return (smoothed >= t) & (smoothed > bg.level)


def unit_scale(image: np.ndarray, lo: float = 0.5, hi: float = 99.8) -> np.ndarray:
    """Scale so that the darkest and brightest few pixels sit near 0 and 1.

    Propagation weighs intensity differences against distance; on this scale the
    regularisation factor means the same for 8-bit and 16-bit images and any exposure.
    """
    image = np.asarray(image, dtype=np.float64)
    a, b = np.percentile(image, [lo, hi])
    return (image - a) / max(float(b - a), 1e-12)


def looks_transmitted(image: np.ndarray) -> bool:
    """True for a brightfield-like channel: most pixels halfway up the range, not near its floor.

    Fluorescence is a dark background with bright objects, so its median lies near the low
    percentiles even in a confluent well; transmitted light is grey with darker and brighter
    structure around the middle.
    """
    a, med, b = np.percentile(np.asarray(image, dtype=np.float64), [0.5, 50, 99.5])
    return b > a and (med - a) / (b - a) > 0.35


def fill_label_holes(labels: np.ndarray) -> np.ndarray:
    """Fill the background holes inside each object (holes holding another object stay)."""
    out = labels.copy()
    for region in measure.regionprops(labels):
        window = out[region.slice]
        filled = ndi.binary_fill_holes(region.image)
        window[filled & (window == 0)] = region.label
    return out


def touching_edge(labels: np.ndarray) -> np.ndarray:
    """Ids of the objects with a pixel on the image border."""
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    ids = np.unique(edge)
    return ids[ids > 0]


def _step_costs(image: np.ndarray, weight: float):
    """Edges of the 8-connected pixel graph and their propagation lengths.

    For neighbours p, q: ``sqrt(d**2 + weight**2 * (|di| + |dj|))``, ``d`` the sum over the 3 x
    3 window offsets k of ``|I(p + k) - I(q + k)|`` (the image clamped at its border).
    """
    h, w = image.shape
    pad = np.pad(image, 2, mode="edge")
    for di, dj in ((0, 1), (1, 0), (1, 1), (1, -1)):
        rows = slice(0, h - di)
        cols = slice(max(0, -dj), w - max(0, dj))
        diff = np.zeros((h - di, w - abs(dj)))
        for ki in (-1, 0, 1):
            for kj in (-1, 0, 1):
                p = pad[2 + ki : 2 + ki + h - di, 2 + kj + cols.start : 2 + kj + cols.stop]
                q = pad[
                    2 + ki + di : 2 + ki + di + h - di,
                    2 + kj + dj + cols.start : 2 + kj + dj + cols.stop,
                ]
                diff += np.abs(p - q)
        cost = np.sqrt(diff * diff + (abs(di) + abs(dj)) * weight * weight)
        yield (di, dj), rows, cols, cost


def propagate(
    image: np.ndarray, seeds: np.ndarray, mask: np.ndarray, regularization: float = 0.05
) -> np.ndarray:
    """Grow labelled ``seeds`` through ``mask`` by shortest propagation length (module docs).

    Every mask pixel connected to a seed takes the label of the seed nearest along the image
    manifold; seed pixels keep their label even outside the mask, but only those inside it
    spread (as in CellProfiler); mask pixels that no seed reaches stay 0.
    """
    image = np.asarray(image, dtype=np.float64)
    seeds = np.asarray(seeds)
    h, w = image.shape
    nodes = np.asarray(mask, bool)
    n = int(nodes.sum())
    out = np.where(seeds > 0, seeds, 0).astype(np.int32)
    if n == 0 or not (nodes & (seeds > 0)).any():
        return out
    index = np.full((h, w), -1, np.int32 if n < 2**31 else np.int64)
    index[nodes] = np.arange(n)
    src, dst, length = [], [], []
    for (di, dj), rows, cols, cost in _step_costs(image, regularization):
        a = index[rows, cols]
        b = index[rows.start + di : rows.stop + di, cols.start + dj : cols.stop + dj]
        both = (a >= 0) & (b >= 0)
        src.append(a[both])
        dst.append(b[both])
        # a zero length would make csgraph drop the edge; lengths are > 0 unless lambda is 0
        length.append(np.maximum(cost[both], 1e-12))
    graph = sparse.csr_matrix(
        (np.concatenate(length), (np.concatenate(src), np.concatenate(dst))), shape=(n, n)
    )
    starts = index[nodes & (seeds > 0)]
    _, _, sources = csgraph.dijkstra(
        graph, directed=False, indices=starts, min_only=True, return_predecessors=True
    )
    node_labels = np.zeros(n, np.int32)
    reached = sources >= 0
    node_labels[reached] = seeds[nodes][sources[reached]]
    out[nodes] = node_labels
    out[seeds > 0] = seeds[seeds > 0]
    return out


@dataclass(frozen=True)
class NucleusSizes:
    """Size limits as equivalent diameters in pixels, and the typical diameter they came from."""

    min_diameter: float
    max_diameter: float
    typical: float

    @property
    def min_area(self) -> float:
        return np.pi * self.min_diameter**2 / 4

    @property
    def max_area(self) -> float:
        return np.pi * self.max_diameter**2 / 4


def typical_diameter(labels: np.ndarray) -> float:
    """The typical nucleus diameter: an area-weighted median of each object's inscribed diameter.

    The inscribed diameter (twice the largest distance to the object's border) of a clump of
    touching nuclei is that of one nucleus, so clumps found before declumping do not inflate it;
    weighting by area makes many small specks of debris count for little. It follows the
    magnification, so limits derived from it suit 20x and 40x images alike.
    """
    if not labels.any():
        return 0.0
    dist = ndi.distance_transform_edt(labels > 0)
    ids = np.arange(1, int(labels.max()) + 1)
    inscribed = 2 * np.asarray(ndi.maximum(dist, labels, ids))
    areas = np.bincount(labels.ravel(), minlength=ids.size + 1)[1:]
    present = areas > 0
    inscribed, areas = inscribed[present], areas[present]
    order = np.argsort(inscribed)
    cum = np.cumsum(areas[order])
    return float(inscribed[order][np.searchsorted(cum, cum[-1] / 2)])


def nucleus_sizes(labels, min_diameter=None, max_diameter=None) -> NucleusSizes:
    """The size limits: given values, else 0.4 and 3 times the typical diameter.

    CellProfiler asks for the typical diameter range in pixels (JUMP 15-90 at 20x, NF1 30-90);
    relative limits keep debris and unsplit clumps out at any magnification. The lower limit is
    at least 4 px.
    """
    typical = typical_diameter(labels)
    lo = min_diameter if min_diameter is not None else max(4.0, 0.4 * typical)
    hi = max_diameter if max_diameter is not None else max(3.0 * typical, 2 * lo)
    return NucleusSizes(float(lo), float(hi), typical)


def split_touching(labels: np.ndarray, typical: float) -> np.ndarray:
    """Split touching nuclei by shape: a watershed on the distance transform from its h-maxima.

    ``h`` grows with the typical radius (one tenth of it, at least 1.5 px), so a dent in one
    large nucleus at 40x is not taken for the neck between two. Each object is split on its own
    crop (much faster than the whole image); objects too small to have a marker stay whole.
    """
    if not labels.any():
        return labels
    h = max(1.5, 0.05 * typical)
    out = np.zeros(labels.shape, np.int32)
    next_id = 1
    for index, window in enumerate(ndi.find_objects(labels), start=1):
        if window is None:
            continue
        grown = tuple(
            slice(max(0, w.start - 2), min(n, w.stop + 2))
            for w, n in zip(window, labels.shape, strict=True)
        )
        mask = labels[grown] == index
        dist = ndi.gaussian_filter(ndi.distance_transform_edt(mask), 1.0)
        markers, count = ndi.label(morphology.h_maxima(dist, h) & mask)
        if count > 1:
            pieces = segmentation.watershed(-dist, markers, mask=mask)
            pieces[mask & (pieces == 0)] = 1
        else:
            pieces, count = mask.astype(np.int32), 1
        target = out[grown]
        target[mask] = pieces[mask] + next_id - 1
        next_id += count
    return out


@dataclass
class Nuclei:
    """Labelled nuclei and the ids that grow cells but are dropped from the result."""

    labels: np.ndarray
    dropped: np.ndarray  # bool per id (index 0 unused)
    sizes: NucleusSizes


def find_nuclei(
    dna: np.ndarray,
    *,
    method: str = "mce",
    log: bool = False,
    factor: float = 1.0,
    sigma: float = 1.0,
    declump: bool = True,
    min_diameter: float | None = None,
    max_diameter: float | None = None,
    drop_edge: bool = False,
    noise_floor: float = 4.0,
) -> Nuclei:
    """Threshold, fill, split and size-filter nuclei (module docs).

    Objects below the lower limit are debris and are removed outright, unless they touch the
    image edge (the visible sliver of a nucleus); those, objects above the upper limit, and with
    ``drop_edge`` all objects touching the edge, are kept as seeds but marked ``dropped``, so
    that their cell keeps its ground and is removed afterwards (as CellProfiler does).
    """
    dna = np.asarray(dna, dtype=np.float64)
    empty = np.zeros(dna.shape, np.int32)
    if float(dna.max()) <= float(dna.min()):
        return Nuclei(empty, np.zeros(1, bool), NucleusSizes(0.0, 0.0, 0.0))
    mask = ndi.binary_fill_holes(
        foreground(dna, method, log=log, factor=factor, sigma=sigma, noise_floor=noise_floor)
    )
    labels = measure.label(mask)
    sizes = nucleus_sizes(labels, min_diameter, max_diameter)
    if declump:
        labels = split_touching(labels, sizes.typical)
    labels = fill_label_holes(labels)
    areas = np.bincount(labels.ravel())
    small = areas < sizes.min_area
    small[0] = False
    edge = np.zeros(areas.size, bool)
    edge[touching_edge(labels)] = True
    labels = np.where(small[labels] & ~edge[labels], 0, labels)
    labels, forward, _ = segmentation.relabel_sequential(labels)
    areas = np.bincount(labels.ravel())
    dropped = areas > sizes.max_area
    dropped[forward[np.flatnonzero(small & edge)]] = True  # a sliver of a nucleus cut by the edge
    dropped[0] = False
    if drop_edge:
        dropped[touching_edge(labels)] = True
    return Nuclei(labels.astype(np.int32), dropped, sizes)


def cell_channels(
    image: np.ndarray, channel_names: Sequence[str], nuclear: int, cell: Sequence[int] | None
) -> list[int]:
    """The channels whose foreground makes the cells: ``cell``, else every fluorescent one.

    Without a choice: every channel but the nuclear one, leaving out transmitted light (by name,
    or by its grey histogram, :func:`looks_transmitted`).
    """
    if cell is not None:
        return list(cell)
    lowered = [str(c).lower() for c in channel_names]
    return [
        i
        for i in range(image.shape[0])
        if i != nuclear and lowered[i] not in TRANSMITTED_NAMES and not looks_transmitted(image[i])
    ]


#: A stain's mask "covers most of a sparse site" above this share of the site ...
FLOOD_SHARE = 0.5
#: ... when the nuclei cover less than this share of the site.
SPARSE_NUCLEI = 0.05
#: A stain "follows the nuclei" when its mask covers at least this share of the nuclei and the
#: ring around them (half a typical nucleus diameter wide) ...
NEAR_SHARE = 0.1
#: ... and covers the ground far from every nucleus (over two diameters away) less densely
#: than this share of its coverage of the nuclei and their ring.
FAR_RATIO = 0.8


def judge_stain(mask: np.ndarray, nuclei: np.ndarray, typical: float) -> tuple[str | None, dict]:
    """Why a stain's foreground ``mask`` should be left out of the cells, or None; and the
    measurements (share of the site, of the ring around the nuclei, of the ground far from them).

    A cell stain's foreground holds the nuclei's surroundings and thins out away from them. A
    mask of the background's noise covers both alike (or most of a site whose nuclei are few);
    an empty stain covers neither.
    """
    mask = np.asarray(mask, bool)
    found = nuclei > 0
    share = float(mask.mean())
    measured = {"share": share, "near": float("nan"), "far": float("nan")}
    if not found.any():
        return None, measured  # nothing to judge by; no cells grow anyway
    dist = ndi.distance_transform_edt(~found)
    d = max(typical, 4.0)
    ring = dist <= d / 2
    far = dist > 2 * d
    near = float(mask[ring].mean()) if ring.any() else float("nan")
    measured["near"] = near
    if far.mean() > 0.02:
        measured["far"] = float(mask[far].mean())
    if share > FLOOD_SHARE and found.mean() < SPARSE_NUCLEI:
        return (
            f"its foreground covers {share:.0%} of a sparse site (nuclei {found.mean():.1%})",
            measured,
        )
    if near == near and near < NEAR_SHARE:
        return (
            f"its foreground covers only {near:.0%} of the nuclei and their surroundings",
            measured,
        )
    far_share = measured["far"]
    if far_share == far_share and near == near and far_share > FAR_RATIO * near:
        return (
            f"its foreground does not follow the nuclei (covers {far_share:.0%} of the ground far "
            f"from them, {near:.0%} around them)",
            measured,
        )
    return None, measured


def cell_foreground(
    image: np.ndarray,
    channels: Sequence[int],
    nuclei: Nuclei,
    *,
    method: str = "background",
    log: bool = True,
    factor: float = 1.0,
    sigma: float = 1.0,
    noise_floor: float = 4.0,
    fraction: float = 0.15,
    judge: bool = True,
    channel_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, list[int]]:
    """The union of the cell stains' masks, each judged first (:func:`judge_stain`), and the
    channels used. A stain left out is named in a :class:`StainWarning`."""
    mask = np.zeros(nuclei.labels.shape, bool)
    used = []
    for c in channels:
        own = foreground(
            image[c],
            method,
            log=log,
            factor=factor,
            sigma=sigma,
            noise_floor=noise_floor,
            fraction=fraction,
        )
        if judge:
            reason, _ = judge_stain(own, nuclei.labels, nuclei.sizes.typical)
            if reason is not None:
                name = channel_names[c] if channel_names is not None else f"channel {c}"
                warnings.warn(
                    f"stain {name!r} left out of the cell foreground: {reason}",
                    StainWarning,
                    stacklevel=2,
                )
                continue
        mask |= own
        used.append(c)
    return mask, used


#: Where a stain's reach is measured (:func:`stain_reach`): its level in the cell foreground
#: within this share of a typical nucleus diameter of a nucleus ...
REACH_NEAR = 0.25
#: ... against its level beyond this share of a diameter from every nucleus.
REACH_FAR = 0.5


def reach_regions(nuclei: Nuclei, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Where reach is measured (:func:`stain_reach`): the foreground ``mask`` within a quarter
    of a typical nucleus diameter of a nucleus, and beyond half a diameter from every nucleus;
    None where either is empty."""
    if not nuclei.labels.any():
        return None
    d = max(nuclei.sizes.typical, 4.0)
    dist = ndi.distance_transform_edt(nuclei.labels == 0)
    near = mask & (dist > 0) & (dist <= REACH_NEAR * d)
    far = mask & (dist > REACH_FAR * d)
    return (near, far) if near.any() and far.any() else None


def stain_reach(stain: np.ndarray, regions, sigma: float = 1.0) -> float:
    """How far a stain fills its cells: its median level above background far from the nuclei
    over that close around them (``regions``, :func:`reach_regions`), clipped to [0, 1]; NaN
    without regions or signal near the nuclei.

    A whole-cell stain (actin, membrane, a cytoplasmic dye) holds its level out to the cell's
    border (reach near 1); a perinuclear one (ER, RNA, mitochondria, an uneven reporter) fades
    to a fraction of it by the periphery, where it says nothing about the border.
    """
    if regions is None:
        return float("nan")
    near, far = regions
    smoothed = smooth(stain, sigma)
    above = smoothed - background(smoothed).level
    inner = float(np.median(above[near]))
    if inner <= 0:
        return float("nan")
    return float(np.clip(np.median(above[far]) / inner, 0.0, 1.0))


def propagation_weights(
    image: np.ndarray, channels: Sequence[int], nuclei: Nuclei, mask: np.ndarray, sigma=1.0
) -> np.ndarray:
    """Each cell stain's weight in the propagation image: its reach squared (:func:`stain_reach`),
    normalised to sum to 1; equal weights where no stain's reach can be measured.

    Propagation puts a border where the image changes; a stain that fades away from the nucleus
    makes the periphery of a bright cell look like a border and hands it to a dimmer
    neighbour, so the border follows which stains are averaged rather than the cells. Squared,
    a stain that keeps a fifth of its level at the periphery weighs 1/25 of one that fills the
    cell.
    """
    regions = reach_regions(nuclei, mask)
    reach = np.array([stain_reach(image[c], regions, sigma) for c in channels])
    weights = np.where(np.isfinite(reach), reach, 0.0) ** 2
    if weights.sum() <= 0:
        return np.full(len(channels), 1.0 / len(channels))
    return weights / weights.sum()


def propagation_surface(
    image: np.ndarray,
    channels: Sequence[int],
    nuclei: Nuclei,
    mask: np.ndarray,
    rule: str = "reach",
    sigma: float = 1.0,
) -> np.ndarray:
    """The image whose edges propagation follows: the cell stains on a common scale
    (:func:`unit_scale`), weighted by their reach (:func:`propagation_weights`, ``rule``
    "reach") or averaged alike ("mean")."""
    scaled = np.array([unit_scale(image[c]) for c in channels])
    if rule == "mean" or len(channels) == 1:
        return scaled.mean(axis=0)
    if rule != "reach":
        raise ValueError(f"unknown propagation rule {rule!r}; use one of {PROPAGATION_RULES}")
    return np.tensordot(propagation_weights(image, channels, nuclei, mask, sigma), scaled, axes=1)


def grow_cells(
    image: np.ndarray,
    channels: Sequence[int],
    nuclei: Nuclei,
    *,
    regularization: float = 0.05,
    propagation: str = "reach",
    drop_edge: bool = False,
    drop_edge_by: str = "nucleus",
    **foreground,
) -> tuple[np.ndarray, np.ndarray]:
    """(nuclei, cells) with matching ids: nuclei propagated through the cell foreground.

    The foreground is the union of each channel's own threshold (stains differ in brightness
    and in which part of the cell they fill), each judged first (:func:`cell_foreground`); the
    propagation image is the channels kept, on a common scale, weighted by how far each fills
    its cells (``propagation`` "reach", :func:`propagation_surface`) or averaged ("mean");
    ``foreground`` holds :func:`cell_foreground`'s options (method, log, factor, sigma,
    noise_floor, fraction, judge, channel_names), with its defaults. With no channel kept the cells are their nuclei. ``drop_edge``: nuclei touching the edge
    were marked by :func:`find_nuclei`; with ``drop_edge_by="cell"`` cells touching it go too.
    """
    if drop_edge_by not in ("nucleus", "cell"):
        raise ValueError(f"unknown edge rule {drop_edge_by!r}; use nucleus or cell")
    seeds = nuclei.labels
    if channels:
        mask, channels = cell_foreground(image, channels, nuclei, **foreground)
    if not channels:
        cells = seeds.copy()
    else:
        sigma = foreground.get("sigma", 1.0)
        surface = propagation_surface(image, channels, nuclei, mask, propagation, sigma)
        cells = propagate(surface, seeds, mask, regularization)
        cells = fill_label_holes(cells)
    dropped = nuclei.dropped.copy()
    if drop_edge:
        dropped[touching_edge(seeds)] = True
        if drop_edge_by == "cell":
            dropped[touching_edge(cells)] = True
    keep = ~dropped
    keep[0] = False
    lookup = np.zeros(dropped.size, np.int32)
    lookup[keep] = np.arange(1, int(keep.sum()) + 1)
    return lookup[seeds], lookup[cells]


def find_nuclei_with(dna: np.ndarray, settings, *, drop_edge: bool | None = None) -> Nuclei:
    """:func:`find_nuclei` with the nucleus options of a :class:`SegmentSettings`
    (``drop_edge`` overrides the settings' own)."""
    return find_nuclei(
        dna,
        method=settings.nucleus_threshold,
        log=settings.nucleus_log,
        factor=settings.nucleus_threshold_factor,
        sigma=settings.smoothing,
        declump=settings.declump,
        min_diameter=settings.min_diameter,
        max_diameter=settings.max_diameter,
        drop_edge=settings.drop_edge if drop_edge is None else drop_edge,
        noise_floor=settings.noise_floor,
    )


def looks_empty(image: np.ndarray, noise_floor: float = 4.0) -> bool:
    """True for a stain with nothing above its background's noise: the 99.9th percentile of the
    smoothed stain is not above its noise floor (a stain that failed, or a channel that is all
    zero)."""
    s = smooth(image, 1.0)
    if float(s.max()) <= float(s.min()):
        return True
    bg = background(s)
    return float(np.percentile(s, 99.9)) <= bg.floor(noise_floor)


def _warn_empty(image, channel_names, nuclear: int, channels, noise_floor: float) -> None:
    """A StainWarning for each fluorescent channel that the automatic choice left out
    (:func:`cell_channels`: its histogram looked like transmitted light) because it is empty."""
    lowered = [str(c).lower() for c in channel_names]
    for i in range(image.shape[0]):
        if i == nuclear or i in channels or lowered[i] in TRANSMITTED_NAMES:
            continue
        if looks_empty(image[i], noise_floor):
            warnings.warn(
                f"stain {channel_names[i]!r} left out of the cell foreground: it holds nothing "
                "above its background's noise (an empty stain)",
                StainWarning,
                stacklevel=3,
            )


def segment_classical(
    image: np.ndarray, channel_names: Sequence[str], nuclear: int, cell, settings
) -> tuple[np.ndarray, np.ndarray]:
    """Nuclei and cells of one (C, H, W) site with :class:`SegmentSettings` ``settings``."""
    nuclei = find_nuclei_with(image[nuclear], settings)
    channels = cell_channels(image, channel_names, nuclear, cell)
    if cell is None and settings.judge_stains:
        _warn_empty(image, channel_names, nuclear, channels, settings.noise_floor)
    return grow_cells(
        image,
        channels,
        nuclei,
        method=settings.cell_threshold,
        log=settings.cell_log,
        factor=settings.cell_threshold_factor,
        sigma=settings.smoothing,
        regularization=settings.regularization,
        propagation=settings.propagation,
        drop_edge=settings.drop_edge,
        drop_edge_by=settings.drop_edge_by,
        noise_floor=settings.noise_floor,
        fraction=settings.cell_fraction,
        judge=settings.judge_stains,
        channel_names=channel_names,
    )
