"""A well-level test of every feature against the control wells, so that a perturbation that
changes nothing has no significant feature.

Cells of one well are not independent samples (they share the well's plating, staining and
imaging), so the unit of the test is the well: each feature's mean code per well. Within each
plate, the wells of a label value v and the plate's control wells are ranked by that mean
(ties broken at random, seeded), and the statistic is the difference of the mean rank of v's
wells and of the control wells, as a fraction of the plate's wells, averaged over plates
weighted by v's wells on each (a stratified rank-sum test):

    t_f = sum_p (n_vp / n_v) (mean rank of v's wells on p - mean rank of the controls on p) / n_p

The null distribution comes from permuting the labels of v's wells and the control wells within
each plate (``n_perm`` times), so plate effects cancel. Because the statistic uses ranks with
no ties, its null distribution is the same for every feature (it depends on the wells alone),
so the permuted statistics of all features together estimate it (M x ``n_perm`` draws), and a
feature's p-value is read against that pool: p = (1 + #pooled |t| >= |t_f|) / (1 + pool).
This is what makes the test valid for sparse features whose well means are dominated by one
odd well: on the raw means, standardising each feature by its own permutation spread and
pooling called 28-53 features of a null perturbation significant on 4 plates
(benchmarks/results/bench_scales.txt); on ranks a single odd well can move t no further than any
other well. The price is resolution: with w wells per plate, no p-value falls below about the
chance of the most extreme arrangement, so a value with one well per plate is never
significant over hundreds of features; replicate wells are what give the test power.
Two-sided. p-values of all values and features of a column are corrected together with
Benjamini-Hochberg, and a (value, feature) is significant where q <= ``alpha``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: The false discovery rate a significant (value, feature) is held to.
FDR_ALPHA = 0.05
#: Label permutations per value (each gives one permuted statistic for every feature).
N_PERMUTATIONS = 1000


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values of p-values (any shape; NaN stays NaN)."""
    p = np.asarray(p, dtype=np.float64)
    flat = p.ravel()
    ok = np.flatnonzero(np.isfinite(flat))
    q = np.full(flat.shape, np.nan)
    if ok.size:
        order = ok[np.argsort(flat[ok], kind="stable")]
        ranked = flat[order] * ok.size / np.arange(1, ok.size + 1)
        q[order] = np.minimum(np.minimum.accumulate(ranked[::-1])[::-1], 1.0)
    return q.reshape(p.shape)


def _weights(labels: np.ndarray, plates: np.ndarray) -> np.ndarray:
    """Per well: +w_p / (n_vp n_p) for v's wells, -w_p / (n_cp n_p) for control wells
    (w_p = n_vp / n_v), so that ``weights @ ranks`` is the statistic of the module docstring."""
    out = np.zeros(len(labels))
    n_v = labels.sum()
    for p in np.unique(plates):
        on = plates == p
        nv, nc = int((labels & on).sum()), int((~labels & on).sum())
        if nv == 0 or nc == 0:
            continue
        out[labels & on] = (nv / n_v) / nv / (nv + nc)
        out[~labels & on] = -(nv / n_v) / nc / (nv + nc)
    return out


