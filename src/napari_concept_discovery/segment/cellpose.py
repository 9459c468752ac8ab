"""Cells from an installed Cellpose, nuclei from ours or from Cellpose, ids matched.

Cellpose is an optional extra (``pip install 'napari-concept-discovery[cellpose]'``), imported
only when asked for. Its cell model sees two planes: the mean of the cell stains (each scaled
to its own percentiles) and the nuclear stain. Cellpose labels cells and nuclei independently,
so :func:`match_ids` pairs them: a nucleus belongs to the cell holding most of it (at least
half), a cell keeps the nucleus it overlaps most, and only pairs are kept, renumbered so that
nucleus ``i`` lies in cell ``i`` as everywhere else. Written against Cellpose's documented API
(``models.CellposeModel(...).eval(x, channel_axis=..., diameter=...)`` returning masks first,
with ``channels=[1, 2]`` before version 4). See docs/architecture.md, "One room per step".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ModelError
from .classical import find_nuclei_with, touching_edge, unit_scale

INSTALL_HINT = "pip install 'napari-concept-discovery[cellpose]' (or: pip install cellpose)"


def _import_cellpose():
    try:
        from cellpose import models
    except ImportError as exc:
        raise ModelError(
            f"--segmenter cellpose needs the cellpose package, which is not installed ({exc}); "
            f"install it with {INSTALL_HINT}, or use --segmenter classical"
        ) from None
    return models


def cellpose_major() -> int:
    """Major version of the installed cellpose (4 when it cannot be told)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return int(version("cellpose").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return 4


def cellpose_model_name(source: str) -> str:
    """``source`` with "auto" made the installed Cellpose's default model (cpsam from version
    4, cyto3 before), so that a store records which model made its cells."""
    if source.strip().lower() != "auto":
        return source
    return "cpsam" if cellpose_major() >= 4 else "cyto3"


def load_cellpose(source: str, device: str | None = None):
    """A ``cellpose.models.CellposeModel`` for a built-in name or a model file.

    A missing package or model is a :class:`ModelError` with what to do about it: without
    network, built-in weights must already be in Cellpose's model folder.
    """
    models = _import_cellpose()
    source = cellpose_model_name(source)
    kwargs: dict = {"gpu": device not in (None, "cpu")}
    if device is not None:
        import torch

        kwargs["device"] = torch.device(device)
    path = Path(source).expanduser()
    if path.exists():
        kwargs["pretrained_model"] = str(path)
    elif any(sep in source for sep in ("/", "\\")) or path.suffix:
        raise ModelError(f"Cellpose model file not found: {path}")
    elif cellpose_major() >= 4:
        kwargs["pretrained_model"] = source
    else:
        kwargs["model_type"] = source
    try:
        return models.CellposeModel(**kwargs)
    except Exception as exc:  # cellpose raises many kinds when weights cannot be had
        raise ModelError(
            f"cannot load the Cellpose model {source!r}: {type(exc).__name__}: {exc}. Built-in "
            "weights are downloaded on first use; offline, copy them into ~/.cellpose/models "
            "(or $CELLPOSE_LOCAL_MODELS_PATH) or give a model file (--cellpose-model PATH)"
        ) from exc


def run_cellpose(
    model,
    planes: list[np.ndarray],
    diameter: float | None,
    major: int,
    cellprob: float = 0.0,
    flow: float = 0.4,
):
    """Labels (H, W) int32 of one image from ``model.eval`` on ``planes`` stacked last.

    ``cellprob`` and ``flow`` are Cellpose's ``cellprob_threshold`` and ``flow_threshold``.
    """
    x = np.stack([unit_scale(p).astype(np.float32) for p in planes], axis=-1)
    kwargs: dict = {
        "diameter": diameter,
        "channel_axis": -1,
        "cellprob_threshold": cellprob,
        "flow_threshold": flow,
    }
    if major < 4:  # [plane to segment, nuclear plane]: 1-based, or [0, 0] for one grey plane
        kwargs["channels"] = [1, 2] if len(planes) == 2 else [0, 0]
    result = model.eval(x, **kwargs)
    masks = np.asarray(result[0] if isinstance(result, tuple | list) else result)
    masks = np.squeeze(masks)
    if masks.shape != x.shape[:2]:
        raise ModelError(
            f"Cellpose returned masks of shape {masks.shape} for an image of {x.shape[:2]}"
        )
    if masks.dtype.kind not in "iu" or (masks.size and masks.min() < 0):
        raise ModelError(f"Cellpose returned masks of type {masks.dtype}, not labels")
    return masks.astype(np.int32)


def match_ids(cells: np.ndarray, nuclei: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nuclei, cells) relabelled 1..K so that nucleus ``k`` lies in cell ``k`` (module docs).

    Cells without a nucleus, nuclei outside every cell (less than half inside one) and the
    smaller extra nuclei of a cell are dropped; a kept nucleus is clipped to its cell.
    """
    cells = np.asarray(cells)
    nuclei = np.asarray(nuclei)
    if cells.shape != nuclei.shape:
        raise ValueError(f"cells {cells.shape} and nuclei {nuclei.shape} differ in shape")
    out_c = np.zeros(cells.shape, np.int32)
    out_n = np.zeros(cells.shape, np.int32)
    both = (cells > 0) & (nuclei > 0)
    if not both.any():
        return out_n, out_c
    c_ids, n_ids = cells[both].astype(np.int64), nuclei[both].astype(np.int64)
    pairs, overlap = np.unique(np.stack([n_ids, c_ids]), axis=1, return_counts=True)
    n_area = np.bincount(nuclei.ravel().astype(np.int64))
    # each nucleus: the cell holding most of it, if that is at least half of the nucleus
    order = np.lexsort((-overlap, pairs[0]))
    pairs, overlap = pairs[:, order], overlap[order]
    first = np.r_[True, pairs[0, 1:] != pairs[0, :-1]]
    pairs, overlap = pairs[:, first], overlap[first]
    inside = 2 * overlap >= n_area[pairs[0]]
    pairs, overlap = pairs[:, inside], overlap[inside]
    if not pairs.size:  # no nucleus lies (at least half) in a cell
        return out_n, out_c
    # each cell: the nucleus it overlaps most
    order = np.lexsort((-overlap, pairs[1]))
    pairs = pairs[:, order]
    first = np.r_[True, pairs[1, 1:] != pairs[1, :-1]]
    nucleus_of, cell_of = pairs[0, first], pairs[1, first]
    new = np.arange(1, cell_of.size + 1, dtype=np.int32)
    cell_lookup = np.zeros(int(cells.max()) + 1, np.int32)
    cell_lookup[cell_of] = new
    out_c = cell_lookup[cells]
    nucleus_lookup = np.zeros(int(nuclei.max()) + 1, np.int32)
    nucleus_lookup[nucleus_of] = new
    out_n = nucleus_lookup[nuclei]
    out_n[out_n != out_c] = 0  # clip each nucleus to its own cell
    return out_n, out_c


class CellposeSegmenter:
    """Loads the Cellpose model(s) once, then segments site after site.

    ``cell_model`` and ``nucleus_model`` take models already built (anything with Cellpose's
    ``eval``); by default they are loaded from the settings.
    """

    def __init__(self, settings, *, cell_model=None, nucleus_model=None, major=None):
        self.settings = settings
        self.major = cellpose_major() if major is None else major
        self.cell_model = cell_model
        if cell_model is None:
            self.cell_model = load_cellpose(settings.cellpose_model, settings.device)
        nuclei = settings.cellpose_nuclei.strip()
        self.nucleus_model = nucleus_model
        if nucleus_model is None and nuclei != "classical":
            self.nucleus_model = load_cellpose(nuclei, settings.device)

    def __call__(self, image: np.ndarray, nuclear: int, channels: list[int]):
        s = self.settings
        dna = image[nuclear]
        if self.nucleus_model is None:
            found = find_nuclei_with(dna, s, drop_edge=False)
            nuclei = np.where(found.dropped[found.labels], 0, found.labels)
        else:
            nuclei = run_cellpose(
                self.nucleus_model, [dna], None, self.major, s.cellpose_cellprob, s.cellpose_flow
            )
        if channels:
            cell_plane = np.mean([unit_scale(image[c]) for c in channels], axis=0)
            cells = run_cellpose(
                self.cell_model,
                [cell_plane, dna],
                s.cellpose_diameter,
                self.major,
                s.cellpose_cellprob,
                s.cellpose_flow,
            )
        else:
            cells = nuclei.copy()
        nuclei, cells = match_ids(cells, nuclei)
        if s.drop_edge:
            # the rule of the classical segmenter: by the nucleus, or by the cell when asked
            edge = touching_edge(cells if s.drop_edge_by == "cell" else nuclei)
            gone = np.isin(cells, edge)
            nuclei, cells = match_ids(np.where(gone, 0, cells), np.where(gone, 0, nuclei))
        return nuclei, cells
