"""A well-level test of every feature against the control wells, so that a perturbation that
changes nothing has no significant feature.

Cells of one well are not independent samples (they share the well's plating, staining and
imaging), so the unit of the test is the well: each feature's mean code per well. For a label
value v and feature f the statistic is the difference between v's wells and the control wells
of the same plate, averaged over plates (weighted by v's wells on each):

    t_f = sum_p (n_vp / n_v) (mean of v's wells on p - mean of the control wells on p)

The null distribution comes from permuting the labels of v's wells and the control wells within
each plate (``n_perm`` times, seeded), so plate effects cancel. With a handful of wells a
feature's own permutations take few distinct values, far too few to survive a correction over
thousands of features; so each feature's statistic is standardised by its own permutation
spread and its p-value is read against the permuted statistics of every feature together (a
pooled null: p = (1 + #pooled |z| >= |z_f|) / (1 + pooled count)). Two-sided. p-values of all
values and features of a column are corrected together with Benjamini-Hochberg, and a
(value, feature) is significant where q <= ``alpha``.
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
    """Per well: +w_p / n_vp for v's wells, -w_p / n_cp for control wells (w_p = n_vp / n_v),
    so that ``weights @ means`` is the plate-averaged difference."""
    out = np.zeros(len(labels))
    n_v = labels.sum()
    for p in np.unique(plates):
        on = plates == p
        nv, nc = int((labels & on).sum()), int((~labels & on).sum())
        if nv == 0 or nc == 0:
            continue
        out[labels & on] = (nv / n_v) / nv
        out[~labels & on] = -(nv / n_v) / nc
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
    ``n_control_wells``, ``effect`` (the statistic), ``z`` (over its permutation spread),
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
        effect = _weights(labels, pl) @ x
        perm = np.empty((n_perm, m))
        shuffled = labels.copy()
        for b in range(n_perm):
            for p in shared:  # permute v / control labels within each plate
                idx = np.flatnonzero(pl == p)
                shuffled[idx] = labels[idx][rng.permutation(idx.size)]
            perm[b] = _weights(shuffled, pl) @ x
        sd = perm.std(0)
        moves = sd > 0  # a feature the permutations cannot move (silent) has z 0, p 1
        z_obs.append(np.where(moves, effect / np.where(moves, sd, 1.0), 0.0))
        pooled.append(np.abs(perm[:, moves] / sd[moves]).ravel())
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
                "z",
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
            "z": z.ravel(),
            "p_value": p.ravel(),
            "q_value": q.ravel(),
            "significant": (q <= alpha).ravel(),
        }
    )
