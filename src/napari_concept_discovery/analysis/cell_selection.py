"""Sets of cells a user takes into the next step: those above a feature threshold, those most
like a given cell in code space, those in the gallery; written as a CSV, drawn as a label
image for a napari Labels layer, or written as one label image per site (a label folder in the
layout ``segment`` writes, :func:`write_selection_labels`). Qt-free; the explorer widget and
``concept-discovery similar`` / ``cells`` are thin doors over these functions.

Similar cells are found exactly: cosine similarity of the cell's code vector against every
cell's, as one sparse matrix-vector product over the codes the
:class:`~napari_concept_discovery.explore.Explorer` keeps for the store. Its cost is linear in
the number of non-zero codes (cells x L0) and there is no index to build. Measured
(benchmarks/bench_similar.py, M = 4096, L0 = 20): 0.03 s per query at 100,000 cells and 0.3 s at
:data:`EXACT_LIMIT` = 1,000,000 (codes 164 MB), on a par with scikit-learn's brute-force
neighbours (its time over ours 0.6-1.7 across runs on a shared machine) and the same answer.
Above a million cells the search stays exact and grows linearly (about 3 s and 1.6 GB of codes
at ten million): what limits it is holding every cell's codes in memory, not the search.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._files import atomic_dir, atomic_path, check_not_foreign
from ..errors import StoreError
from ..plate.model import SiteKey

#: Columns of a cell selection, in the order written.
COLUMNS = ("plate", "well", "site", "label", "centroid_y", "centroid_x")
#: Store size up to which similar-cell search is documented and tested as exact and fast (one
#: sparse product over the cached codes); above it the product is the same (still exact), only
#: the codes' memory (cells x L0 x 12 bytes) grows.
EXACT_LIMIT = 1_000_000
#: Written into a folder of selection label images, listing its files (the folder is replaced
#: whole, and only when every file in it was written by this package).
SELECTION_MARKER = "selection.json"


def cell_row(explorer, key, label: int) -> int:
    """Row of cell ``label`` of site ``key`` in the store's cell table (refused by name)."""
    key = SiteKey.of(key)
    if key not in explorer.store:
        raise StoreError(f"site {key} is not in the activation store at {explorer.store.path}")
    rows = explorer.store.site_rows("cell", key)
    labels = explorer.store.table("cell")["label"].to_numpy()[rows]
    hit = np.flatnonzero(labels == int(label))
    if not hit.size:
        raise StoreError(
            f"site {key} has no cell with label {label} in the store at {explorer.store.path} "
            f"(its cells are labelled {_span(labels)})"
        )
    return int(rows.start + hit[0])


def _span(labels: np.ndarray) -> str:
    if not len(labels):
        return "nothing: it has no cells"
    return f"{int(labels.min())}..{int(labels.max())}"


def _table(table: pd.DataFrame, rows: np.ndarray) -> pd.DataFrame:
    cols = [c for c in COLUMNS if c in table.columns]
    out = table.iloc[rows][cols].reset_index(drop=True)
    out["plate"] = out["plate"].astype(str)
    out["well"] = out["well"].astype(str)
    out["site"] = out["site"].astype(np.int64)
    out["label"] = out["label"].astype(np.int64)
    return out


def cosine_to(codes: sp.csr_matrix, row: int) -> np.ndarray:
    """Cosine similarity of every row of ``codes`` with row ``row`` (0 for all-zero rows)."""
    codes = sp.csr_matrix(codes)
    sq = np.asarray(codes.multiply(codes).sum(axis=1)).ravel()
    norms = np.sqrt(sq)
    q = codes[row]
    dots = np.asarray((codes @ q.T).todense()).ravel()
    denom = norms * norms[row]
    return np.divide(dots, denom, out=np.zeros_like(dots, dtype=np.float64), where=denom > 0)


def similar_cells(explorer, key, label: int, n: int = 24) -> pd.DataFrame:
    """The ``n`` cells of the store most like cell ``label`` of site ``key`` in code space.

    Cosine similarity over the cells' code vectors, exact (every cell is scored), the cell
    itself left out, ties broken by store order. Columns: plate, well, site, label, centroid_y,
    centroid_x, similarity. A cell on which no feature fires has no direction to compare and
    is refused by name; cells on which none fires score 0 and come last.
    """
    if int(n) < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    row = cell_row(explorer, key, label)
    codes, table = explorer.cell_codes()
    if codes[row].nnz == 0:
        raise StoreError(
            f"no feature is active on cell {label} of {SiteKey.of(key)}: it has no direction in "
            "code space to compare other cells with"
        )
    sim = cosine_to(codes, row)
    sim[row] = -np.inf
    order = np.lexsort((np.arange(len(sim)), -sim))[: min(int(n), len(sim) - 1)]
    out = _table(table, order)
    out["similarity"] = sim[order].astype(np.float32)
    return out


def cells_above(explorer, feature: int, threshold: float) -> pd.DataFrame:
    """Every cell of the store where ``feature``'s code is at least ``threshold`` (and
    non-zero), strongest first. Columns: plate, well, site, label, centroids, ``value``."""
    f = explorer._feature(feature)
    codes, table = explorer.cell_codes()
    col = codes[:, f].tocoo()
    keep = (col.data >= float(threshold)) & (col.data != 0)
    rows, vals = col.row[keep], col.data[keep]
    order = np.lexsort((rows, -vals))
    out = _table(table, rows[order])
    out["value"] = vals[order].astype(np.float32)
    return out


