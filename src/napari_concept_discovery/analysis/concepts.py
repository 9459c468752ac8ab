"""Reading dictionary features as concepts: selectivity, ground-truth AUROC, feature tables.

Inputs are codes as a sparse matrix (tokens x features; a feature is active on a token when its
code is non-zero) and a table with one row per token. Everything is vectorised over features
through sparse products, so N ~ 1e5 tokens and M ~ 8192 features take seconds.

Selectivity of feature f for value i of a column (the paper's two forms; docs/architecture.md, "Dictionaries"):
avg = P(active | i) - P(active | not i); max = P(active | i) - max over other values j of
P(active | j).

Which stains drive a feature (for a dictionary on concatenated channel tokens) is each atom's
share per channel block (``dictionary.stains``, applied through the dictionary's
``stain_attribution``). Ground truth, profiles and the written tables are in ``truth``,
``profiles`` and ``write`` beside this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import DictionaryError

THRESHOLDS = (0.5, 0.2)


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


def require_columns(table: pd.DataFrame, columns: Sequence[str], purpose: str) -> None:
    """Refuse ``columns`` that ``table`` lacks, naming them, their purpose and the columns there are."""
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DictionaryError(
            f"no column {', '.join(map(repr, missing))} for {purpose}; "
            f"columns are {list(table.columns)}"
        )


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
