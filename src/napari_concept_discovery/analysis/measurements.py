"""CellProfiler's per-cell measurements (computed with ``cp-measure``), and feature
descriptions built from them.

A dictionary feature is easier to name when one can say which classical measurements follow
it: "Mito: granularity 2 up (0.78), texture contrast up (0.61)". This module measures every
cell of a store per stain and compartment (cells, nuclei, cytoplasm) from the plate's images
and the store's own cell labels with cp-measure's per-object featurizers (CellProfiler's
MeasureObjectIntensity, MeasureTexture, MeasureGranularity, MeasureObjectSizeShape and
MeasureObjectIntensityDistribution as functions), names the columns as CellProfiler does
(``Cells_Texture_Contrast_Mito_3_00_256``, ``Nuclei_Intensity_MeanIntensity_DNA``,
``Cells_RadialDistribution_FracAtD_RNA_1of4``, ``Cytoplasm_AreaShape_Area``), caches the table
beside the store (rebuilt, never trusted, when the store's cells, image or label bytes, or
:data:`VERSION` change),
and ranks the measurements by their Spearman correlation with each feature's activation over
cells (:func:`describe_features`). The concept benchmark's handcrafted anchor reads the same
table (:func:`store_measurements`).

What is measured (a curated subset of each module's output, so that a 100k-cell store's table
stays a few hundred MB): per stain, in each compartment, six intensity statistics, five
Haralick features in CellProfiler's four directions at scale 3 with 256 grey levels, and
the first :data:`GRANULARITY_STEPS` steps of the granularity spectrum; per stain, in cells
only, the radial distribution in 4 rings; per compartment, ten size and shape measures.
Intensities are on the image type's scale (8-bit / 255, 16-bit / 65535, as CellProfiler reads
them), so sites are comparable.

Granularity (CellProfiler's defaults: a quarter of the resolution, background element radius
10) is an image-wide computation with per-object means at the end, so it runs once per stain
on nuclei and cytoplasm together; a cell's spectrum follows from its two parts' (each step is
a drop of the object's mean over its starting mean, and a cell's mean is its parts' weighted by
area), equal to measuring the cell itself (a test checks it).

Nuclei: the store keeps cell labels only, so each cell's nucleus is its pixels above one Otsu
threshold of the nuclear stain over the site's cells (the DNA channel, by name); cytoplasm is the
rest of the cell. Without a nuclear stain only the ``Cells`` compartment is measured.

Cost: texture runs on cp-measure's numba kernel (compiled once, cached on disk). Measured cost
per 512 px site is in ``benchmarks/results/bench_measurements.txt``; with ``max_cells`` a
seeded sample of each site's cells is measured and the other cells' rows are NaN (the
correlations use the measured cells only).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .._files import atomic_path
from ..errors import DataWarning, StoreError
from ..progress import Cancel, Cancelled, ProgressCallback, is_cancelled, report

#: Bump when a measurement changes: cached tables of another version are rebuilt.
#: 1: NumPy/SciPy proxies; 2: cp-measure's featurizers.
VERSION = 2
#: Cells sampled (fixed seed) for the correlations; Spearman over 5,000 cells has a standard
#: error under 0.015, far below the differences a description ranks by.
MAX_CELLS = 5000
#: Measurements named per feature.
N_TOP = 3
#: Correlations weaker than this are not worth a description.
MIN_CORRELATION = 0.2
#: What a person reads where no measurement follows a feature (its description is empty).
NO_DESCRIPTION = f"no measurement follows it closely (all |Spearman| < {MIN_CORRELATION})"
KEYS = ("plate", "well", "site", "label")

COMPARTMENTS = ("Cells", "Nuclei", "Cytoplasm")
INTENSITY = (
    "IntegratedIntensity",
    "MeanIntensity",
    "StdIntensity",
    "MaxIntensity",
    "MedianIntensity",
    "MassDisplacement",
)
TEXTURE = ("Contrast", "Entropy", "AngularSecondMoment", "Correlation", "InverseDifferenceMoment")
TEXTURE_SCALE = 3
TEXTURE_LEVELS = 256
GRANULARITY_STEPS = 8
GRANULARITY = {"subsample_size": 0.25, "image_sample_size": 0.25, "element_size": 10}
RADIAL_BINS = 4
RADIAL = ("FracAtD", "MeanFrac", "RadialCV")
SHAPE = (
    "Area",
    "Perimeter",
    "FormFactor",
    "Eccentricity",
    "Solidity",
    "Extent",
    "Compactness",
    "MajorAxisLength",
    "MinorAxisLength",
    "MeanRadius",
)

#: How a measurement reads in a description (by category and feature, without stain and
#: parameters).
WORDS = {
    "Intensity_MeanIntensity": "intensity",
    "Intensity_StdIntensity": "intensity spread",
    "Intensity_IntegratedIntensity": "total intensity",
    "Intensity_MaxIntensity": "peak intensity",
    "Intensity_MedianIntensity": "median intensity",
    "Intensity_MassDisplacement": "off-centre intensity",
    "Texture_Contrast": "texture contrast",
    "Texture_Entropy": "texture entropy",
    "Texture_AngularSecondMoment": "texture uniformity",
    "Texture_Correlation": "texture correlation",
    "Texture_InverseDifferenceMoment": "texture smoothness",
    "RadialDistribution_FracAtD": "share in ring",
    "RadialDistribution_MeanFrac": "enrichment in ring",
    "RadialDistribution_RadialCV": "unevenness in ring",
    "AreaShape_Area": "area",
    "AreaShape_Perimeter": "perimeter",
    "AreaShape_FormFactor": "roundness",
    "AreaShape_Eccentricity": "elongation",
    "AreaShape_Solidity": "solidity",
    "AreaShape_Extent": "extent",
    "AreaShape_Compactness": "compactness",
    "AreaShape_MajorAxisLength": "length",
    "AreaShape_MinorAxisLength": "width",
    "AreaShape_MeanRadius": "mean radius",
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


def _unit_scale(image: np.ndarray) -> np.ndarray:
    """Intensities in [0, 1] as CellProfiler reads them: integers over their type's maximum;
    floats as they are when inside [0, 1], else over the site's maximum."""
    image = np.asarray(image)
    if np.issubdtype(image.dtype, np.integer):
        return image.astype(np.float64) / float(np.iinfo(image.dtype).max)
    out = np.nan_to_num(image.astype(np.float64), nan=0.0)
    out = np.maximum(out, 0.0)
    top = float(out.max()) if out.size else 0.0
    return out / top if top > 1.0 else out