def with_feature(explorer, cells: pd.DataFrame, feature: int) -> pd.DataFrame:
    """``cells`` (plate, well, site, label) with centroids and ``feature``'s value added."""
    f = explorer._feature(feature)
    codes, table = explorer.cell_codes()
    keys = pd.MultiIndex.from_arrays(
        [
            table["plate"].astype(str),
            table["well"].astype(str),
            table["site"].astype(np.int64),
            table["label"].astype(np.int64),
        ]
    )
    want = pd.MultiIndex.from_arrays(
        [
            cells["plate"].astype(str),
            cells["well"].astype(str),
            cells["site"].astype(np.int64),
            cells["label"].astype(np.int64),
        ]
    )
    rows = keys.get_indexer(want)
    if (rows < 0).any():
        i = int(np.flatnonzero(rows < 0)[0])
        c = cells.iloc[i]
        raise StoreError(
            f"cell {c['label']} of {SiteKey(str(c['plate']), str(c['well']), int(c['site']))} "
            f"is not in the store at {explorer.store.path}"
        )
    out = _table(table, rows)
    for c in cells.columns:  # keep what the selection knew (similarity, ...)
        if c not in out.columns:
            out[c] = cells[c].to_numpy()
    out[f"feature_{f}"] = np.asarray(codes[rows, f].todense()).ravel().astype(np.float32)
    return out


def in_sites(cells: pd.DataFrame, plate=None, well=None, site=None) -> pd.DataFrame:
    """The cells of ``cells`` on the given plate, well and site (each optional)."""
    keep = np.ones(len(cells), bool)
    if plate is not None:
        keep &= cells["plate"].astype(str).to_numpy() == str(plate)
    if well is not None:
        keep &= cells["well"].astype(str).to_numpy() == str(well)
    if site is not None:
        keep &= cells["site"].astype(np.int64).to_numpy() == int(site)
    return cells[keep].reset_index(drop=True)


def write_cells_csv(cells: pd.DataFrame, path: str | Path) -> Path:
    """Write a cell selection as CSV (atomically): plate, well, site, label, centroids, values."""
    missing = [c for c in ("plate", "well", "site", "label") if c not in cells.columns]
    if missing:
        raise ValueError(f"a cell selection needs the columns {missing}")
    with atomic_path(path) as tmp:
        cells.to_csv(tmp, index=False)
    return Path(path)


def selection_labels(cells: pd.DataFrame, key, labels: np.ndarray) -> np.ndarray:
    """The label image of site ``key`` with only the selected cells kept (others set to 0)."""
    key = SiteKey.of(key)
    here = cells[
        (cells["plate"].astype(str) == key.plate)
        & (cells["well"].astype(str) == key.well)
        & (cells["site"].astype(np.int64) == key.site)
    ]
    keep = np.isin(labels, here["label"].to_numpy(np.int64))
    return np.where(keep, labels, 0).astype(labels.dtype)


def write_selection_labels(explorer, cells: pd.DataFrame, out, *, what: str = "") -> Path:
    """Write the label image of every site holding selected cells, with only those cells
    kept, into the folder ``out``: ``<plate>/<well>_s<site>_cells.tif`` (int32, 0 background,
    the store's labels), the layout of ``segment``'s label folders, plus
    :data:`SELECTION_MARKER` (the images, the cells in each and ``what`` was selected).

    The folder is written beside and swapped in whole; one that holds files this package did
    not write is refused by name before any work. Returns the folder.
    """
    import json

    import tifffile

    from ..plate.labels import label_paths

    missing = [c for c in ("plate", "well", "site", "label") if c not in cells.columns]
    if missing:
        raise ValueError(f"a cell selection needs the columns {missing}")
    out = check_not_foreign(
        out,
        marker=SELECTION_MARKER,
        what="labels folder",
        kind="a cell selection's label images",
    )
    sites = (
        cells[["plate", "well", "site"]]
        .astype({"plate": str, "well": str, "site": np.int64})
        .drop_duplicates()
        .sort_values(["plate", "well", "site"])
    )
    keys = [SiteKey(p, w, int(s)) for p, w, s in sites.itertuples(index=False)]
    for key in keys:  # every site known before anything is written
        if key not in explorer.store:
            raise StoreError(f"site {key} is not in the activation store at {explorer.store.path}")
    files, counts = [], {}
    with atomic_dir(out) as tmp:
        for key in keys:
            data = selection_labels(cells, key, explorer.labels(key)).astype(np.int32)
            path = label_paths(tmp, key)[0]
            path.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(path, data, compression="zlib")
            rel = path.relative_to(tmp).as_posix()
            files.append(rel)
            counts[rel] = int(len(np.unique(data[data > 0])))
        tops = sorted({f.split("/")[0] for f in files})  # what the folder holds, by name
        marker = {
            "what": what,
            "cells": int(sum(counts.values())),
            "files": tops,
            "images": files,
            "counts": counts,
        }
        (tmp / SELECTION_MARKER).write_text(json.dumps(marker, indent=1))
    return Path(out)


def read_selection_labels(folder) -> dict[SiteKey, np.ndarray]:
    """The label images of a folder written by :func:`write_selection_labels`, by site."""
    import json

    import tifffile

    folder = Path(folder)
    try:
        marker = json.loads((folder / SELECTION_MARKER).read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{folder} holds no readable {SELECTION_MARKER}: {exc}") from exc
    out = {}
    for rel in marker.get("images", []):
        plate, name = rel.split("/")
        well, _, site = name.removesuffix("_cells.tif").rpartition("_s")
        site = int(site)
        out[SiteKey(plate, well, site)] = tifffile.imread(folder / rel)
    return out


__all__ = [
    "EXACT_LIMIT",
    "SELECTION_MARKER",
    "in_sites",
    "read_selection_labels",
    "write_selection_labels",
    "cells_above",
    "cosine_to",
    "selection_labels",
    "similar_cells",
    "with_feature",
    "write_cells_csv",
]
