"""The analysis folder: feature, selectivity, concept and profile tables and the codes as
AnnData, written together into a folder that replaces the old one whole."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

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
from .concepts import _csr, feature_table, selectivity_report
from .profiles import ConceptProfiles, concept_profiles
from .truth import concept_auroc

#: Written into every analysis folder; a folder without it (and with other files) is not one.
ANALYSIS_MARKER = "analysis.json"


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
) -> dict[str, Path]:
    """Write features.parquet, codes.parquet (long form), selectivity tables and codes.h5ad.

    The files are written into a folder beside ``out_dir`` that replaces it once all are
    written, so a failure leaves an earlier analysis whole rather than a mix of old and new.
    With ``controls`` (COLUMN=VALUE) also the concept profiles of every label column but the
    control column: profiles.parquet (long form, one row per value and feature) and the AnnData
    fields. ``stains`` (:func:`stain_table`) adds each feature's stain attribution to the
    feature table and to the AnnData (``var`` columns and ``varm["stain_attribution"]``).
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
            control_column = parse_control(controls).column
            profiles = [
                concept_profiles(csr, table, c, controls) for c in columns if c != control_column
            ]
        if profiles:
            names["profiles"] = "profiles.parquet"
            atomic_parquet(
                pd.concat([p.table() for p in profiles], ignore_index=True),
                tmp / names["profiles"],
            )
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