def _featurizers():
    """cp-measure's functions; the numba texture kernel where numba is installed (the same
    values as mahotas' to 1e-5, 50-100 times faster)."""
    from cp_measure.core import (
        measuregranularity,
        measureobjectintensity,
        measureobjectintensitydistribution,
        measureobjectsizeshape,
    )

    try:
        from cp_measure.core.numba.measuretexture import get_texture
    except ImportError:  # pragma: no cover - numba is a dependency of this package
        from cp_measure.core.measuretexture import get_texture
    return {
        "intensity": measureobjectintensity.get_intensity,
        "texture": get_texture,
        "granularity": measuregranularity.get_granularity,
        "sizeshape": measureobjectsizeshape.get_sizeshape,
        "radial": measureobjectintensitydistribution.get_radial_distribution,
    }


def _dense(mask: np.ndarray, present: np.ndarray) -> np.ndarray:
    """``mask`` relabelled 1..N in the order of ``present`` (its sorted labels)."""
    dense = (np.searchsorted(present, mask) + 1).astype(np.int32)
    dense[mask == 0] = 0
    return dense


def _measure_objects(mask: np.ndarray, image: np.ndarray, names, radial: bool, funcs):
    """cp-measure on one label image (labels 1..N, contiguous): {CellProfiler name: values}
    without the compartment prefix."""
    out: dict[str, np.ndarray] = {}
    shape = funcs["sizeshape"](mask, None, calculate_advanced=False)
    for f in SHAPE:
        out[f"AreaShape_{f}"] = np.asarray(shape[f], np.float64)
    for c, stain in enumerate(names):
        pixels = image[c]
        inten = funcs["intensity"](mask, pixels)
        for f in INTENSITY:
            out[f"Intensity_{f}_{stain}"] = inten[f"Intensity_{f}"]
        tex = funcs["texture"](mask, pixels, scale=TEXTURE_SCALE, gray_levels=TEXTURE_LEVELS)
        for f in TEXTURE:
            for d in range(4):
                suffix = f"{TEXTURE_SCALE}_{d:02d}_{TEXTURE_LEVELS}"
                out[f"Texture_{f}_{stain}_{suffix}"] = tex[f"{f}_{suffix}"]
        if radial:
            with np.errstate(invalid="ignore", divide="ignore"):
                rad = funcs["radial"](mask, pixels, bin_count=RADIAL_BINS)
            for k in range(1, RADIAL_BINS + 1):
                for f in RADIAL:
                    key = f"RadialDistribution_{f}_{k}of{RADIAL_BINS}"
                    out[f"RadialDistribution_{f}_{stain}_{k}of{RADIAL_BINS}"] = rad[key]
    return {k: np.asarray(v, np.float64).ravel() for k, v in out.items()}