def _plate_ranks(x: np.ndarray, plates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Ranks (0, 1, ...) of each column of ``x`` within each plate, ties broken at random."""
    out = np.empty_like(x)
    for p in np.unique(plates):
        idx = np.flatnonzero(plates == p)
        block = x[idx]
        shuffle = np.argsort(rng.random(block.shape), axis=0)  # a random order first...
        by_value = np.argsort(np.take_along_axis(block, shuffle, 0), axis=0, kind="stable")
        order = np.take_along_axis(shuffle, by_value, 0)  # ...then sorted by value, stably
        ranks = np.empty_like(block)
        np.put_along_axis(ranks, order, np.arange(len(idx), dtype=x.dtype)[:, None], 0)
        out[idx] = ranks
    return out


def _mean_difference(x: np.ndarray, labels: np.ndarray, plates: np.ndarray) -> np.ndarray:
    """Per feature: v's wells' mean code minus the control wells', per plate, averaged over
    plates weighted by v's wells on each (the effect in the codes' own units)."""
    out = np.zeros(x.shape[1])
    n_v = labels.sum()
    for p in np.unique(plates):
        on = plates == p
        if (labels & on).any() and (~labels & on).any():
            diff = x[labels & on].mean(0) - x[~labels & on].mean(0)
            out += (labels & on).sum() / n_v * diff
    return out


def well_test(
    means: np.ndarray,
    wells: pd.DataFrame,
    *,
    n_perm: int = N_PERMUTATIONS,
    seed: int = 0,
    alpha: float = FDR_ALPHA,
    column: str = "",
) -> pd.DataFrame:
    """The well-level test of every non-control value of ``wells["value"]`` against the wells
    with ``wells["is_control"]``, on ``means`` (W wells x M features, the mean code per well).

    ``wells`` needs ``plate``, ``value`` and ``is_control``. Only plates holding both the value's
    wells and control wells take part. Returns one row per (value, feature): ``n_wells``,
    ``n_control_wells``, ``effect`` (difference of mean codes, value minus controls, averaged
    over plates), ``rank_difference`` (the test's statistic, in [-1, 1]),
    ``p_value``, ``q_value`` (Benjamini-Hochberg over the whole column) and ``significant``.
    """
    means = np.asarray(means, dtype=np.float64)
    m = means.shape[1]
    plates = wells["plate"].astype(str).to_numpy()
    values = wells["value"].astype(str).to_numpy()
    ctrl = wells["is_control"].to_numpy(bool)
    rng = np.random.default_rng(seed)
    rows, z_obs, pooled = [], [], []
    for v in sorted(set(values[~ctrl])):
        mine = (values == v) & ~ctrl
        shared = np.intersect1d(plates[mine], plates[ctrl])
        take = np.flatnonzero((mine | ctrl) & np.isin(plates, shared))
        labels, pl = mine[take], plates[take]
        if not labels.any():
            continue
        x = means[take]
        ranks = _plate_ranks(x, pl, rng)
        effect = _mean_difference(x, labels, pl)
        perm = np.empty((n_perm, m))
        shuffled = labels.copy()
        for b in range(n_perm):
            for p in shared:  # permute v / control labels within each plate
                idx = np.flatnonzero(pl == p)
                shuffled[idx] = labels[idx][rng.permutation(idx.size)]
            perm[b] = _weights(shuffled, pl) @ ranks
        z_obs.append(_weights(labels, pl) @ ranks)
        pooled.append(np.abs(perm).ravel())
        rows.append((v, int(labels.sum()), int((~labels).sum()), effect))
    if not rows:
        return pd.DataFrame(
            columns=[
                "column",
                "value",
                "feature",
                "n_wells",
                "n_control_wells",
                "effect",
                "rank_difference",
                "p_value",
                "q_value",
                "significant",
            ]
        )
    null = np.sort(np.concatenate(pooled))
    z = np.vstack(z_obs)
    beyond = null.size - np.searchsorted(null, np.abs(z) - 1e-12, side="left")
    p = (1.0 + beyond) / (1.0 + null.size)
    q = benjamini_hochberg(p)
    n_val = len(rows)
    return pd.DataFrame(
        {
            "column": column,
            "value": np.repeat([r[0] for r in rows], m),
            "feature": np.tile(np.arange(m), n_val),
            "n_wells": np.repeat([r[1] for r in rows], m),
            "n_control_wells": np.repeat([r[2] for r in rows], m),
            "effect": np.concatenate([r[3] for r in rows]),
            "rank_difference": z.ravel(),
            "p_value": p.ravel(),
            "q_value": q.ravel(),
            "significant": (q <= alpha).ravel(),
        }
    )
