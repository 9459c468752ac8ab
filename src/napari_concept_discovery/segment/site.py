"""Nuclei and cell labels of one site.

Three segmenters behind one call (:func:`segment_site`, chosen by
:class:`~napari_concept_discovery.settings.SegmentSettings`): ``classical``, the pipeline
CellProfiler's Cell Painting pipelines run (thresholds chosen per image, nuclei grown into cells
by Propagation; :mod:`.classical`), ``cellpose`` for users who have it
(:mod:`.cellpose`), and ``legacy``, the watershed of version 0.1
(:mod:`.legacy`). Whichever runs, the result is one label per cell with nucleus ``i``
inside cell ``i``: cells are the unit tokens are pooled over.

``plate.segmentation.segment_plate`` runs this on every site of a plate and writes the label
folder that ``open_plate`` and embedding find again. See docs/architecture.md,
"One room per step".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from skimage.segmentation import relabel_sequential

from ..settings import SegmentSettings
from .classical import cell_channels, find_nuclei_with, segment_classical
from .legacy import segment_legacy

#: (image, channel names) -> (nuclei, cells), both int32 with matching ids.
Segmenter = Callable[[np.ndarray, Sequence[str]], tuple[np.ndarray, np.ndarray]]

#: What the NF1 project's pipeline (``NF1_analysis_plate1_plate2.cppipe``) told CellProfiler,
#: in our settings: nuclei by three-class Otsu on DAPI, no declumping, diameters 30-90, border
#: nuclei discarded; cells by Propagation on RFP, three-class Otsu, border cells discarded too
#: (IdentifySecondaryObjects' "discard objects touching the border" is on). The tests and
#: benchmarks/bench_segment.py compare our labels with its masks of the real NF1 sites.
NF1_PIPELINE = SegmentSettings(
    nuclear="DAPI",
    cell="RFP",
    cell_threshold="otsu3",
    cell_log=False,
    nucleus_threshold="otsu3",
    declump=False,
    min_diameter=30,
    max_diameter=90,
    drop_edge=True,
    drop_edge_by="cell",
)


def channel_ref(value: str | int) -> str | int:
    """A channel as a user types it: an index when it is all digits, else a name."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value


def channel_index(channel_names: Sequence[str], name: str | int, role: str) -> int:
    if isinstance(name, int | np.integer):
        if not 0 <= name < len(channel_names):
            raise ValueError(f"{role} channel index {name} out of range for {len(channel_names)}")
        return int(name)
    lowered = [c.lower() for c in channel_names]
    if name.lower() in lowered:
        return lowered.index(name.lower())
    raise ValueError(f"{role} channel {name!r} not among channels {list(channel_names)}")


def cell_refs(cell) -> list[str | int] | None:
    """Channels as a user gives them: None, a name or index, a comma-separated string, a list."""
    if cell is None:
        return None
    if isinstance(cell, str):
        parts = [c.strip() for c in cell.split(",") if c.strip()]
        return [channel_ref(c) for c in parts] or None
    if isinstance(cell, int | np.integer):
        return [int(cell)]
    return [channel_ref(c) for c in cell]


def resolve_settings(settings: SegmentSettings | None, nuclear, cell) -> SegmentSettings:
    """Settings with the explicit ``nuclear``/``cell`` arguments taking precedence."""
    settings = settings if settings is not None else SegmentSettings()
    changes = {}
    if nuclear is not None:
        changes["nuclear"] = str(nuclear)
    if cell is not None:
        refs = cell_refs(cell)
        changes["cell"] = ",".join(str(c) for c in refs) if refs else None
    return settings.replace(**changes) if changes else settings