def _granularity(mask: np.ndarray, image: np.ndarray, names, funcs) -> dict[str, np.ndarray]:
    """Granularity spectrum of every object of ``mask`` (labels 1..N) per stain:
    {``Granularity_<step>_<stain>``: values}."""
    out = {}
    for c, stain in enumerate(names):
        gran = funcs["granularity"](
            mask, image[c], granular_spectrum_length=GRANULARITY_STEPS, **GRANULARITY
        )
        for k in range(1, GRANULARITY_STEPS + 1):
            out[f"Granularity_{k}_{stain}"] = np.asarray(gran[f"Granularity_{k}"], np.float64)
    return out


def _cell_granularity(parts: list[dict], areas: list, means: list) -> dict[str, np.ndarray]:
    """A cell's granularity from its nucleus' and cytoplasm's (``parts``, NaN where a cell
    lacks one). Each step is a drop of the object's mean in percent of its starting mean
    (cp-measure floors that at machine epsilon), and a cell's mean is its parts' weighted by
    area, so the cell's step is sum(area x start x step) / sum(area x mean) over its parts.
    ``areas[i]`` and ``means[i][stain]`` are the parts' areas and raw mean intensities."""
    eps = np.finfo(float).eps
    out = {}
    for name in parts[0]:
        stain = parse_name("X_" + name)[2]
        num = np.zeros_like(parts[0][name])
        den = np.zeros_like(parts[0][name])
        for part, area, mean in zip(parts, areas, means, strict=True):
            ok = np.isfinite(part[name]) & (area > 0)
            m = np.where(ok, mean[stain], 0.0)
            num[ok] += (area * np.maximum(m, eps) * part[name])[ok]
            den[ok] += (area * m)[ok]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[name] = np.where(den > 0, num / np.maximum(den, eps), np.nan)
    return out


