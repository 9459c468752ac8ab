"""Reading dictionary features as concepts: selectivity, ground-truth AUROC, feature tables.

Inputs are codes as a sparse matrix (tokens x features; a feature is active on a token when its
code is non-zero) and a table with one row per token. Everything is vectorised over features
through sparse products, so N ~ 1e5 tokens and M ~ 8192 features take seconds.

Selectivity of feature f for value i of a column (the paper's two forms; docs/architecture.md, "Dictionaries"):
avg = P(active | i) - P(active | not i); max = P(active | i) - max over other values j of
P(active | j).

Which stains drive a feature: for a dictionary on concatenated channel tokens, each atom's
share of norm per channel block (:func:`channel_shares`, applied through the dictionary's
``stain_attribution``); for other inputs, the correlation of a feature's activation map with
each channel's intensity on a site (:func:`stain_correlation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._files import (
    atomic_dir,
    atomic_parquet,
    atomic_path,
    atomic_write_text,
    check_free_space,
    check_not_foreign,
)
from .errors import DictionaryError, OutputError

THRESHOLDS = (0.5, 0.2)
#: Written into every analysis folder; a folder without it (and with other files) is not one.
ANALYSIS_MARKER = "analysis.json"


def _csr(codes) -> sp.csr_matrix:
    m = sp.csr_matrix(codes)
    m.eliminate_zeros()
    return m


def _active(codes) -> sp.csr_matrix:
    m = _csr(codes)
    return sp.csr_matrix((np.ones_like(m.data, dtype=np.float64), m.indices, m.indptr), m.shape)


@dataclass
class Selectivity:
    """Selectivity of every feature for every value of one column."""

    column: str
    values: list  # the V label values, sorted
    n_tokens: np.ndarray  # (V,) tokens per value
    p_active: np.ndarray  # (V, M) P(active | value)
    avg: np.ndarray  # (V, M)
    max: np.ndarray  # (V, M)

    def best_per_value(self, form: str = "avg") -> pd.DataFrame:
        """The most selective feature for each label value."""
        s = getattr(self, form)
        best = s.argmax(1)
        return pd.DataFrame(
            {
                "column": self.column,
                "value": self.values,
                "n_tokens": self.n_tokens,
                "feature": best,
                f"selectivity_{form}": s[np.arange(len(self.values)), best],
                "p_active": self.p_active[np.arange(len(self.values)), best],
            }
        )

    def counts(self) -> dict[str, int]:
        """Features whose best selectivity (over values) exceeds each threshold, per form."""
        out = {}
        for form in ("avg", "max"):
            best = getattr(self, form).max(0)
            for t in THRESHOLDS:
                out[f"n_{form}_above_{t}"] = int((best > t).sum())
        return out


def selectivity(codes, labels: Sequence, column: str = "label") -> Selectivity:
    """Selectivity of every feature for every value in ``labels`` (one label per token)."""
    act = _active(codes)
    labels = pd.Series(np.asarray(labels)).astype(str)
    if len(labels) != act.shape[0]:
        raise DictionaryError(f"{len(labels)} labels for {act.shape[0]} coded tokens in {column!r}")
    cats = pd.Categorical(labels)
    values = list(cats.categories)
    v = len(values)
    if v < 2:
        raise DictionaryError(
            f"column {column!r} has {v} value(s) ({values}); selectivity needs at least two"
        )
    onehot = sp.csr_matrix(
        (np.ones(len(labels)), (cats.codes, np.arange(len(labels)))), shape=(v, len(labels))
    )
    counts = np.asarray((onehot @ act).todense())  # (V, M) active tokens per value
    n = np.bincount(cats.codes, minlength=v).astype(np.float64)
    total = counts.sum(0)
    p = counts / n[:, None]
    p_not = (total[None, :] - counts) / (n.sum() - n)[:, None]
    avg = p - p_not
    # max over other values: the largest p unless it is this value's, then the second largest
    order = np.argsort(-p, axis=0, kind="stable")
    first = np.take_along_axis(p, order[:1], 0)[0]
    second = np.take_along_axis(p, order[1:2], 0)[0]
    is_first = order[0][None, :] == np.arange(v)[:, None]
    other_max = np.where(is_first, second[None, :], first[None, :])
    return Selectivity(column, values, n.astype(np.int64), p, avg, p - other_max)


def selectivity_report(codes, table: pd.DataFrame, columns: Sequence[str]):
    """Selectivity for several columns: (per-value best features table, per-column counts table)."""
    require_columns(table, columns, "selectivity")
    best, counts, sel = [], [], {}
    for col in columns:
        s = selectivity(codes, table[col].to_numpy(), col)
        sel[col] = s
        b = s.best_per_value("avg")
        b["selectivity_max"] = s.max[np.arange(len(s.values)), b["feature"].to_numpy()]
        b["best_selectivity_max"] = s.max.max(1)
        best.append(b)
        counts.append({"column": col, "n_values": len(s.values), **s.counts()})
    return pd.concat(best, ignore_index=True), pd.DataFrame(counts), sel


def feature_auroc(codes, membership: np.ndarray) -> np.ndarray:
    """AUROC of every feature's code as a score for a boolean membership (M,).

    Computed from ranks with ties averaged, using that most codes are zero: per feature, the
    zeros form one tie block placed between the negative and positive non-zero values.
    """
    csc = sp.csc_matrix(_csr(codes))
    n, m = csc.shape
    y = np.asarray(membership, dtype=bool)
    n_pos = int(y.sum())
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return np.full(m, np.nan)
    if csc.nnz == 0:  # every code zero: one tie, chance for every feature
        return np.full(m, 0.5)
    col = np.repeat(np.arange(m), np.diff(csc.indptr))
    val = csc.data.astype(np.float64)
    pos = y[csc.indices]
    order = np.lexsort((val, col))
    col, val, pos = col[order], val[order], pos[order]
    nnz = np.bincount(col, minlength=m)
    start = np.concatenate([[0], np.cumsum(nnz)[:-1]])
    within = np.arange(len(val)) - start[col]  # 0-based rank among the feature's non-zeros
    # average ranks over ties (same feature, same value)
    new_group = np.ones(len(val), dtype=bool)
    new_group[1:] = (col[1:] != col[:-1]) | (val[1:] != val[:-1])
    gid = np.cumsum(new_group) - 1
    g_start = np.flatnonzero(new_group)
    g_end = np.append(g_start[1:], len(val)) - 1
    first, last = within[g_start], within[g_end]
    rank_nz = (first[gid] + last[gid]) / 2 + 1  # 1-based among non-zeros
    n_neg_vals = np.bincount(col, weights=(val < 0).astype(float), minlength=m)
    zeros = n - nnz
    rank = rank_nz + np.where(val > 0, zeros[col], 0)
    zero_rank = n_neg_vals + (zeros + 1) / 2
    pos_in_nz = np.bincount(col, weights=pos.astype(float), minlength=m)
    rank_sum = np.bincount(col, weights=rank * pos, minlength=m) + (n_pos - pos_in_nz) * zero_rank
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def channel_shares(vectors, n_groups: int) -> np.ndarray:
    """Share of each row's squared norm in each of ``n_groups`` equal column blocks, (M, G).

    Rows of (M, G*D) vectors with channel g in columns g*D:(g+1)*D; each row of the result sums
    to 1 (a zero row gives equal shares).
    """
    v = np.asarray(vectors, dtype=np.float64)
    m, width = v.shape
    if n_groups < 1 or width % n_groups:
        raise DictionaryError(f"cannot split {width} columns into {n_groups} channel blocks")
    energy = (v.reshape(m, n_groups, width // n_groups) ** 2).sum(2)
    total = energy.sum(1, keepdims=True)
    return np.divide(energy, total, out=np.full_like(energy, 1.0 / n_groups), where=total > 0)


def stain_table(shares, names: Sequence[str]) -> pd.DataFrame:
    """``stain_<name>`` columns of (M, C) shares and ``top_stain``, the largest, per feature."""
    shares = np.asarray(shares, dtype=np.float64)
    names = [str(n) for n in names]
    if shares.ndim != 2 or shares.shape[1] != len(names):
        raise DictionaryError(f"{shares.shape} stain shares for {len(names)} stain names")
    out = pd.DataFrame({f"stain_{n}": shares[:, i] for i, n in enumerate(names)})
    out["top_stain"] = np.asarray(names, dtype=object)[shares.argmax(1)] if len(out) else []
    return out


def stain_correlation(activations, image, patch_size: int = 16) -> np.ndarray:
    """Correlation of features' activation maps with each channel's intensity on one site.

    For dictionaries on channel-mean tokens, whose atoms have no channel blocks: a feature
    whose map follows the ER stain's brightness is, at least, read where ER is bright.
    ``activations`` is a (rows, cols) map or (rows, cols, M) maps on the site's patch grid;
    ``image`` is (C, H, W). Each channel is averaged over every patch (the grid's rows x cols
    patches of ``patch_size``; a patch at the edge over its real pixels), then Pearson's r is
    taken per feature and channel over the patches. Returns (C,) or (M, C); 0 where a map or a
    channel is constant.
    """
    a = np.asarray(activations, dtype=np.float64)
    single = a.ndim == 2
    if single:
        a = a[..., None]
    if a.ndim != 3:
        raise DictionaryError(f"activations must be (rows, cols[, M]), got shape {a.shape}")
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 2:
        img = img[None]
    rows, cols, m = a.shape
    c, h, w = img.shape
    if (-(-h // patch_size), -(-w // patch_size)) != (rows, cols):
        raise DictionaryError(
            f"a {h} x {w} image has a {-(-h // patch_size)} x {-(-w // patch_size)} patch grid, "
            f"the activations {rows} x {cols}"
        )
    ry = np.arange(h) // patch_size
    rx = np.arange(w) // patch_size
    idx = (ry[:, None] * cols + rx[None, :]).ravel()
    count = np.bincount(idx, minlength=rows * cols)
    means = np.stack(
        [np.bincount(idx, weights=img[k].ravel(), minlength=rows * cols) / count for k in range(c)]
    )  # (C, P)
    x = a.reshape(rows * cols, m).T  # (M, P)
    x = x - x.mean(1, keepdims=True)
    y = means - means.mean(1, keepdims=True)
    num = x @ y.T
    den = np.sqrt((x**2).sum(1))[:, None] * np.sqrt((y**2).sum(1))[None, :]
    r = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return r[0] if single else r


def require_columns(table: pd.DataFrame, columns: Sequence[str], purpose: str) -> None:
    """Refuse ``columns`` that ``table`` lacks, naming them, their purpose and the columns there are."""
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DictionaryError(
            f"no column {', '.join(map(repr, missing))} for {purpose}; "
            f"columns are {list(table.columns)}"
        )


def read_truth(path: str | Path) -> pd.DataFrame:
    """A per-token truth table from csv, tsv or parquet, with a clear error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DictionaryError(f"no truth file at {path}")
    try:
        if path.suffix.lower() == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",")
    except (ValueError, OSError) as exc:  # pandas' parser errors are ValueErrors
        raise DictionaryError(f"cannot read the truth table {path}: {exc}") from exc


