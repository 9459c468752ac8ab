"""Ground truth: the truth table read and joined onto the token table, each concept's best
single-feature AUROC, and which features recover which true concepts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DictionaryError
from .concepts import _csr, feature_auroc, require_columns


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


def concept_views(codes, truth: pd.DataFrame, columns: Sequence[str], views) -> pd.DataFrame:
    """Per true concept (as :func:`concept_auroc`), for a dictionary in views (``views``: (M,)
    each feature's view): ``view``, the view of the best feature, then per view its best
    feature and AUROC (``best_feature_<view>``, ``auroc_<view>``), side by side."""
    csr = _csr(codes)
    views = np.asarray(views).astype(str)
    names = list(dict.fromkeys(views))
    best = concept_auroc(csr, truth, columns)
    out = best[["concept"]].copy()
    out["view"] = [views[f] if f >= 0 else "" for f in best["best_feature"]]
    for name in names:
        cols = np.flatnonzero(views == name)
        part = concept_auroc(csr[:, cols], truth, columns)
        out[f"best_feature_{name}"] = [int(cols[f]) if f >= 0 else -1 for f in part["best_feature"]]
        out[f"auroc_{name}"] = part["auroc"].to_numpy()
    return out


@dataclass
class TrueConcept:
    """A concept with per-cell ground truth: the cells it is judged on and which are members."""

    name: str
    kind: str  # "cell type", "subpopulation", "perturbation" or "null perturbation"
    rows: np.ndarray  # rows of the cell table the concept is judged on
    member: np.ndarray  # (len(rows),) bool


def _cell_types(table: pd.DataFrame) -> list[TrueConcept]:
    """Each cell type, judged against every other token."""
    every = np.arange(len(table))
    return [
        TrueConcept(str(ct), "cell type", every, (table["cell_type"] == ct).to_numpy())
        for ct in sorted(table["cell_type"].dropna().astype(str).unique())
    ]


def _perturbations(table: pd.DataFrame, control: str):
    """(perturbation per token, the non-control names in order, and a function giving the
    control tokens of the plates and cell types a set of members comes from)."""
    pert = table["perturbation"].astype(str).to_numpy()
    is_control = pert == control
    stratum = (table["plate"].astype(str) + "/" + table["cell_type"].astype(str)).to_numpy()

    def matched_controls(member: np.ndarray) -> np.ndarray:
        return is_control & np.isin(stratum, np.unique(stratum[member]))

    return pert, sorted(set(pert.tolist()) - {control}), matched_controls


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
    out = _cell_types(table)
    mitotic = table["mitotic"].astype(str).str.lower().isin(("true", "1")).to_numpy()
    out.append(TrueConcept("mitotic", "subpopulation", every, mitotic))
    responded = table["responded"].astype(str).str.lower().isin(("true", "1")).to_numpy()
    pert, names, matched_controls = _perturbations(table, control)
    for name in names:
        inside = pert == name
        null = not (inside & responded).any()
        member = inside if null else inside & responded
        if member.sum() < min_members:
            continue
        negative = matched_controls(member)
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
    nulls = set(nulls)
    out = _cell_types(table)
    pert, names, matched_controls = _perturbations(table, control)
    for name in names:
        member = pert == name
        negative = matched_controls(member)
        if member.sum() < min_members or not negative.any():
            continue
        rows = np.flatnonzero(member | negative)
        kind = "null perturbation" if name in nulls else "perturbation"
        out.append(TrueConcept(name, kind, rows, member[rows]))
    return out


def recovery_table(
    codes,
    concepts: Sequence[TrueConcept],
    stains: pd.DataFrame | None = None,
    families: np.ndarray | None = None,
    views: np.ndarray | None = None,
) -> pd.DataFrame:
    """Per true concept: members, the best single feature, its AUROC and its top stain;
    ``views`` (M,) (a dictionary in views) adds the ``view`` that found that feature.

    ``stains`` is a :func:`stain_table` of the dictionary (one row per feature), adding the
    best feature's ``top_stain`` and its ``stain_share``. ``families`` (M,)
    (:func:`.families.feature_families`) adds the family whose summed code scores the concept
    best (``best_family``, ``family_auroc``; -1 and NaN without families).
    """
    from .families import summed_codes

    csr = _csr(codes)
    summed = None if families is None else summed_codes(csr, families)
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
        if views is not None:
            row["view"] = str(views[best]) if best >= 0 else ""
        if stains is not None and best >= 0:
            top = stains["top_stain"].iloc[best]
            row["top_stain"] = top
            row["stain_share"] = float(stains[f"stain_{top}"].iloc[best])
        if summed is not None:
            fam = feature_auroc(summed[c.rows], c.member) if summed.shape[1] else np.array([])
            ok = np.isfinite(fam)
            f = int(np.flatnonzero(ok)[np.argmax(fam[ok])]) if ok.any() else -1
            row["best_family"] = f
            row["family_auroc"] = float(fam[f]) if f >= 0 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)
