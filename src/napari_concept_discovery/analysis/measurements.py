"""Handcrafted per-cell measurements in CellProfiler's vocabulary, and feature descriptions
built from them.

A dictionary feature is easier to name when one can say which classical measurements follow
it: "Mito: granularity up (0.78), texture contrast up (0.61)". This module measures every cell
of a store per stain and compartment (cells, nuclei, cytoplasm) from the plate's images and
the store's own cell labels, caches the table beside the store (rebuilt, never trusted, when
the store's cells change), and ranks the measurements by their Spearman correlation with each
feature's activation over cells (:func:`describe_features`). The concept benchmark reads the
same table (:func:`store_measurements`).

Why not cp-measure: the design names ``cp-measure`` (CellProfiler's measurements as functions),
but its releases that run on NumPy 2 need ``centrosome>=1.3.4``, which pins ``pillow<12``,
while this project pins pillow 13. The measurements here are computed with NumPy/SciPy in
CellProfiler's naming (``<Compartment>_<Module>_<Measure>_<stain>``) and definitions where they
are simple (mean, standard deviation and integrated intensity, area), and by stated proxies where
CellProfiler's are not: ``Texture_Contrast`` is the mean squared difference of neighbouring
pixels inside the object (Haralick contrast at distance 1 without grey-level binning, averaged
over the horizontal and vertical directions) and ``Granularity_2`` the share of the object's
signal removed by a grey opening with a radius-2 disk (the first elements of CellProfiler's
granularity spectrum). ``measure_site`` is the one function to swap for cp-measure's when the
pins allow.

Nuclei: the store keeps cell labels only, so each cell's nucleus is its pixels above one Otsu
threshold of the nuclear stain over the site's cells (the DNA channel, by name); cytoplasm is the
rest of the cell. Without a nuclear stain only the ``Cells`` compartment is measured.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from .._files import atomic_path
from ..errors import DataWarning, StoreError
from ..progress import Cancel, Cancelled, ProgressCallback, is_cancelled, report

#: Bump when a measurement changes: cached tables of another version are rebuilt.
VERSION = 1
#: Cells sampled (fixed seed) for the correlations; Spearman over 5,000 cells has a standard
#: error under 0.015, far below the differences a description ranks by.
MAX_CELLS = 5000
#: Measurements named per feature.
N_TOP = 3
#: Correlations weaker than this are not worth a description.
MIN_CORRELATION = 0.2
KEYS = ("plate", "well", "site", "label")

#: How a measurement reads in a description.
WORDS = {
    "Intensity_MeanIntensity": "intensity",
    "Intensity_StdIntensity": "intensity spread",
    "Intensity_IntegratedIntensity": "total intensity",
    "Texture_Contrast": "texture contrast",
    "Granularity_2": "granularity",
    "AreaShape_Area": "area",
}
COMPARTMENT_WORDS = {"Cells": "", "Nuclei": "nuclear ", "Cytoplasm": "cytoplasmic "}


def cache_path(store) -> Path:
    """``<store>.measurements.parquet`` beside the store folder."""
    p = Path(store.path)
    return p.with_name(p.name + ".measurements.parquet")


def _nuclear(channel_names: Sequence[str]) -> int | None:
    from ..plate.label_images import NUCLEAR_NAMES

    for i, name in enumerate(channel_names):
        if str(name).lower() in NUCLEAR_NAMES:
            return i
    return None


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    values = values[np.isfinite(values)]
    if values.size < 2 or values.min() == values.max():
        return float("inf")
    return float(threshold_otsu(values))


def measure_site(
    image: np.ndarray, cells: np.ndarray, channel_names: Sequence[str]
) -> pd.DataFrame:
    """One row per cell label of ``cells`` (H, W): ``label`` and the measurements of every
    stain of ``image`` (C, H, W) in each compartment (see the module docstring)."""
    from skimage.morphology import disk

    image = np.asarray(image, dtype=np.float32)
    cells = np.asarray(cells)
    labels = np.unique(cells[cells > 0]).astype(np.int64)
    out: dict[str, np.ndarray] = {"label": labels}
    if not labels.size:
        return pd.DataFrame(out)
    top = float(np.max(image)) if image.size else 1.0
    image = image / (top if top > 0 else 1.0)  # one scale for the site: texture is comparable
    nuc = _nuclear(channel_names)
    inside = np.flatnonzero(cells.ravel() > 0)
    cell_of = cells.ravel()[inside].astype(np.int64)
    nuclear = np.zeros(cells.shape, bool)
    if nuc is not None:
        nuclear = (cells > 0) & (image[nuc] > _otsu(image[nuc][cells > 0]))
    # one pass per stain and sum: pixels keyed by (cell, in its nucleus or not); the cell is the
    # sum of its nucleus and its cytoplasm
    n = int(labels.max()) + 1
    key = cell_of * 2 + nuclear.ravel()[inside]

    def parts(weights) -> np.ndarray:  # (cells, 2): cytoplasm, nucleus
        return np.bincount(key, weights=weights, minlength=2 * n).reshape(n, 2)[labels]

    pairs = _same_pairs(cells, nuclear)
    area = parts(None).astype(np.float64)
    comps = {"Cells": (0, 1)}
    if nuc is not None:
        comps.update(Nuclei=(1,), Cytoplasm=(0,))
    sizes = {comp: area[:, list(cols)].sum(1) for comp, cols in comps.items()}
    for comp in comps:
        out[f"{comp}_AreaShape_Area"] = sizes[comp]
    for c, name in enumerate(channel_names):
        plane = image[c]
        values = plane.ravel()[inside].astype(np.float64)
        total, sq = parts(values), parts(values**2)
        removed = plane - ndi.grey_opening(plane, footprint=disk(2))
        granular = parts(removed.ravel()[inside].astype(np.float64))
        contrast_sum, contrast_n = _contrast(plane, pairs, n, labels)
        for comp, cols in comps.items():
            cols = list(cols)
            safe = np.maximum(sizes[comp], 1.0)
            t = total[:, cols].sum(1)
            mean = t / safe
            out[f"{comp}_Intensity_MeanIntensity_{name}"] = mean
            out[f"{comp}_Intensity_StdIntensity_{name}"] = np.sqrt(
                np.maximum(sq[:, cols].sum(1) / safe - mean**2, 0.0)
            )
            out[f"{comp}_Intensity_IntegratedIntensity_{name}"] = t
            # pairs: 0 both in the cytoplasm, 1 across the nuclear edge, 2 both in the nucleus
            cats = {"Cells": [0, 1, 2], "Nuclei": [2], "Cytoplasm": [0]}[comp]
            out[f"{comp}_Texture_Contrast_{name}"] = contrast_sum[:, cats].sum(1) / np.maximum(
                contrast_n[:, cats].sum(1), 1.0
            )
            out[f"{comp}_Granularity_2_{name}"] = granular[:, cols].sum(1) / np.where(t > 0, t, 1.0)
    frame = pd.DataFrame(out)
    # measurements of an empty compartment (a cell without a nucleus) are not zeros: NaN
    for comp in comps:
        gone = frame[f"{comp}_AreaShape_Area"].to_numpy() == 0
        if gone.any():
            cols = [c for c in frame.columns if c.startswith(comp + "_") and "AreaShape" not in c]
            frame.loc[gone, cols] = np.nan
    return frame


def _same_pairs(cells: np.ndarray, nuclear: np.ndarray):
    """Horizontal and vertical neighbour pairs inside one cell: per direction the flat indices
    of both pixels and a key ``cell * 3 + number of the two in the nucleus``."""
    out = []
    h, w = cells.shape
    flat = np.arange(h * w).reshape(h, w)
    for a, b in (
        ((slice(None), slice(0, -1)), (slice(None), slice(1, None))),
        ((slice(0, -1), slice(None)), (slice(1, None), slice(None))),
    ):
        la, lb = cells[a], cells[b]
        ok = (la == lb) & (la > 0)
        ia, ib = flat[a][ok], flat[b][ok]
        key = la[ok].astype(np.int64) * 3 + nuclear[a][ok] + nuclear[b][ok]
        out.append((ia, ib, key))
    return out


def _contrast(plane: np.ndarray, pairs, n: int, labels: np.ndarray):
    """Sums of squared neighbour differences and pair counts, (cells, 3) each: pairs in the
    cytoplasm, across the nuclear edge, in the nucleus."""
    total = np.zeros(3 * n)
    count = np.zeros(3 * n)
    values = plane.ravel().astype(np.float64)
    for ia, ib, key in pairs:
        total += np.bincount(key, weights=(values[ia] - values[ib]) ** 2, minlength=3 * n)
        count += np.bincount(key, minlength=3 * n)
    return total.reshape(n, 3)[labels], count.reshape(n, 3)[labels]


def _signature(store) -> str:
    """What the cached table depends on: the store's cells, sites and plate, and the version."""
    table = store.table("cell")
    cols = [c for c in (*KEYS, "area", "centroid_y", "centroid_x") if c in table.columns]
    h = hashlib.sha256()
    h.update(pd.util.hash_pandas_object(table[cols], index=False).to_numpy().tobytes())
    h.update(
        pd.util.hash_pandas_object(store.sites().astype(str), index=False).to_numpy().tobytes()
    )
    h.update(json.dumps(dict(store.plate_source), sort_keys=True, default=str).encode())
    h.update(f"measurements:{VERSION}".encode())
    return h.hexdigest()