def make_segmenter(
    settings: SegmentSettings | None = None,
    *,
    nuclear: str | int | None = None,
    cell: str | int | Sequence[str | int] | None = None,
) -> Segmenter:
    """A function (image, channel names) -> (nuclei, cells) for many sites.

    Made once per plate, so that a Cellpose model loads once. Channel names are resolved per
    call; a name the image lacks raises ValueError naming it.
    """
    settings = resolve_settings(settings, nuclear, cell)
    cellpose = None
    if settings.segmenter == "cellpose":
        from .cellpose import CellposeSegmenter

        cellpose = CellposeSegmenter(settings)

    def run(image: np.ndarray, channel_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[0] != len(channel_names):
            raise ValueError(
                f"image must be (C, H, W) with C = {len(channel_names)} channels, got {image.shape}"
            )
        n = channel_index(channel_names, channel_ref(settings.nuclear), "nuclear")
        refs = cell_refs(settings.cell)
        chosen = None if refs is None else [channel_index(channel_names, c, "cell") for c in refs]
        if settings.segmenter == "legacy":
            return segment_legacy(image, channel_names, n, chosen)
        if cellpose is not None:
            return cellpose(image, n, cell_channels(image, channel_names, n, chosen))
        return segment_classical(image, channel_names, n, chosen, settings)

    return run


def quality_channels(settings: SegmentSettings, channel_names: Sequence[str]):
    """A function image -> the cell stains a site's quality is judged on: the settings' cell
    channels, else every fluorescent channel besides the nuclear one."""
    n = channel_index(channel_names, channel_ref(settings.nuclear), "nuclear")
    refs = cell_refs(settings.cell)
    chosen = None if refs is None else [channel_index(channel_names, c, "cell") for c in refs]
    return lambda image: cell_channels(np.asarray(image), channel_names, n, chosen)


def segment_nuclei(dna: np.ndarray, settings: SegmentSettings | None = None) -> np.ndarray:
    """Nuclei of one nuclear-stain image (int32 labels) by the classical pipeline's rules."""
    s = settings if settings is not None else SegmentSettings()
    found = find_nuclei_with(dna, s)
    kept = np.where(found.dropped[found.labels], 0, found.labels)
    return relabel_sequential(kept)[0].astype(np.int32)


def segment_site(
    image: np.ndarray,
    channel_names: Sequence[str],
    nuclear: str | int | None = None,
    cell: str | int | Sequence[str | int] | None = None,
    *,
    settings: SegmentSettings | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Nuclei and cell labels (int32, same ids) of one (C, H, W) site.

    ``nuclear`` and ``cell`` (channel names or indices) override those of ``settings``
    (default :class:`SegmentSettings`: the classical pipeline, nuclear stain "DNA").
    """
    return make_segmenter(settings, nuclear=nuclear, cell=cell)(image, channel_names)


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


def merge_within(pred: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``pred`` with the objects that lie mostly (over half their area) in one connected piece
    of a binary ``reference`` mask merged into one object.

    A binary mask cannot hold two touching objects apart (CellProfiler's ``MaskNuclei`` of a
    pipeline without declumping): matched one to one, two correct nuclei against their one
    merged piece score as one miss and two false objects. Merged first, they score as the
    mask can tell.
    """
    from skimage import measure

    pred = np.asarray(pred)
    pieces = measure.label(np.asarray(reference) > 0)
    n = int(pred.max()) + 1
    both = (pred > 0) & (pieces > 0)
    pairs = pred[both].astype(np.int64) * (int(pieces.max()) + 1) + pieces[both]
    uniq, counts = np.unique(pairs, return_counts=True)
    ids, piece = np.divmod(uniq, int(pieces.max()) + 1)
    area = np.bincount(pred.ravel(), minlength=n)
    best = np.zeros(n, np.int64)  # the piece holding most of each object, if over half
    share = np.zeros(n)
    for i, p, c in zip(ids, piece, counts, strict=True):
        if c > share[i]:
            share[i], best[i] = c, p
    best[share <= 0.5 * area] = 0
    lookup = np.arange(n)
    for p in np.unique(best[best > 0]):
        members = np.flatnonzero(best == p)
        lookup[members] = members.min()
    return lookup[pred].astype(pred.dtype)
