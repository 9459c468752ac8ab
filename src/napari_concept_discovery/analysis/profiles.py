"""Concept profiles: each feature's mean code per well, z-scored against the control wells of
its plate, summarised per label value with a majority rule and a calibration on held-out
controls (docs/architecture.md, "Concept profiles")."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..dictionary.control import parse_control
from ..errors import DictionaryError
from .concepts import _csr, require_columns
from .welltest import N_PERMUTATIONS, well_test

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
    # the well-level test against the control wells (:func:`.welltest.well_test`), one row per
    # (non-control value, feature); None when it was not run
    tests: pd.DataFrame | None = None
    # what the test permutes within: ("plate",), or ("plate", cell-type column) (:func:`well_test_strata`)
    strata: tuple[str, ...] = ("plate",)

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
        """Long form: one row per (value, feature) with median and mean z, consistency, hit,
        and the well-level test's ``p_value``, ``q_value`` and ``significant`` (NaN and False
        for the control value, and where the test was not run)."""
        v, m = self.median_z.shape
        above = np.rint(self.fraction_above * self.n_wells[:, None]).astype(np.int64)
        out = pd.DataFrame(
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
        p = np.full((v, m), np.nan)
        q = np.full((v, m), np.nan)
        if self.tests is not None and not self.tests.empty:
            index = {val: i for i, val in enumerate(self.values)}
            r = self.tests["value"].map(index).to_numpy()
            f = self.tests["feature"].to_numpy()
            p[r, f] = self.tests["p_value"].to_numpy()
            q[r, f] = self.tests["q_value"].to_numpy()
        out["p_value"] = p.ravel()
        out["q_value"] = q.ravel()
        out["significant"] = self.significant().ravel()
        return out

    def significant(self) -> np.ndarray:
        """(V, M) True where the well-level test finds the feature changed (FDR-corrected)."""
        out = np.zeros(self.median_z.shape, bool)
        if self.tests is None or self.tests.empty:
            return out
        index = {v: i for i, v in enumerate(self.values)}
        sig = self.tests[self.tests["significant"]]
        rows = sig["value"].map(index).to_numpy()
        out[rows, sig["feature"].to_numpy()] = True
        return out

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


def well_index(table: pd.DataFrame, column: str) -> tuple[np.ndarray, pd.DataFrame]:
    """(group, wells): each row's well as an index into ``wells``, the table of (plate, well,
    value of ``column``, n_cells), one row per well and value, sorted. A well holding cells of
    two values of ``column`` is two wells here."""
    keys = pd.DataFrame(
        {
            "plate": table["plate"].astype(str).to_numpy(),
            "well": table["well"].astype(str).to_numpy(),
            "value": table[column].astype(str).to_numpy(),
        }
    )
    grouped = keys.groupby(["plate", "well", "value"], sort=True)
    return grouped.ngroup().to_numpy(), grouped.size().rename("n_cells").reset_index()


def well_means(codes, table: pd.DataFrame, column: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Mean code of every feature over the tokens of each (plate, well, value of ``column``).

    Returns the well table (plate, well, value, n_cells) and a dense (W, M) array.
    """
    require_columns(table, [*WELL_KEYS, column], "concept profiles")
    csr = _csr(codes)
    group, wells = well_index(table, column)
    n = np.bincount(group, minlength=len(wells)).astype(np.float64)
    onehot = sp.csr_matrix(
        (1.0 / n[group], (group, np.arange(len(group)))), shape=(len(wells), csr.shape[0])
    )
    return wells, np.asarray((onehot @ csr).todense(), dtype=np.float64)


def well_test_strata(
    table: pd.DataFrame, column: str, control_column: str, strata: str | None
) -> str | None:
    """The column the well-level test stratifies by besides the plate, or None (plates only).

    ``"auto"``: the table's cell-type column (:func:`..dictionary.within.cell_type_column`)
    unless it is the tested or the control column. Where plates mix cell types, a value whose
    wells hold other cell types than the control wells differs from them by cell type alone;
    ranked only against control wells of its own cell type, it does not. Measured on issue
    24's 4-plate benchmark (the default dictionary): null perturbations 11 and 10 features called
    changed with plates alone as strata, 8 and 9 by plate and cell type (the rest is the
    whitening's, benchmarks/results/concept_recovery.txt); fewer wells per stratum cost power.
    A column named outright must exist.
    """
    if strata is None or str(strata).lower() == "none":
        return None
    if str(strata).lower() != "auto":
        require_columns(table, [strata], "the well-level test's strata")
        return strata
    from ..dictionary.within import cell_type_column

    found = cell_type_column(table.columns)
    return None if found in (None, column, control_column) else found


def concept_profiles(
    codes,
    table: pd.DataFrame,
    column: str,
    control: str | tuple[str, str],
    *,
    threshold: float = Z_THRESHOLD,
    n_perm: int = N_PERMUTATIONS,
    seed: int = 0,
    strata: str | None = "auto",
) -> ConceptProfiles:
    """:class:`ConceptProfiles` of ``column``, z-scored against the ``control`` wells
    (``COLUMN=VALUE`` or a pair) of each plate, with the well-level permutation test of every
    value against them (:func:`.welltest.well_test`, ``n_perm`` permutations from ``seed``;
    ``n_perm=0`` skips it), within each plate and each value of ``strata``
    (:func:`well_test_strata`: by default the cell type where the table has one).

    Plates without a control well are left out (named in ``skipped_plates``); none with one is
    an error naming the control.
    """
    ccol, cval = parse_control(control)
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
    by = well_test_strata(table, column, ccol, strata)
    tests = None
    if n_perm:
        tested = wells
        if by is not None:  # a well's stratum: its plate and the most common value of `by`
            keys = ctrl_keys[["plate", "well"]].assign(s=table[by].astype(str).to_numpy())
            major = keys.groupby(["plate", "well"])["s"].agg(lambda x: x.value_counts().index[0])
            tested = wells.assign(
                plate=[
                    f"{p} / {major[(p, w)]}"
                    for p, w in zip(wells["plate"], wells["well"], strict=True)
                ]
            )
        tests = well_test(means[keep], tested, n_perm=n_perm, seed=seed, column=column)
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
        tests,
        ("plate",) if by is None else ("plate", by),
    )