def _read_cached(path: Path, signature: str) -> pd.DataFrame | None:
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception:
        meta = {}
    if meta.get(b"concept_discovery_measurements") is None:
        raise StoreError(
            f"{path} is in the way of the store's measurements cache and was not written by "
            "concept-discovery; move it away"
        )
    if meta[b"concept_discovery_measurements"].decode() != signature:
        return None
    return pd.read_parquet(path)


def _write_cached(frame: pd.DataFrame, path: Path, signature: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pa.Table.from_pandas(frame, preserve_index=False)
    meta = dict(t.schema.metadata or {})
    meta[b"concept_discovery_measurements"] = signature.encode()
    with atomic_path(path) as tmp:
        pq.write_table(t.replace_schema_metadata(meta), tmp)


def store_measurements(
    store,
    plate=None,
    *,
    cache: bool = True,
    progress: ProgressCallback = None,
    cancel: Cancel = None,
) -> pd.DataFrame:
    """Measurements of every cell of ``store``, in the order of ``store.table("cell")``.

    Columns: plate, well, site, label, then the measurements. ``plate`` defaults to the plate
    the store was embedded from. With ``cache``, the table is read from
    :func:`cache_path` when its signature (the store's cells, sites, plate and :data:`VERSION`)
    matches, else measured again and written there. Sites without a label image give NaN rows.
    """
    path = cache_path(store)
    signature = _signature(store)
    if cache and path.exists():
        cached = _read_cached(path, signature)
        if cached is not None:
            return cached
    if plate is None:
        from ..embed.plate import reopen_plate

        plate = reopen_plate(store)
    table = store.table("cell")
    names = list(plate.channel_names)
    parts = []
    sites = store.sites()
    for i, (p, w, s) in enumerate(zip(sites.plate, sites.well, sites.site, strict=True)):
        if is_cancelled(cancel):
            raise Cancelled(f"measurements cancelled after {i} of {len(sites)} sites")
        key = (str(p), str(w), int(s))
        if not store.has_site_labels(key):
            continue
        m = measure_site(plate[key].read(), store.site_labels(key), names)
        m.insert(0, "site", key[2])
        m.insert(0, "well", key[1])
        m.insert(0, "plate", key[0])
        parts.append(m)
        report(progress, "measure", i + 1, len(sites))
    keys = table[list(KEYS)].copy()
    keys["plate"], keys["well"] = keys["plate"].astype(str), keys["well"].astype(str)
    keys["site"], keys["label"] = keys["site"].astype(np.int64), keys["label"].astype(np.int64)
    measured = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(KEYS))
    out = keys.merge(measured, on=list(KEYS), how="left")
    if cache:
        _write_cached(out, path, signature)
    return out


