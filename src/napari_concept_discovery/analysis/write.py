"""The analysis folder: feature, selectivity, concept and profile tables and the codes as
AnnData, written together into a folder that replaces the old one whole."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._files import (
    atomic_dir,
    atomic_parquet,
    atomic_path,
    atomic_write_text,
    check_free_space,
    check_not_foreign,
)
from ..dictionary.control import parse_control
from ..errors import OutputError
from .concepts import _csr, feature_table, require_columns, selectivity_report
from .families import concept_families, family_table
from .profiles import WELL_KEYS, ConceptProfiles, concept_profiles
from .truth import concept_auroc, concept_views

#: Written into every analysis folder; a folder without it (and with other files) is not one.
ANALYSIS_MARKER = "analysis.json"


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


def feature_name_width(n_features: int) -> int:
    """Digits of a feature's number in its names: at least 4, enough for the dictionary's
    largest, so the names sort."""
    return max(4, len(str(max(n_features - 1, 0))))


def feature_column(feature: int, n_features: int) -> str:
    """A feature's column name in a profile table: ``Feature_0007`` (zero-padded to sort)."""
    return f"Feature_{int(feature):0{feature_name_width(n_features)}d}"


def feature_names(n_features: int) -> list[str]:
    """AnnData variable names of a dictionary's features: ``f0000`` .. (zero-padded to the
    dictionary size, so they sort; the same width as :func:`feature_column`)."""
    width = feature_name_width(n_features)
    return [f"f{f:0{width}d}" for f in range(n_features)]


def token_names(table: pd.DataFrame) -> pd.Index:
    """AnnData observation names that stay unique across analyses, so that ``anndata.concat``
    of two plates or screens never collides: cells ``{plate}_{well}_{site}_{label}``, crops and
    patches ``{plate}_{well}_{site}_r{row}_c{col}``; a table without these keys (a bare table
    in a script) gets ``t{row}``. Repeats, if any, get anndata's ``-1``, ``-2`` suffixes."""
    import anndata as ad

    def col(name: str) -> pd.Series:
        return table[name].astype(str).reset_index(drop=True)

    if {"plate", "well", "site"} <= set(table.columns):
        stem = col("plate") + "_" + col("well") + "_" + col("site")
        if "label" in table.columns:
            names = stem + "_" + col("label")
        elif {"row", "col"} <= set(table.columns):
            names = stem + "_r" + col("row") + "_c" + col("col")
        else:
            names = stem + "_t" + pd.Series(range(len(table))).astype(str)
    else:
        names = "t" + pd.Series(range(len(table))).astype(str)
    index = pd.Index(names.to_numpy(dtype=str))
    return index if index.is_unique else ad.utils.make_index_unique(index)


def well_profiles(codes, table: pd.DataFrame) -> pd.DataFrame:
    """Well-level profiles in pycytominer's layout: ``Metadata_Plate``, ``Metadata_Well``, the
    well's metadata columns as ``Metadata_<column>`` (those with one value per well), the
    number of cells (``Metadata_Cell_Count``), then the mean code of every feature over the
    well's cells (0 where inactive) as ``Feature_NNNN``.

    pycytominer's ``normalize``/``feature_select`` take it as is (``features="infer"`` needs the
    ``Feature_`` prefix passed as ``features=[...]``; see docs/cli.md), so the codes go straight
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

    Names follow scverse habits so analyses concatenate and scanpy takes them as they are:
    observations :func:`token_names` (``{plate}_{well}_{site}_{label}`` for cells), variables
    :func:`feature_names` (``f0000``; the integer stays in ``var["feature"]``), and cell
    centroids as ``obsm["spatial"]`` (x, y in pixels of the site, squidpy's order).

    Each :class:`ConceptProfiles` lands in ``.varm["profile_<column>"]`` (features x values,
    median z) and ``.uns["profiles"][column]`` (control, threshold, wells per value, hits).
    """
    import anndata as ad

    csr = _csr(codes).astype(np.float32)
    obs = obs.reset_index(drop=True).copy()
    obs.index = token_names(obs)
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
    names = feature_names(csr.shape[1])
    if var is None:
        var = pd.DataFrame(index=names)
    else:
        var.index = pd.Index([names[int(f)] for f in var["feature"]], name=None)
    adata = ad.AnnData(X=csr, obs=obs, var=var)
    if {"centroid_x", "centroid_y"} <= set(obs.columns):
        adata.obsm["spatial"] = obs[["centroid_x", "centroid_y"]].to_numpy(np.float64)
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
    from ..embed.store import refuse_inside_store

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
    levels: np.ndarray | None = None,
    families: np.ndarray | None = None,
    views: np.ndarray | None = None,
    activity: pd.DataFrame | None = None,
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
    ``levels`` (M,) adds each feature's nested ``level`` (:mod:`..dictionary.nested`);
    ``families`` (M,) (:func:`.families.feature_families`) adds its ``family`` and writes
    families.parquet (members, best member and summed code scored against the labels and the
    truth), and each concept's best family beside its best feature in concepts.parquet.
    ``views`` (M,) (a dictionary in views, :mod:`..dictionary.combined`) adds each feature's
    ``view`` (the feature table, AnnData ``.var``, families, profiles) and, per concept, the
    view of its best feature and the best feature and AUROC of every view side by side.
    ``activity`` (:func:`.activity.activity_table`: the copairs mAP of each label value's
    replicate wells against the controls, per kind of features) is written as activity.parquet.
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
        if levels is not None:
            features.insert(1, "level", np.asarray(levels, dtype=np.int64))
        if families is not None:
            features.insert(2 if levels is not None else 1, "family", np.asarray(families))
        if views is not None:
            views = np.asarray(views).astype(str)
            features.insert(1, "view", views)
        if families is not None:
            fams = family_table(csr, families, table, columns, truth_columns)
            if views is not None:
                fams.insert(1, "view", [views[int(m.split()[0])] for m in fams["members"]])
            names["families"] = "families.parquet"
            atomic_parquet(fams, tmp / names["families"])
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
            if families is not None:
                aurocs = aurocs.merge(
                    concept_families(csr, families, table, truth_columns), on="concept"
                )
            if views is not None:
                aurocs = aurocs.merge(concept_views(csr, table, truth_columns, views), on="concept")
            names["concepts"] = "concepts.parquet"
            atomic_parquet(aurocs, tmp / names["concepts"])
        profiles = []
        if controls:
            control_column = parse_control(controls).column
            profiles = [
                concept_profiles(csr, table, c, controls) for c in columns if c != control_column
            ]
        if profiles:
            names["profiles"] = "profiles.parquet"
            long = pd.concat([p.table() for p in profiles], ignore_index=True)
            if views is not None:
                long.insert(long.columns.get_loc("feature") + 1, "view", views[long["feature"]])
            atomic_parquet(long, tmp / names["profiles"])
        if activity is not None:
            names["activity"] = "activity.parquet"
            atomic_parquet(activity, tmp / names["activity"])
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