def measure_site(
    image: np.ndarray,
    cells: np.ndarray,
    channel_names: Sequence[str],
    *,
    max_cells: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per cell label of ``cells`` (H, W): ``label`` and CellProfiler's measurements of
    every stain of ``image`` (C, H, W) in each compartment (see the module docstring).

    With ``max_cells``, a sample of that many cells drawn with ``seed`` is measured and the
    other rows are NaN; every row is measured otherwise. A compartment a cell lacks (a cell
    without a nucleus) has NaN measurements and area 0.
    """
    image = _unit_scale(image)
    cells = np.asarray(cells)
    if image.ndim != 3 or image.shape[1:] != cells.shape:
        raise ValueError(
            f"measure_site: image {image.shape} and cell labels {cells.shape} do not match"
        )
    names = [str(n) for n in channel_names]
    if len(names) != image.shape[0]:
        raise ValueError(f"measure_site: {image.shape[0]} channels but names {names}")
    labels = np.unique(cells[cells > 0]).astype(np.int64)
    if not labels.size:
        return pd.DataFrame({"label": labels})
    measured = labels
    if max_cells is not None and labels.size > max_cells:
        rng = np.random.default_rng(seed)
        measured = np.sort(rng.choice(labels, max_cells, replace=False))
    kept = np.where(np.isin(cells, measured), cells, 0)
    nuc = _nuclear(names)
    masks = {"Cells": kept}
    if nuc is not None:
        nuclear = (kept > 0) & (image[nuc] > _otsu(image[nuc][kept > 0]))
        masks["Nuclei"] = np.where(nuclear, kept, 0)
        masks["Cytoplasm"] = np.where(nuclear, 0, kept)
    funcs = _featurizers()
    columns: dict[str, np.ndarray] = {"label": labels}

    def put(comp: str, present: np.ndarray, values: dict[str, np.ndarray]) -> None:
        rows = np.searchsorted(labels, present)
        for name, v in values.items():
            col = np.full(labels.size, np.nan)
            col[rows] = v
            columns[f"{comp}_{name}"] = col

    for comp, mask in masks.items():
        present = np.unique(mask[mask > 0]).astype(np.int64)
        if present.size:
            # cp-measure wants labels 1..N: relabel, then put the rows back by label
            put(
                comp,
                present,
                _measure_objects(_dense(mask, present), image, names, comp == "Cells", funcs),
            )
    if nuc is None:
        present = np.unique(kept[kept > 0]).astype(np.int64)
        put("Cells", present, _granularity(_dense(kept, present), image, names, funcs))
    else:  # nuclei and cytoplasm in one label image: one image-wide pass per stain
        n = labels.size
        both = np.where(masks["Nuclei"] > 0, np.searchsorted(labels, kept) + 1, 0)
        both = np.where(masks["Cytoplasm"] > 0, np.searchsorted(labels, kept) + 1 + n, both)
        full = np.zeros(2 * n, bool)
        full[np.unique(both[both > 0]) - 1] = True
        ids = np.flatnonzero(full) + 1
        dense = _dense(both, ids)
        gran = _granularity(dense, image, names, funcs)
        parts = []
        for offset in (0, n):  # nuclei, cytoplasm: (n,) arrays, NaN where absent
            pick = (ids > offset) & (ids <= offset + n)
            rows = ids[pick] - 1 - offset
            part = {}
            for name, v in gran.items():
                col = np.full(n, np.nan)
                col[rows] = v[pick]
                part[name] = col
            parts.append(part)
        areas, means = [], []
        for comp in ("Nuclei", "Cytoplasm"):
            areas.append(np.nan_to_num(columns.get(f"{comp}_AreaShape_Area", np.zeros(n))))
            means.append(
                {
                    st: np.nan_to_num(
                        columns.get(f"{comp}_Intensity_MeanIntensity_{st}", np.zeros(n))
                    )
                    for st in names
                }
            )
        put("Nuclei", labels, parts[0])
        put("Cytoplasm", labels, parts[1])
        put("Cells", labels, _cell_granularity(parts, areas, means))
    for comp in masks:  # an object without signal has no spectrum (cp-measure divides by eps)
        for st in names:
            dark = ~(columns.get(f"{comp}_Intensity_MeanIntensity_{st}", np.ones(1)) > 0)
            for k in range(1, GRANULARITY_STEPS + 1):
                col = columns.get(f"{comp}_Granularity_{k}_{st}")
                if col is not None:
                    col[dark] = np.nan
    for comp in masks:  # measured cells without this compartment: area 0
        area = f"{comp}_AreaShape_Area"
        if area in columns:
            columns[area][np.isin(labels, measured) & np.isnan(columns[area])] = 0.0
    return pd.DataFrame(columns)


def _site_quota(store, max_cells: int | None) -> int | None:
    """Cells measured per site for a budget of ``max_cells`` (None: all; also when the quota
    covers every site's cells, so that a small store's table is one whatever the budget)."""
    if max_cells is None:
        return None
    sites = store.sites()
    quota = max(1, -(-int(max_cells) // max(len(sites), 1)))
    table = store.table("cell")
    most = (
        int(table.groupby(["plate", "well", "site"], observed=True).size().max())
        if len(table)
        else 0
    )
    return None if quota >= most else quota


def _signature(store, quota: int | None) -> str:
    """What the cached table depends on: the store's cells, sites and plate, the bytes of
    its images and labels (the store's data hash, so a site re-imaged or re-segmented into
    the same cells is measured again), the cells measured per site and the version."""
    table = store.table("cell")
    cols = [c for c in (*KEYS, "area", "centroid_y", "centroid_x") if c in table.columns]
    h = hashlib.sha256()
    h.update(pd.util.hash_pandas_object(table[cols], index=False).to_numpy().tobytes())
    h.update(
        pd.util.hash_pandas_object(store.sites().astype(str), index=False).to_numpy().tobytes()
    )
    h.update(json.dumps(dict(store.plate_source), sort_keys=True, default=str).encode())
    h.update(str(store.signature.get("data", "")).encode())
    h.update(f"measurements:{VERSION}:cp-measure:{_cp_measure_version()}:{quota}".encode())
    return h.hexdigest()


def _cp_measure_version() -> str:
    from importlib.metadata import version

    return version("cp-measure")


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
    max_cells: int | None = MAX_CELLS,
    cache: bool = True,
    seed: int = 0,
    progress: ProgressCallback = None,
    cancel: Cancel = None,
) -> pd.DataFrame:
    """Measurements of the cells of ``store``, in the order of ``store.table("cell")``.

    Columns: plate, well, site, label, then the measurements (float32). ``plate`` defaults to
    the plate the store was embedded from. Every site is visited; with ``max_cells``, each
    measures a seeded sample of ``ceil(max_cells / sites)`` of its cells (all of them in a
    small store) and the others' rows are NaN, because the descriptions correlate over
    :data:`MAX_CELLS` cells anyway and cp-measure costs seconds per site; ``None`` measures
    every cell (the concept benchmark's anchor). With ``cache``, the table is read from
    :func:`cache_path` when its signature (the store's cells, sites, plate, ``max_cells``,
    cp-measure's version and :data:`VERSION`) matches, else measured again and written
    there. Sites without a label image give NaN rows.
    """
    path = cache_path(store)
    quota = _site_quota(store, max_cells)
    signature = _signature(store, quota)
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
        m = measure_site(
            plate[key].read(), store.site_labels(key), names, max_cells=quota, seed=seed + i
        )
        m.insert(0, "site", key[2])
        m.insert(0, "well", key[1])
        m.insert(0, "plate", key[0])
        parts.append(m)
        report(progress, "measure", i + 1, len(sites))
    keys = table[list(KEYS)].copy()
    keys["plate"], keys["well"] = keys["plate"].astype(str), keys["well"].astype(str)
    keys["site"], keys["label"] = keys["site"].astype(np.int64), keys["label"].astype(np.int64)
    measured = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(KEYS))
    values = [c for c in measured.columns if c not in KEYS]
    measured[values] = measured[values].astype(np.float32)
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
    # the measured cells: a cell has its area whenever it was measured (a sample, or a site
    # without labels, leaves whole rows NaN)
    area = "Cells_AreaShape_Area"
    measured = (
        np.isfinite(values[:, cols.index(area)]) if area in cols else np.ones(len(values), bool)
    )
    rows = np.flatnonzero(measured & np.isfinite(values).any(axis=1))
    if len(rows) > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_cells, replace=False))
    x = _ranks(csr[rows].toarray().astype(np.float64))
    y = values[rows]
    with warnings.catch_warnings():  # a column no measured cell has (no nuclei) stays NaN: r 0
        warnings.simplefilter("ignore", RuntimeWarning)
        y = np.where(np.isfinite(y), y, np.nanmedian(y, axis=0, keepdims=True))
    y = _ranks(y)
    x -= x.mean(0)
    y -= y.mean(0)
    sx, sy = np.sqrt((x**2).sum(0)), np.sqrt((y**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (x.T @ y) / np.outer(sx, sy)
    r[~np.isfinite(r)] = 0.0
    return pd.DataFrame(r, columns=cols)


def parse_name(measurement: str) -> tuple[str, str, str, str]:
    """(compartment, measure, stain, parameters) of a CellProfiler column name, e.g.
    ``Cells_Texture_Contrast_Mito_3_00_256`` -> ("Cells", "Texture_Contrast", "Mito",
    "3_00_256"); shape measures have no stain. Stain names may contain underscores."""
    comp, _, rest = measurement.partition("_")
    category, _, rest = rest.partition("_")
    parts = rest.split("_")
    if category == "AreaShape":
        return comp, f"AreaShape_{rest}", "", ""
    if category == "Granularity":  # Granularity_<step>_<stain>
        return comp, "Granularity", "_".join(parts[1:]), parts[0]
    tail = {"Texture": 3, "RadialDistribution": 1}.get(category, 0)
    feature = parts[0]
    stain = "_".join(parts[1 : len(parts) - tail])
    params = "_".join(parts[len(parts) - tail :]) if tail else ""
    return comp, f"{category}_{feature}", stain, params


def _phrase(measurement: str, r: float) -> tuple[str, str]:
    """(stain, words) of one measurement, e.g. ("Mito", "granularity 2 up (0.78)")."""
    comp, what, stain, params = parse_name(measurement)
    words = WORDS.get(what, what.partition("_")[2] or what)
    if what == "Granularity":
        words = f"granularity {params}"
    elif what.startswith("RadialDistribution"):
        words = f"{words} {params.replace('of', '/')}"
    words = COMPARTMENT_WORDS.get(comp, comp.lower() + " ") + words
    return stain or "shape", f"{words} {'up' if r > 0 else 'down'} ({abs(r):.2f})"


def describe(row: pd.Series, n_top: int = N_TOP, min_r: float = MIN_CORRELATION):
    """A phrase for one feature from its correlations (a row of :func:`feature_correlations`),
    the measurements named and their correlations.

    A measure is named once per stain and sign, by its strongest compartment and direction
    (a texture in four directions, or a stain's intensity in the cell and in its cytoplasm,
    say one thing)."""
    order = np.argsort(-np.abs(row.to_numpy()), kind="stable")
    names: list[str] = []
    values: list[float] = []
    by_stain: dict[str, list[str]] = {}
    seen: set[tuple[str, str, bool]] = set()
    for i in order:
        r = float(row.iloc[i])
        if len(names) == n_top or abs(r) < min_r:
            break
        stain, words = _phrase(row.index[i], r)
        _, what, _, params = parse_name(row.index[i])
        same_scale = params if what == "Granularity" or what.startswith("Radial") else ""
        said = (stain, what, same_scale, r > 0)
        if said in seen:
            continue
        seen.add(said)
        names.append(row.index[i])
        values.append(r)
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


def cached_measurements(store, *, max_cells: int | None = MAX_CELLS) -> pd.DataFrame | None:
    """The measurements :func:`store_measurements` left beside ``store`` (as ``analyze``'s
    descriptions and the report leave them), when they still match the store; None otherwise.
    Never measures: for callers that use measurements only where they cost nothing."""
    path = cache_path(store)
    if not hasattr(store, "plate_source") or not path.is_file():
        return None
    try:
        return _read_cached(path, _signature(store, _site_quota(store, max_cells)))
    except (StoreError, OSError):
        return None


__all__ = [
    "NO_DESCRIPTION",
    "cache_path",
    "cached_measurements",
    "parse_name",
    "describe_features",
    "describe_store",
    "feature_correlations",
    "measure_site",
    "store_measurements",
]