def _ranks(x: np.ndarray) -> np.ndarray:
    """Column-wise average ranks (ties share their mean rank); NaN stays NaN."""
    from scipy.stats import rankdata

    return rankdata(x, axis=0, nan_policy="omit").astype(np.float64)


def feature_correlations(
    codes, measurements: pd.DataFrame, *, max_cells: int = MAX_CELLS, seed: int = 0
) -> pd.DataFrame:
    """Spearman correlation of every feature's activation (0 where inactive) with every
    measurement over the cells (a fixed sample of ``max_cells``): features x measurements."""
    import scipy.sparse as sp

    cols = [c for c in measurements.columns if c not in KEYS]
    values = measurements[cols].to_numpy(np.float64)
    csr = sp.csr_matrix(codes)
    n = csr.shape[0]
    rows = np.arange(n)
    if n > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(n, max_cells, replace=False))
    ok = np.isfinite(values[rows]).all(axis=1)
    if not ok.any():  # fall back to columns that are complete (e.g. cells without nuclei)
        ok = np.ones(len(rows), bool)
    rows = rows[ok]
    x = _ranks(csr[rows].toarray().astype(np.float64))
    y = values[rows]
    y = np.where(np.isfinite(y), y, np.nanmedian(y, axis=0, keepdims=True))
    y = _ranks(y)
    x -= x.mean(0)
    y -= y.mean(0)
    sx, sy = np.sqrt((x**2).sum(0)), np.sqrt((y**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (x.T @ y) / np.outer(sx, sy)
    r[~np.isfinite(r)] = 0.0
    return pd.DataFrame(r, columns=cols)


def _phrase(measurement: str, r: float) -> tuple[str, str]:
    """(stain, words) of one measurement, e.g. ("Mito", "granularity up (0.78)")."""
    comp, _, rest = measurement.partition("_")
    stain = ""
    what = rest
    for key in WORDS:
        if rest == key:
            what = key
            break
        if rest.startswith(key + "_"):
            what, stain = key, rest[len(key) + 1 :]
            break
    words = COMPARTMENT_WORDS.get(comp, comp.lower() + " ") + WORDS.get(what, what)
    return stain or "shape", f"{words} {'up' if r > 0 else 'down'} ({abs(r):.2f})"


def describe(row: pd.Series, n_top: int = N_TOP, min_r: float = MIN_CORRELATION):
    """A phrase for one feature from its correlations (a row of :func:`feature_correlations`),
    the measurements named and their correlations."""
    order = np.argsort(-np.abs(row.to_numpy()), kind="stable")
    picked = [i for i in order[:n_top] if abs(row.iloc[i]) >= min_r]
    names = [row.index[i] for i in picked]
    values = [float(row.iloc[i]) for i in picked]
    by_stain: dict[str, list[str]] = {}
    for name, r in zip(names, values, strict=True):
        stain, words = _phrase(name, r)
        by_stain.setdefault(stain, []).append(words)
    text = "; ".join(f"{s}: {', '.join(w)}" for s, w in by_stain.items())
    return text, names, values


def describe_features(
    codes,
    measurements: pd.DataFrame,
    *,
    n_top: int = N_TOP,
    max_cells: int = MAX_CELLS,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per feature: ``description`` (e.g. "Mito: granularity up (0.78), texture
    contrast up (0.61)"; empty when nothing correlates above :data:`MIN_CORRELATION`),
    ``top_measurements`` and ``top_correlations`` (signed Spearman), strongest first."""
    corr = feature_correlations(codes, measurements, max_cells=max_cells, seed=seed)
    rows = [describe(corr.iloc[f], n_top) for f in range(len(corr))]
    return pd.DataFrame(
        {
            "feature": np.arange(len(corr)),
            "description": [r[0] for r in rows],
            "top_measurements": [list(r[1]) for r in rows],
            "top_correlations": [list(r[2]) for r in rows],
        }
    )


def describe_store(store, codes, *, plate=None, progress=None, cancel=None) -> pd.DataFrame | None:
    """:func:`describe_features` on the store's cached measurements; None (with a
    ``DataWarning`` naming why) when the plate's images cannot be read."""
    try:
        meas = store_measurements(store, plate, progress=progress, cancel=cancel)
    except (StoreError, OSError) as exc:
        warnings.warn(f"no feature descriptions: {exc}", DataWarning, stacklevel=2)
        return None
    return describe_features(codes, meas)


__all__ = [
    "cache_path",
    "describe_features",
    "describe_store",
    "feature_correlations",
    "measure_site",
    "store_measurements",
]
