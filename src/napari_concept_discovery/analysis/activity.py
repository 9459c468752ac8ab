"""Phenotypic activity: how well the replicate wells of each perturbation retrieve each other
against the control wells, scored with ``copairs`` mean average precision (mAP), the field's
retrieval metric (Kalinin et al., Nat. Commun. 2025; the JUMP Cell Painting consortium).

It is computed the same way for any per-cell matrix, so raw tokens, dictionary codes and
CellProfiler measurements (:mod:`.measurements`) are compared on one scale:

1. Well profiles: the mean of the per-cell vectors of each (plate, well, label value), as
   the profiles step does (NaN cells, e.g. cells cp-measure did not sample, are left out of
   their well's mean; a feature with no finite value in some well is dropped).
2. Standardised against the controls of each plate: the field's robust z-score (pycytominer's
   ``mad_robustize``), ``(x - median of the plate's control wells) / (1.4826 x their MAD)``,
   the spread floored at :data:`SCALE_FLOOR` times the feature's standard deviation over all
   wells of the plate, so a feature silent in every control well (common for sparse codes)
   does not divide by zero; a feature constant over a plate is 0 there.
3. copairs' phenotypic-activity setup, cosine similarity of the standardised profiles: each
   non-control well ranks the other wells of its label value (positives) against the control
   wells (negatives); wells of two different values are never paired. With more than one
   plate, both a well's positives and its negatives are taken on the *other* plates only
   (``across_plates``); with one plate, on that plate. A value's mAP is the mean of its
   wells' average precision; its p-value comes from copairs' null of random rankings with the
   same numbers of positives and negatives (``null_size`` draws from ``seed``), and its
   q-value from Benjamini-Hochberg over the column's values (copairs'
   ``mean_average_precision``).

``random_map`` is the mAP a random ranking gives on average (copairs' exact expected AP per
well, averaged), the baseline an inactive perturbation sits at.

Why across plates: the treated wells of a plate are all centred on the same control median,
so they share its estimation error and resemble each other more than they resemble the
plate's controls (which pulled the median towards themselves); and wells of one plate share
its per-feature scales, which widens their similarities. Either one makes a ranking that mixes
same-plate and other-plate wells unfair. Measured on null wells of the generator in
tests/analysis/test_activity.py (24 seeds, 16 null wells each, two plates), null mAP minus
the random baseline: pairs on any plate +0.069 +- 0.008 with 4 control wells per plate and
+0.022 +- 0.006 with 16; positives and negatives both on other plates -0.010 +- 0.011 and
-0.014 +- 0.008. On one plate the first bias remains (about +0.06 with 4-6 control wells,
+0.01 with 16): few control wells make every value look slightly active there, which the
p-values, read against random rankings, do not know.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..dictionary.control import parse_control
from ..errors import DataWarning, DictionaryError
from .concepts import require_columns
from .profiles import well_index

#: Draws of copairs' null distribution per (positives, total) configuration: p-values are
#: resolved down to 1 / (NULL_SIZE + 1).
NULL_SIZE = 10000
#: q-value at or below which a perturbation counts as active.
FDR_ALPHA = 0.05
#: The control spread of a feature is floored at this fraction of its spread over all wells of
#: the plate (as the concept profiles floor theirs).
SCALE_FLOOR = 0.1
#: MAD to standard deviation for normal data (pycytominer's ``mad_robustize``).
MAD_SCALE = 1.4826
#: Rows of the per-cell matrix read at a time (a zarr array of tokens is streamed).
BLOCK = 8192

KEYS = ("plate", "well")
RESULT_COLUMNS = (
    "value",
    "n_wells",
    "mean_average_precision",
    "random_map",
    "p_value",
    "q_value",
    "active",
)


def well_groups(table: pd.DataFrame, label: str, control: str | tuple[str, str]) -> tuple:
    """The wells of ``table``'s cells: a (W,) group index per cell and the well table (plate,
    well, value, n_cells, is_control), one row per (plate, well, value of ``label``), sorted.
    A well is a control well when most of its cells match ``control`` (COLUMN=VALUE)."""
    ccol, cval = parse_control(control)
    require_columns(table, [*KEYS, label], "phenotypic activity")
    require_columns(table, [ccol], f"the control wells ({ccol}={cval}) of phenotypic activity")
    group, wells = well_index(table, label)
    is_ctrl = pd.Series(table[ccol].astype(str).to_numpy() == str(cval))
    share = is_ctrl.groupby(group).mean().to_numpy()
    wells["is_control"] = share > 0.5
    return group, wells


def well_means(values, group: np.ndarray, n_wells: int) -> np.ndarray:
    """(W, D) mean of the rows of ``values`` (N, D: dense, sparse or a zarr array, read in
    blocks of :data:`BLOCK` rows) per group; non-finite entries are left out of their well's
    mean, and a (well, feature) without a finite entry is NaN."""
    n = int(values.shape[0])
    if n != len(group):
        raise DictionaryError(
            f"phenotypic activity: the per-cell matrix has {n} rows but the cell table "
            f"{len(group)}; they must describe the same cells in the same order"
        )
    d = int(values.shape[1])
    sums = np.zeros((n_wells, d))
    counts = np.zeros((n_wells, d))
    for lo in range(0, n, BLOCK):
        hi = min(lo + BLOCK, n)
        g = group[lo:hi]
        onehot = sp.csr_matrix((np.ones(hi - lo), (g, np.arange(hi - lo))), (n_wells, hi - lo))
        block = values[lo:hi]
        if sp.issparse(block):
            block = sp.csr_matrix(block, dtype=np.float64)
            if not np.isfinite(block.data).all():
                raise DictionaryError("phenotypic activity: the codes hold NaN or Inf")
            sums += np.asarray((onehot @ block).todense())
            counts += np.asarray(onehot.sum(1))
            continue
        block = np.asarray(block, dtype=np.float64)
        finite = np.isfinite(block)
        sums += onehot @ np.where(finite, block, 0.0)
        counts += onehot @ finite.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def robust_z(means: np.ndarray, wells: pd.DataFrame) -> np.ndarray:
    """(W, D) each well's profile as a robust z-score against the control wells of its plate
    (see the module docstring); rows of plates without control wells are NaN."""
    z = np.full_like(means, np.nan)
    for _, idx in wells.groupby("plate", sort=True).groups.items():
        idx = np.asarray(idx)
        ctrl = idx[wells.loc[idx, "is_control"].to_numpy()]
        if ctrl.size:
            z[idx] = _zscore(means[idx], means[ctrl], SCALE_FLOOR * means[idx].std(axis=0))
    return z


def _zscore(x: np.ndarray, ctrl: np.ndarray, floor: np.ndarray) -> np.ndarray:
    """``x`` against the controls ``ctrl``: (x - median) / max(1.4826 MAD, floor); 0 where
    both are 0 (a feature constant over the plate)."""
    centre = np.median(ctrl, axis=0)
    scale = np.maximum(MAD_SCALE * np.median(np.abs(ctrl - centre), axis=0), floor)
    safe = np.where(scale > 0, scale, 1.0)
    return np.where(scale > 0, (x - centre) / safe, 0.0)


def well_profiles(
    values, table: pd.DataFrame, label: str, control: str | tuple[str, str]
) -> tuple[pd.DataFrame, np.ndarray]:
    """The standardised well profiles phenotypic activity ranks: the well table (plate, well,
    value, n_cells, is_control) and (W, D') robust z (features without a finite mean in every
    well dropped; wells of plates without control wells dropped, with a ``DataWarning``)."""
    group, wells = well_groups(table, label, control)
    means = well_means(values, group, len(wells))
    keep_feat = np.isfinite(means).all(axis=0)
    if not keep_feat.any():
        raise DictionaryError(
            f"phenotypic activity of {label!r}: no feature has a finite value in every well"
        )
    means = means[:, keep_feat]
    ccol, cval = parse_control(control)
    plates = wells.groupby("plate")["is_control"].any()
    if not plates.any():
        raise DictionaryError(
            f"phenotypic activity of {label!r}: no control wells ({ccol}={cval}) on any plate"
        )
    missing = sorted(plates.index[~plates])
    if missing:
        warnings.warn(
            f"phenotypic activity of {label!r}: plates {missing} have no control wells "
            f"({ccol}={cval}); their wells are left out",
            DataWarning,
            stacklevel=2,
        )
    z = robust_z(means, wells)
    keep = ~np.isin(wells["plate"].to_numpy(), missing)
    return wells[keep].reset_index(drop=True), z[keep]


def phenotypic_activity(
    values,
    table: pd.DataFrame,
    label: str,
    control: str | tuple[str, str],
    *,
    null_size: int = NULL_SIZE,
    seed: int = 0,
    alpha: float = FDR_ALPHA,
    across_plates: bool | None = None,
) -> pd.DataFrame:
    """Phenotypic activity of every value of ``label`` against the ``control`` wells.

    ``values``: (N, D) per-cell matrix (codes as a sparse matrix, tokens as an array or a zarr
    array, CellProfiler measurements), one row per row of ``table``, which holds ``plate``,
    ``well``, ``label`` and the control column; ``control``: ``COLUMN=VALUE`` (or a pair)
    picking the control wells. Returns one row per value of ``label`` held by non-control
    wells, sorted by value: ``value``, ``n_wells``, ``mean_average_precision``, ``random_map``
    (a random ranking's expected mAP), ``p_value``, ``q_value`` (Benjamini-Hochberg over the
    values) and ``active`` (q <= ``alpha``). A value with a single well has no replicate to
    retrieve: NaN mAP, p and q.

    ``across_plates``: a well's positives and negatives only on other plates than its own
    (True) or on any plate (False); None (the default) takes True when the wells span more
    than one plate. Across plates is the unbiased choice (module docstring); a value whose
    wells are all on one plate then gets NaN.

    Raises ``DictionaryError`` naming ``label`` or the control when no control wells exist or
    no value has two wells (on two plates, when across plates); a missing column is named by
    :func:`.concepts.require_columns`.
    """
    from copairs.map import average_precision, mean_average_precision
    from copairs.map.normalization import expected_ap
    from copairs.matching import assign_reference_index

    wells, z = well_profiles(values, table, label, control)
    ccol, cval = parse_control(control)
    treated = wells[~wells["is_control"]]
    if treated.empty:
        raise DictionaryError(
            f"phenotypic activity of {label!r}: every well is a control well ({ccol}={cval}); "
            "there is nothing to score"
        )
    n_wells = treated.groupby("value").size()
    if int(n_wells.max()) < 2:
        raise DictionaryError(
            f"phenotypic activity of {label!r}: no value has replicate wells (each of "
            f"{len(n_wells)} values is in one well); mAP needs at least two wells of a value"
        )
    # Controls get their own group (-1) and each its own reference index, so they are never
    # positives of anything; a treated well's negatives are exactly the control wells.
    codes = {v: i for i, v in enumerate(sorted(n_wells.index))}
    meta = pd.DataFrame(
        {
            "group": [
                -1 if c else codes[v]
                for v, c in zip(wells["value"], wells["is_control"], strict=True)
            ]
        }
    )
    ref = "reference"
    meta = assign_reference_index(meta, meta.index[wells["is_control"].to_numpy()], ref, -1)
    meta["plate"] = wells["plate"].to_numpy()
    if across_plates is None:
        across_plates = wells["plate"].nunique() > 1
    if across_plates and int(treated.groupby("value")["plate"].nunique().max()) < 2:
        raise DictionaryError(
            f"phenotypic activity of {label!r}: no value has replicate wells on two plates "
            "(replicates are paired across plates only)"
        )
    out = pd.DataFrame({"value": sorted(n_wells.index)})
    out["n_wells"] = out["value"].map(n_wells).astype(np.int64)
    ap = average_precision(
        meta,
        z,
        pos_sameby=["group", ref],
        pos_diffby=["plate"] if across_plates else [],
        neg_sameby=[],
        neg_diffby=["group", ref, "plate"] if across_plates else ["group", ref],
        distance="cosine",
        progress_bar=False,
    )
    ap = ap[ap["group"] >= 0]
    replicated = out["value"].map(codes).isin(set(ap.loc[ap["n_pos_pairs"] > 0, "group"]))
    # copairs caches null distributions on disk (by default in the home folder): keep them in
    # a folder of this call only, so nothing is left behind
    with tempfile.TemporaryDirectory(prefix="copairs-") as cache:
        maps = mean_average_precision(
            ap,
            ["group"],
            null_size=int(null_size),
            threshold=float(alpha),
            seed=int(seed),
            progress_bar=False,
            max_workers=1,
            cache_dir=cache,
        )
    scored = ap[ap["n_pos_pairs"] > 0]
    baseline = [
        expected_ap(int(m), int(t - m))
        for m, t in zip(scored["n_pos_pairs"], scored["n_total_pairs"], strict=True)
    ]
    random_map = pd.Series(baseline, index=scored.index).groupby(scored["group"]).mean()
    by_group = maps.set_index("group")
    group_of = out["value"].map(codes)
    out["mean_average_precision"] = group_of.map(by_group["mean_average_precision"])
    out["random_map"] = group_of.map(random_map)
    out["p_value"] = group_of.map(by_group["p_value"])
    out["q_value"] = group_of.map(by_group["corrected_p_value"])
    for c in ("mean_average_precision", "random_map", "p_value", "q_value"):
        out[c] = out[c].astype(np.float64).where(replicated)
    out["active"] = (out["q_value"] <= alpha).fillna(False).astype(bool)
    return out[list(RESULT_COLUMNS)]


def activity_table(
    sources: Mapping[str, object],
    table: pd.DataFrame,
    columns: Sequence[str],
    control: str | tuple[str, str],
    *,
    null_size: int = NULL_SIZE,
    seed: int = 0,
) -> pd.DataFrame:
    """:func:`phenotypic_activity` of every label column in ``columns`` (the control column
    too, where given: its other values, such as positive controls, are scored against the
    controls), for each per-cell matrix of ``sources`` (name -> matrix, e.g.
    ``{"codes": ..., "tokens": ...}``), in long form: ``features`` (the source's name),
    ``column``, then :data:`RESULT_COLUMNS`. A column that cannot be scored (no replicate
    wells, no controls) is left out with a ``DataWarning`` saying why; empty when none can."""
    parts, said = [], set()
    for column in columns:
        for name, values in sources.items():
            try:
                out = phenotypic_activity(
                    values, table, column, control, null_size=null_size, seed=seed
                )
            except DictionaryError as exc:
                message = f"no phenotypic activity for {name}: {exc}"
                if str(exc) not in said:
                    warnings.warn(message, DataWarning, stacklevel=2)
                said.add(str(exc))
                continue
            out.insert(0, "column", column)
            out.insert(0, "features", name)
            parts.append(out)
    if not parts:
        return pd.DataFrame(columns=["features", "column", *RESULT_COLUMNS])
    return pd.concat(parts, ignore_index=True)


def activity_side_by_side(long: pd.DataFrame) -> pd.DataFrame:
    """:func:`activity_table`'s rows as one row per (column, value): ``n_wells``, then for each
    source its mAP and q-value (``codes mAP``, ``codes q``, ...), then the random baseline."""
    if long.empty:
        return pd.DataFrame(columns=["column", "value", "wells"])
    keys = ["column", "value"]
    out = long.groupby(keys, sort=False)["n_wells"].first().rename("wells").reset_index()
    for name in long["features"].unique():
        part = long[long["features"] == name].set_index(keys)
        index = pd.MultiIndex.from_frame(out[keys])
        out[f"{name} mAP"] = part["mean_average_precision"].reindex(index).to_numpy()
        out[f"{name} q"] = part["q_value"].reindex(index).to_numpy()
    base = long.groupby(keys, sort=False)["random_map"].first()
    out["random mAP"] = base.reindex(pd.MultiIndex.from_frame(out[keys])).to_numpy()
    return out


#: What mAP means, in one sentence, for the CLI and the report.
EXPLANATION = (
    "mAP is copairs' mean average precision: how well each well of a label value finds the other "
    "wells of that value before the control wells (those on other plates, where there are "
    "several), ranking them by cosine similarity of well "
    "profiles robust-z-scored on each plate's controls; 1 means every replicate ranks above "
    "every control, 'random' is what a random ranking gives, and q is the Benjamini-Hochberg "
    "corrected p-value against random rankings"
)


def format_activity(long: pd.DataFrame, alpha: float = FDR_ALPHA) -> str:
    """:func:`activity_side_by_side` as plain text: one line per (column, value), each source's
    mAP with its q-value, ``*`` where q <= ``alpha``."""
    wide = activity_side_by_side(long)
    if wide.empty:
        return "no phenotypic activity: no label column with replicate wells and controls"
    names = list(dict.fromkeys(long["features"]))
    shown = wide[["column", "value", "wells"]].copy()
    for name in names:
        shown[name] = [
            "-" if not np.isfinite(m) else f"{m:.2f} (q {q:.3f}){'*' if q <= alpha else ' '}"
            for m, q in zip(wide[f"{name} mAP"], wide[f"{name} q"], strict=True)
        ]
    shown["random"] = ["-" if not np.isfinite(r) else f"{r:.2f}" for r in wide["random mAP"]]
    return shown.to_string(index=False)


__all__ = [
    "EXPLANATION",
    "format_activity",
    "activity_side_by_side",
    "activity_table",
    "phenotypic_activity",
    "robust_z",
    "well_groups",
    "well_means",
    "well_profiles",
]