def join_truth(
    table: pd.DataFrame, truth: pd.DataFrame, keys=("plate", "well", "site", "label")
) -> pd.DataFrame:
    """The token table with the truth table's other columns joined on ``keys``, row order kept.

    Columns the table already has keep the table's values; tokens without truth get NaN.
    """
    keys = list(keys)
    missing = [k for k in keys if k not in table.columns or k not in truth.columns]
    if missing:
        raise DictionaryError(
            f"cannot join truth on {keys}: missing {missing} "
            f"(table: {list(table.columns)}, truth: {list(truth.columns)})"
        )
    extra = [c for c in truth.columns if c not in table.columns]
    right = truth[keys + extra].copy()
    left = table.copy()
    for k in keys:
        left[k] = left[k].astype(str)
        right[k] = right[k].astype(str)
    joined = left.merge(right.drop_duplicates(keys), on=keys, how="left")
    for k in keys:
        joined[k] = table[k].to_numpy()
    return joined


def concept_auroc(codes, truth: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """For each true concept (every value of each truth column), the best single-feature AUROC.

    Boolean columns give one concept (True); other columns give one concept per value. Tokens
    without a value in a column (NaN: a truth file that covers only some cells) are left out of
    that column's concepts, never made a concept of their own; ``n_judged`` counts the rest.
    """
    require_columns(truth, columns, "ground truth")
    csr = _csr(codes)
    rows = []
    for col in columns:
        known = truth[col].notna().to_numpy()
        series = truth[col][known].infer_objects()
        judged = csr if known.all() else csr[np.flatnonzero(known)]
        if series.dtype == bool:
            concepts = [(str(col), series.to_numpy())]
        else:
            s = series.astype(str).to_numpy()
            concepts = [(f"{col}={v}", s == v) for v in sorted(set(s))]
        for name, member in concepts:
            auc = feature_auroc(judged, member)
            best = int(np.nanargmax(auc)) if np.isfinite(auc).any() else -1
            rows.append(
                {
                    "concept": name,
                    "column": col,
                    "n_members": int(np.sum(member)),
                    "n_judged": len(member),
                    "best_feature": best,
                    "auroc": float(auc[best]) if best >= 0 else float("nan"),
                }
            )
    return pd.DataFrame(rows)


@dataclass
class TrueConcept:
    """A concept with per-cell ground truth: the cells it is judged on and which are members."""

    name: str
    kind: str  # "cell type", "subpopulation", "perturbation" or "null perturbation"
    rows: np.ndarray  # rows of the cell table the concept is judged on
    member: np.ndarray  # (len(rows),) bool


def truth_concepts(
    table: pd.DataFrame,
    *,
    control: str = "control",
    min_members: int = 10,
) -> list[TrueConcept]:
    """The true concepts of a cell table with synthetic-style truth columns.

    Columns used: ``cell_type``, ``perturbation``, ``responded``, ``mitotic`` (bool), and
    ``plate``. Each cell type and the mitotic cells are judged against all other cells. A
    perturbation's members are its responding cells, judged against the control cells
    (``perturbation == control``) of the plates and cell types its members come from, so that
    neither plate nor cell type can stand in for it, and against its own cells that did not
    respond, so that a feature of the treated well rather than of the response does not count;
    a perturbation none of whose cells respond is a null one, and all its cells are judged
    against the same kind of controls (a feature that finds it finds a well or plate
    difference, not biology).
    """
    require_columns(
        table, ("cell_type", "perturbation", "responded", "mitotic", "plate"), "true concepts"
    )
    every = np.arange(len(table))
    out = [
        TrueConcept(str(ct), "cell type", every, (table["cell_type"] == ct).to_numpy())
        for ct in sorted(table["cell_type"].dropna().astype(str).unique())
    ]
    mitotic = table["mitotic"].astype(str).str.lower().isin(("true", "1")).to_numpy()
    out.append(TrueConcept("mitotic", "subpopulation", every, mitotic))
    responded = table["responded"].astype(str).str.lower().isin(("true", "1")).to_numpy()
    pert = table["perturbation"].astype(str).to_numpy()
    is_control = pert == control
    stratum = (table["plate"].astype(str) + "/" + table["cell_type"].astype(str)).to_numpy()
    for name in sorted(set(pert.tolist()) - {control}):
        inside = pert == name
        null = not (inside & responded).any()
        member = inside if null else inside & responded
        if member.sum() < min_members:
            continue
        negative = is_control & np.isin(stratum, np.unique(stratum[member]))
        if not negative.any():
            continue
        negative |= inside & ~member  # its non-responders
        rows = np.flatnonzero(member | negative)
        kind = "null perturbation" if null else "perturbation"
        out.append(TrueConcept(name, kind, rows, member[rows]))
    return out


def well_concepts(
    table: pd.DataFrame,
    nulls: Sequence[str] = (),
    *,
    control: str = "control",
    min_members: int = 2,
) -> list[TrueConcept]:
    """True concepts of tokens that know only their well (crop tokens: one per tile, no cells).

    Columns used: ``cell_type``, ``perturbation`` and ``plate``. A crop cannot say whether its
    cells responded or divided, so there is no subpopulation, and a perturbation's members are
    all crops of its wells, judged against the control crops of the same plates and cell types
    (as :func:`truth_concepts` judges cells). ``nulls`` names the perturbations known to change
    nothing (from the cells' truth), reported as null perturbations.
    """
    require_columns(table, ("cell_type", "perturbation", "plate"), "well-level concepts")
    every = np.arange(len(table))
    out = [
        TrueConcept(str(ct), "cell type", every, (table["cell_type"] == ct).to_numpy())
        for ct in sorted(table["cell_type"].dropna().astype(str).unique())
    ]
    pert = table["perturbation"].astype(str).to_numpy()
    stratum = (table["plate"].astype(str) + "/" + table["cell_type"].astype(str)).to_numpy()
    is_control = pert == control
    for name in sorted(set(pert.tolist()) - {control}):
        member = pert == name
        negative = is_control & np.isin(stratum, np.unique(stratum[member]))
        if member.sum() < min_members or not negative.any():
            continue
        rows = np.flatnonzero(member | negative)
        kind = "null perturbation" if name in set(nulls) else "perturbation"
        out.append(TrueConcept(name, kind, rows, member[rows]))
    return out


def recovery_table(
    codes, concepts: Sequence[TrueConcept], stains: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Per true concept: members, the best single feature, its AUROC and its top stain.

    ``stains`` is a :func:`stain_table` of the dictionary (one row per feature), adding the
    best feature's ``top_stain`` and its ``stain_share``.
    """
    csr = _csr(codes)
    rows = []
    for c in concepts:
        auc = feature_auroc(csr[c.rows], c.member)
        best = int(np.nanargmax(auc)) if np.isfinite(auc).any() else -1
        row = {
            "concept": c.name,
            "kind": c.kind,
            "n_members": int(c.member.sum()),
            "best_feature": best,
            "auroc": float(auc[best]) if best >= 0 else float("nan"),
        }
        if stains is not None and best >= 0:
            top = stains["top_stain"].iloc[best]
            row["top_stain"] = top
            row["stain_share"] = float(stains[f"stain_{top}"].iloc[best])
        rows.append(row)
    return pd.DataFrame(rows)


def top_tokens(codes, n: int = 10) -> list[np.ndarray]:
    """For each feature, the rows of its ``n`` largest codes, largest first."""
    csc = sp.csc_matrix(_csr(codes))
    m = csc.shape[1]
    col = np.repeat(np.arange(m), np.diff(csc.indptr))
    order = np.lexsort((-csc.data, col))
    starts = csc.indptr[:-1]
    counts = np.diff(csc.indptr)
    rows = csc.indices[order]
    return [rows[s : s + min(c, n)] for s, c in zip(starts, counts, strict=True)]


def feature_table(
    codes,
    table: pd.DataFrame | None = None,
    columns: Sequence[str] = (),
    *,
    top_n: int = 10,
    selectivities: dict[str, Selectivity] | None = None,
    stains: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per feature: frequency, mean activation, top label and its selectivity, top cells.

    ``frequency`` is the fraction of tokens the feature is active on; ``mean_activation`` is
    its mean code over those tokens. The top label is the (column, value) with the highest avg
    selectivity over the chosen columns. ``top_tokens`` are row numbers into ``table``.
    ``stains`` (one row per feature, e.g. :func:`stain_table`) adds its columns.
    """
    csr = _csr(codes)
    n, m = csr.shape
    counts = np.bincount(csr.indices, minlength=m)
    sums = np.bincount(csr.indices, weights=csr.data, minlength=m)
    out = pd.DataFrame(
        {
            "feature": np.arange(m),
            "n_active": counts,
            "frequency": counts / max(n, 1),
            "mean_activation": np.divide(sums, counts, out=np.zeros(m), where=counts > 0),
        }
    )
    if columns:
        if selectivities is None:
            selectivities = {c: selectivity(csr, table[c].to_numpy(), c) for c in columns}
        best_s = np.full(m, -np.inf)
        best_col = np.full(m, "", dtype=object)
        best_val = np.full(m, "", dtype=object)
        best_max = np.full(m, np.nan)
        for col in columns:
            s = selectivities[col]
            i = s.avg.argmax(0)
            v = s.avg[i, np.arange(m)]
            better = v > best_s
            best_s[better] = v[better]
            best_col[better] = col
            best_val[better] = np.asarray(s.values, dtype=object)[i[better]]
            best_max[better] = s.max[i, np.arange(m)][better]
        out["top_column"] = best_col
        out["top_label"] = best_val
        out["selectivity_avg"] = best_s
        out["selectivity_max"] = best_max
    if stains is not None:
        if len(stains) != m:
            raise DictionaryError(f"stain attribution for {len(stains)} features, codes have {m}")
        for c in stains.columns:
            out[c] = stains[c].to_numpy()
    out["top_tokens"] = [r.tolist() for r in top_tokens(csr, top_n)]
    return out


# --- concept profiles: which perturbations switch a feature on, well by well ---------------

#: z above which a well counts as switching a feature on.
Z_THRESHOLD = 2.0
#: A hit needs more than this fraction of its wells above the threshold (a majority).
HIT_FRACTION = 0.5
#: A hit needs at least this many wells, so that one odd well cannot make one.
MIN_WELLS = 2
#: The control spread is floored at this fraction of the feature's spread over all wells of the
#: plate, so that a feature silent in every control well does not give infinite z.
SD_FLOOR = 0.1

WELL_KEYS = ("plate", "well")


@dataclass
class ConceptProfiles:
    """Per-well mean activation of every feature, z-scored against the control wells of the
    same plate, summarised per value of one label column (docs/architecture.md, "Concept
    profiles").

    A well is the cells of one (plate, well) with one value of the column. Its z for feature f
    is ``(mean_f(well) - mean_f(controls)) / sd_f(controls)``, both over the control wells of
    its plate, the spread floored at ``SD_FLOOR`` times the feature's spread over all wells of
    that plate. A value's profile is the median of its wells' z, with the fraction of its wells
    above ``threshold`` as the consistency measure.

    Calibration: each control well is also z-scored against the plate's other control wells;
    how often those exceed the threshold (:attr:`control_exceed`) says how many hits a value
    with no effect would get by chance (:meth:`chance_hits`). With a few control wells that mix
    conditions (e.g. cell types) it is far above the ~2 % of a normal tail, and the report says
    so rather than let such hits pass for findings.
    """

    column: str
    control: tuple[str, str]
    threshold: float
    values: list[str]  # V label values, sorted
    n_wells: np.ndarray  # (V,)
    median_z: np.ndarray  # (V, M)
    mean_z: np.ndarray  # (V, M)
    fraction_above: np.ndarray  # (V, M) fraction of the value's wells with z > threshold
    wells: pd.DataFrame  # W rows: plate, well, value, n_cells, is_control
    well_z: np.ndarray  # (W, M)
    skipped_plates: list[str]  # plates without control wells, left out
    # share of (control well, feature) pairs with z above threshold when each control well is
    # z-scored against the other control wells of its plate (NaN: no plate has 3 or more)
    control_exceed: float = float("nan")

    @property
    def n_features(self) -> int:
        return int(self.median_z.shape[1])

    def chance_hits(self, n_wells: int) -> float:
        """Hits a value with ``n_wells`` wells and no effect at all would get by chance, over
        all features: each of its wells exceeds the threshold as often as a held-out control
        well does (:attr:`control_exceed`), and the hit rule asks for a majority."""
        from scipy.stats import binom

        n = int(n_wells)
        if n < MIN_WELLS or not np.isfinite(self.control_exceed):
            return float("nan")
        need = int(np.floor(n * HIT_FRACTION)) + 1
        return float(self.n_features * binom.sf(need - 1, n, self.control_exceed))

    def hit_mask(self, min_wells: int = MIN_WELLS) -> np.ndarray:
        """(V, M) True where a majority of at least ``min_wells`` wells have z above threshold."""
        enough = (self.n_wells >= int(min_wells))[:, None]
        return enough & (self.fraction_above > HIT_FRACTION)

    def table(self, min_wells: int = MIN_WELLS) -> pd.DataFrame:
        """Long form: one row per (value, feature) with median and mean z, consistency, hit."""
        v, m = self.median_z.shape
        above = np.rint(self.fraction_above * self.n_wells[:, None]).astype(np.int64)
        return pd.DataFrame(
            {
                "column": self.column,
                "value": np.repeat(np.asarray(self.values, dtype=object), m),
                "feature": np.tile(np.arange(m), v),
                "n_wells": np.repeat(self.n_wells, m),
                "median_z": self.median_z.ravel(),
                "mean_z": self.mean_z.ravel(),
                "wells_above": above.ravel(),
                "fraction_above": self.fraction_above.ravel(),
                "hit": self.hit_mask(min_wells).ravel(),
            }
        )

    def hits(self, min_wells: int = MIN_WELLS) -> pd.DataFrame:
        """The (value, feature) pairs that switch a feature on, strongest median z first."""
        t = self.table(min_wells)
        t = t[t["hit"]].drop(columns="hit")
        return t.sort_values(["median_z", "value", "feature"], ascending=[False, True, True])

    def frame(self) -> pd.DataFrame:
        """Median z as a (features x values) frame, for AnnData ``.varm``."""
        return pd.DataFrame(
            self.median_z.T.astype(np.float32),
            index=pd.Index([str(f) for f in range(self.n_features)]),
            columns=[str(v) for v in self.values],
        )


def well_means(codes, table: pd.DataFrame, column: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Mean code of every feature over the tokens of each (plate, well, value of ``column``).

    Returns the well table (plate, well, value, n_cells) and a dense (W, M) array.
    """
    require_columns(table, [*WELL_KEYS, column], "concept profiles")
    csr = _csr(codes)
    keys = pd.DataFrame(
        {
            "plate": table["plate"].astype(str).to_numpy(),
            "well": table["well"].astype(str).to_numpy(),
            "value": table[column].astype(str).to_numpy(),
        }
    )
    group = keys.groupby(["plate", "well", "value"], sort=True).ngroup().to_numpy()
    wells = keys.groupby(["plate", "well", "value"], sort=True).size().rename("n_cells")
    wells = wells.reset_index()
    n = np.bincount(group, minlength=len(wells)).astype(np.float64)
    onehot = sp.csr_matrix(
        (1.0 / n[group], (group, np.arange(len(group)))), shape=(len(wells), csr.shape[0])
    )
    return wells, np.asarray((onehot @ csr).todense(), dtype=np.float64)


def concept_profiles(
    codes,
    table: pd.DataFrame,
    column: str,
    control: str | tuple[str, str],
    *,
    threshold: float = Z_THRESHOLD,
) -> ConceptProfiles:
    """:class:`ConceptProfiles` of ``column``, z-scored against the ``control`` wells
    (``COLUMN=VALUE`` or a pair) of each plate.

    Plates without a control well are left out (named in ``skipped_plates``); none with one is
    an error naming the control.
    """
    from .dictionary.whiten import parse_control

    ccol, cval = parse_control(control) if isinstance(control, str) else control
    require_columns(table, [ccol], "the control wells of concept profiles")
    wells, means = well_means(codes, table, column)
    # a well is a control well when its cells are controls (the control column may differ)
    is_ctrl = table[ccol].astype(str).to_numpy() == str(cval)
    ctrl_keys = pd.DataFrame(
        {"plate": table["plate"].astype(str), "well": table["well"].astype(str), "c": is_ctrl}
    )
    ctrl_wells = ctrl_keys.groupby(["plate", "well"])["c"].mean() > 0.5
    wells["is_control"] = [
        bool(ctrl_wells.get((p, w), False))
        for p, w in zip(wells["plate"], wells["well"], strict=True)
    ]

    def zscore(values, ctrl_means, floor):
        mu = ctrl_means.mean(0)
        sd = ctrl_means.std(0, ddof=1) if len(ctrl_means) > 1 else np.zeros(means.shape[1])
        return (values - mu) / np.maximum(np.maximum(sd, floor), 1e-12)

    z = np.full_like(means, np.nan)
    skipped = []
    held_out = []  # z of each control well against the plate's other control wells
    for plate, idx in wells.groupby("plate", sort=True).groups.items():
        idx = np.asarray(idx)
        ctrl = idx[wells.loc[idx, "is_control"].to_numpy()]
        if ctrl.size == 0:
            skipped.append(str(plate))
            continue
        floor = SD_FLOOR * means[idx].std(0)
        z[idx] = zscore(means[idx], means[ctrl], floor)
        if ctrl.size >= 3:
            for i in range(ctrl.size):
                rest = np.delete(ctrl, i)
                held_out.append(zscore(means[ctrl[i]], means[rest], floor))
    if len(skipped) == wells["plate"].nunique():
        raise DictionaryError(
            f"no control wells ({ccol}={cval}) on any plate; concept profiles need them"
        )
    keep = ~np.isnan(z[:, 0]) if z.shape[1] else np.ones(len(wells), bool)
    wells, z = wells[keep].reset_index(drop=True), z[keep]
    values = sorted(wells["value"].unique())
    vi = wells["value"].map({v: i for i, v in enumerate(values)}).to_numpy()
    n_wells = np.bincount(vi, minlength=len(values))
    m = z.shape[1]
    median = np.zeros((len(values), m))
    mean = np.zeros((len(values), m))
    frac = np.zeros((len(values), m))
    for i in range(len(values)):
        zi = z[vi == i]
        median[i] = np.median(zi, 0)
        mean[i] = zi.mean(0)
        frac[i] = (zi > threshold).mean(0)
    return ConceptProfiles(
        column,
        (ccol, str(cval)),
        float(threshold),
        values,
        n_wells,
        median,
        mean,
        frac,
        wells,
        z,
        skipped,
        float((np.asarray(held_out) > threshold).mean()) if held_out else float("nan"),
    )


#: Columns of the token table that describe a cell or where it was imaged, not its well: left
#: out of the ``Metadata_*`` columns of well profiles.
CELL_COLUMNS = (
    "plate",
    "well",
    "site",
    "label",
    "site_id",
    "centroid_y",
    "centroid_x",
    "area",
    "token",
    "row",
    "col",
)


def feature_column(feature: int, n_features: int) -> str:
    """A feature's column name in a profile table: ``Feature_0007`` (zero-padded to sort)."""
    return f"Feature_{int(feature):0{max(4, len(str(max(n_features - 1, 0))))}d}"


def well_profiles(codes, table: pd.DataFrame) -> pd.DataFrame:
    """Well-level profiles in pycytominer's layout: ``Metadata_Plate``, ``Metadata_Well``, the
    well's metadata columns as ``Metadata_<column>`` (those with one value per well), the
    number of cells (``Metadata_Cell_Count``), then the mean code of every feature over the
    well's cells (0 where inactive) as ``Feature_NNNN``.

    pycytominer's ``normalize``/``feature_select`` take it as is (``features="infer"`` needs the
    ``Feature_`` prefix passed as ``features=[...]``; see the README), so the codes go straight
    into the field's profiling pipelines.
    """
    require_columns(table, list(WELL_KEYS), "well profiles")
    csr = _csr(codes)
    keys = pd.DataFrame(
        {
            "plate": table["plate"].astype(str).to_numpy(),
            "well": table["well"].astype(str).to_numpy(),
        }
    )
    group = keys.groupby(["plate", "well"], sort=True).ngroup().to_numpy()
    wells = keys.groupby(["plate", "well"], sort=True).size().rename("n").reset_index()
    n = wells["n"].to_numpy(np.float64)
    onehot = sp.csr_matrix(
        (1.0 / n[group], (group, np.arange(len(group)))), shape=(len(wells), csr.shape[0])
    )
    means = np.asarray((onehot @ csr).todense(), dtype=np.float32)
    out = pd.DataFrame({"Metadata_Plate": wells["plate"], "Metadata_Well": wells["well"]})
    for c in table.columns:
        if c in CELL_COLUMNS or c.startswith("Metadata_") or not _one_per_well(table[c], group):
            continue
        first = pd.Series(table[c].to_numpy()).groupby(group).first()
        out[f"Metadata_{c}"] = first.to_numpy()
    out["Metadata_Cell_Count"] = wells["n"].to_numpy(np.int64)
    m = csr.shape[1]
    feats = pd.DataFrame(means, columns=[feature_column(f, m) for f in range(m)])
    return pd.concat([out, feats], axis=1)


def _one_per_well(values: pd.Series, group: np.ndarray) -> bool:
    """Whether a column holds one value per well (a well's metadata, not a cell's measure)."""
    if pd.api.types.is_float_dtype(values) and values.nunique(dropna=False) > group.max() + 1:
        return False
    per = pd.Series(values.astype(str).to_numpy()).groupby(group).nunique()
    return bool((per <= 1).all())


def codes_anndata(
    codes,
    obs: pd.DataFrame,
    features: pd.DataFrame | None = None,
    meta=None,
    profiles: Sequence[ConceptProfiles] = (),
):
    """AnnData with the codes as sparse X (tokens x features), the token table as obs.

    Each :class:`ConceptProfiles` lands in ``.varm["profile_<column>"]`` (features x values,
    median z) and ``.uns["profiles"][column]`` (control, threshold, wells per value, hits).
    """
    import anndata as ad

    obs = obs.reset_index(drop=True).copy()
    obs.index = obs.index.astype(str)
    for c in obs.columns:
        if obs[c].dtype == object:
            obs[c] = obs[c].astype(str)
    var = None
    if features is not None:
        var = features.drop(columns=["top_tokens"], errors="ignore").copy()
        for c in var.columns:
            if var[c].dtype == object:
                lists = var[c].map(lambda v: isinstance(v, list | tuple | np.ndarray))
                if lists.any():  # e.g. top_measurements: "a; b; c" (h5ad holds no lists)
                    var[c] = [
                        "; ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in v)
                        if isinstance(v, list | tuple | np.ndarray)
                        else str(v)
                        for v in var[c]
                    ]
                var[c] = var[c].astype(str)
        var.index = pd.Index(var["feature"].astype(str).to_numpy(), name=None)
    adata = ad.AnnData(X=_csr(codes).astype(np.float32), obs=obs, var=var)
    if features is not None:
        stain_cols = [c for c in features.columns if c.startswith("stain_")]
        if stain_cols:  # the (M, C) attribution as one matrix too, named in uns
            adata.varm["stain_attribution"] = features[stain_cols].to_numpy(np.float64)
            adata.uns["stain_names"] = [c[len("stain_") :] for c in stain_cols]
    if meta:
        import json

        adata.uns["dictionary"] = json.dumps(meta, sort_keys=True, default=str)
    if profiles:
        adata.uns["profiles"] = {}
    for prof in profiles:
        frame = prof.frame()
        frame.index = adata.var_names
        adata.varm[f"profile_{prof.column}"] = frame
        hits = prof.hits()
        adata.uns["profiles"][prof.column] = {
            "control": "=".join(prof.control),
            "threshold": prof.threshold,
            "values": np.asarray(prof.values, dtype=str),
            "n_wells": prof.n_wells.astype(np.int64),
            "skipped_plates": np.asarray(prof.skipped_plates, dtype=str),
            "control_exceed": float(prof.control_exceed),
            "hit_value": hits["value"].to_numpy(dtype=str),
            "hit_feature": hits["feature"].to_numpy(np.int64),
            "hit_median_z": hits["median_z"].to_numpy(np.float64),
        }
    return adata


def _h5ad_bytes(adata) -> int:
    """About how many bytes ``write_h5ad`` writes for ``adata`` (uncompressed, as written)."""
    x = adata.X
    total = sum(int(getattr(x, a).nbytes) for a in ("data", "indices", "indptr") if hasattr(x, a))
    for frame in (adata.obs, adata.var):
        total += int(frame.memory_usage(index=True, deep=True).sum())
    for key in adata.varm.keys():
        value = adata.varm[key]
        total += int(
            value.memory_usage(deep=True).sum()
            if hasattr(value, "memory_usage")
            else np.asarray(value).nbytes
        )
    return total + len(str(dict(adata.uns)))


def join_feature_columns(features: pd.DataFrame, extra: pd.DataFrame) -> pd.DataFrame:
    """``features`` with the columns of ``extra`` (keyed by ``feature``) after its own; features
    that ``extra`` does not name get empty strings (text) or NaN."""
    cols = [c for c in extra.columns if c != "feature" and c not in features.columns]
    out = features.merge(extra[["feature", *cols]], on="feature", how="left")
    for c in cols:
        if extra[c].dtype == object:
            out[c] = out[c].fillna("")
    return out


def check_analysis_folder(out_dir: str | Path) -> Path:
    """Refuse an output folder that cannot be written or that holds any file this package did
    not write there as an analysis (:func:`._files.check_not_foreign`): an analysis replaces
    its folder whole, so a folder of other files must never be taken for one."""
    from .store import refuse_inside_store

    out = check_not_foreign(
        out_dir, marker=ANALYSIS_MARKER, what="analysis folder", kind="an analysis"
    )
    refuse_inside_store(out, "analysis folder", OutputError)
    return out


def write_analysis(
    out_dir: str | Path,
    codes,
    table: pd.DataFrame,
    columns: Sequence[str] = (),
    *,
    meta: dict | None = None,
    truth_columns: Sequence[str] = (),
    top_n: int = 10,
    controls: str | None = None,
    stains: pd.DataFrame | None = None,
    named: pd.DataFrame | None = None,
) -> dict[str, Path]:
    """Write features.parquet, codes.parquet (long form), selectivity tables, codes.h5ad and
    well_profiles.csv (:func:`well_profiles`, pycytominer's layout; cell tokens only).

    The files are written into a folder beside ``out_dir`` that replaces it once all are
    written, so a failure leaves an earlier analysis whole rather than a mix of old and new.
    With ``controls`` (COLUMN=VALUE) also the concept profiles of every label column but the
    control column: profiles.parquet (long form, one row per value and feature) and the AnnData
    fields. ``stains`` (:func:`stain_table`) adds each feature's stain attribution to the
    feature table and to the AnnData (``var`` columns and ``varm["stain_attribution"]``).
    ``named`` (one row per feature: columns such as ``name``, ``note``, ``description``) is
    joined onto the feature table by ``feature``, so the AnnData ``.var`` carries it too.
    """
    out = check_analysis_folder(out_dir)
    csr = _csr(codes)
    names: dict[str, str] = {}
    with atomic_dir(out) as tmp:
        sels = None
        if columns:
            best, counts, sels = selectivity_report(csr, table, columns)
            atomic_parquet(best, tmp / "selectivity.parquet")
            atomic_parquet(counts, tmp / "selectivity_counts.parquet")
            names.update(
                selectivity="selectivity.parquet", selectivity_counts=("selectivity_counts.parquet")
            )
        features = feature_table(
            csr, table, columns, top_n=top_n, selectivities=sels, stains=stains
        )
        if named is not None:
            features = join_feature_columns(features, named)
        names["features"] = "features.parquet"
        atomic_parquet(features, tmp / names["features"])
        coo = csr.tocoo()
        long = pd.DataFrame(
            {
                "token": coo.row.astype(np.int64),
                "feature": coo.col.astype(np.int32),
                "code": coo.data,
            }
        )
        names["codes"] = "codes.parquet"
        atomic_parquet(long, tmp / names["codes"])
        names["tokens"] = "tokens.parquet"
        with atomic_path(tmp / names["tokens"]) as t:
            table.reset_index(drop=True).to_parquet(t, index=True)
        if truth_columns:
            aurocs = concept_auroc(csr, table, truth_columns)
            names["concepts"] = "concepts.parquet"
            atomic_parquet(aurocs, tmp / names["concepts"])
        profiles = []
        if controls:
            control_column = controls.partition("=")[0].strip()
            profiles = [
                concept_profiles(csr, table, c, controls) for c in columns if c != control_column
            ]
        if profiles:
            names["profiles"] = "profiles.parquet"
            atomic_parquet(
                pd.concat([p.table() for p in profiles], ignore_index=True),
                tmp / names["profiles"],
            )
        if {"plate", "well", "label"} <= set(table.columns):  # cells, not patches or crops
            names["well_profiles"] = "well_profiles.csv"
            with atomic_path(tmp / names["well_profiles"]) as t:
                well_profiles(csr, table).to_csv(t, index=False)
        names["h5ad"] = "codes.h5ad"
        adata = codes_anndata(csr, table, features, meta, profiles)
        check_free_space(tmp, _h5ad_bytes(adata), what=f"{out / names['h5ad']}")
        with atomic_path(tmp / names["h5ad"]) as t:
            adata.write_h5ad(t)
        import json

        atomic_write_text(
            tmp / ANALYSIS_MARKER,
            json.dumps({"files": names, "dictionary": meta or {}}, default=str, sort_keys=True),
        )
    return {key: out / name for key, name in names.items()}
