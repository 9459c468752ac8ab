"""One analysis of a dictionary on a store: refuse what can be refused before encoding, encode
(:mod:`.encode`, or the Dask executor in :mod:`.cluster`), join the ground truth and write the
tables (:mod:`.write`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..dictionary.applied import Dictionary
from ..dictionary.control import parse_control
from ..dictionary.settings import AnalyzeSettings
from ..errors import DataWarning, DictionaryError
from ..progress import Cancel, ProgressCallback
from .concepts import require_columns
from .encode import dictionary_tokens, encode_store
from .truth import join_truth, read_truth
from .write import check_analysis_folder, write_analysis


@dataclass
class Analysis:
    """Codes, the token table they index (with the truth joined) and the files written."""

    codes: sp.csr_matrix
    table: pd.DataFrame
    paths: dict[str, Path]


def encode_for_analysis(
    store,
    dictionary: Dictionary,
    settings: AnalyzeSettings,
    *,
    progress: ProgressCallback = None,
    cancel: Cancel = None,
    truth: pd.DataFrame | None = None,
    encode=None,
) -> tuple[sp.csr_matrix, pd.DataFrame]:
    """:func:`encode_store` (or ``encode``, a function called as it is) with
    ``settings.truth_file`` (or ``truth``, read already) joined onto the token table."""
    encode = encode_store if encode is None else encode
    stale = getattr(store, "stale_labels", lambda: None)()
    if stale:
        warnings.warn(stale, DataWarning, stacklevel=2)
    codes, table = encode(store, dictionary, settings.unit, progress=progress, cancel=cancel)
    if truth is None and settings.truth_file is not None:
        truth = read_truth(settings.truth_file)
    if truth is not None:
        table = join_truth(table, truth)
        where = settings.truth_file or "the truth table"
        for col in settings.truth:
            missing = int(table[col].isna().sum()) if col in table.columns else 0
            if missing:
                warnings.warn(
                    f"{where} gives no {col!r} for {missing} of {len(table)} tokens; they are "
                    f"left out of the {col} concepts",
                    DataWarning,
                    stacklevel=2,
                )
    return codes, table


def check_analysis(store, dictionary: Dictionary, settings: AnalyzeSettings) -> pd.DataFrame | None:
    """Everything about an analysis that can be refused before encoding: the dictionary fits
    the store, the truth file reads and joins, the label and truth columns exist. Returns the
    truth table (or None)."""
    unit = settings.unit or dictionary.unit
    dictionary.check_compatible_store(store)
    columns = list(store.table(unit).columns)
    truth = None
    if settings.truth_file is not None:
        truth = read_truth(settings.truth_file)
        keys = ("plate", "well", "site", "label")
        missing = [k for k in keys if k not in columns or k not in truth.columns]
        if missing:
            raise DictionaryError(
                f"cannot join the truth file {settings.truth_file} onto the {unit} tokens on "
                f"{list(keys)}: missing {missing} (tokens: {columns}, truth: "
                f"{list(truth.columns)})"
            )
        columns += [c for c in truth.columns if c not in columns]
    empty = pd.DataFrame(columns=columns)
    require_columns(empty, settings.labels, "selectivity (labels)")
    require_columns(empty, settings.truth, "ground truth (truth)")
    return truth


def analyze_store(
    store,
    dictionary: Dictionary,
    settings: AnalyzeSettings,
    out: str | Path,
    *,
    progress: ProgressCallback = None,
    cancel: Cancel = None,
    encode=None,
) -> Analysis:
    """Encode ``store`` and write the feature, selectivity, concept and code tables to ``out``.

    ``encode`` replaces :func:`encode_store` (same arguments, same result), as
    ``cluster.encode_store_on_cluster`` does to encode on a Dask cluster.

    The output folder, the dictionary's fit to the store, the truth file and the label and
    truth columns are checked before anything is encoded or written; the tables are written
    into a folder beside ``out`` that replaces it whole, so a failed run leaves the old
    analysis as it was.
    """
    check_analysis_folder(out)
    truth = check_analysis(store, dictionary, settings)
    named_features(dictionary)  # a notes file of another dictionary is refused before encoding
    codes, table = encode_for_analysis(
        store, dictionary, settings, progress=progress, cancel=cancel, truth=truth, encode=encode
    )
    controls = profile_controls(dictionary, settings.controls)
    if settings.controls is not None:
        require_columns(table, [parse_control(controls).column], "concept profiles (controls)")
    elif controls is not None and parse_control(controls).column not in table.columns:
        controls = None
    named = _named_and_described(store, dictionary, codes, table, settings, progress, cancel)
    unit = settings.unit or dictionary.unit
    activity = None
    if controls and unit == "cell":
        activity = store_activity(store, dictionary, codes, table, settings.labels, controls)
    paths = write_analysis(
        out,
        codes,
        table,
        settings.labels,
        meta=dictionary.meta.to_dict(),
        truth_columns=settings.truth,
        top_n=settings.top_n,
        controls=controls,
        stains=dictionary.stain_table(),
        named=named,
        levels=dictionary.feature_levels(),
        families=dictionary_families(dictionary, codes),
        views=dictionary.feature_views(),
        activity=activity,
    )
    return Analysis(codes, table, paths)


def activity_sources(store, dictionary: Dictionary, codes, table: pd.DataFrame) -> dict:
    """The per-cell matrices whose phenotypic activity is compared: the dictionary's ``codes``,
    the raw cell ``tokens`` in the form the dictionary reads (before whitening), and
    ``CellProfiler`` measurements where the store's cached table exists
    (``measurements.cached_measurements``; never measured here) and covers these cells."""
    from .measurements import KEYS, cached_measurements

    sources = {"codes": codes, "tokens": dictionary_tokens(store, dictionary, "cell")}
    measured = cached_measurements(store)
    if measured is not None and len(measured) == len(table):
        same = all(
            (measured[k].astype(str).to_numpy() == table[k].astype(str).to_numpy()).all()
            for k in KEYS
        )
        if same:
            sources["CellProfiler"] = measured.drop(columns=list(KEYS)).to_numpy(np.float32)
    return sources


def store_activity(
    store, dictionary: Dictionary, codes, table: pd.DataFrame, labels, controls: str, seed=0
) -> pd.DataFrame | None:
    """:func:`.activity.activity_table` of the label columns for :func:`activity_sources`;
    None when no label column can be scored (each one left out is named in a
    ``DataWarning``)."""
    from .activity import activity_table

    columns = list(labels)
    if not columns or not {"plate", "well"} <= set(table.columns):
        return None
    sources = activity_sources(store, dictionary, codes, table)
    activity = activity_table(sources, table, columns, controls, seed=seed)
    return None if activity.empty else activity


def _named_and_described(store, dictionary, codes, table, settings, progress, cancel):
    """Names and notes (:func:`named_features`) and, for cell codes with ``settings.describe``,
    the measurement descriptions (``measurements.describe_store``), one row per feature."""
    named = named_features(dictionary)
    unit = settings.unit or dictionary.unit
    if not settings.describe or unit != "cell" or not hasattr(store, "plate_source"):
        return named
    from .measurements import describe_store

    described = describe_store(store, codes, progress=progress, cancel=cancel)
    if described is None:
        return named
    if named is None:
        return described
    return described.merge(named, on="feature", how="left").fillna({"name": "", "note": ""})


def dictionary_families(dictionary: Dictionary, codes) -> np.ndarray:
    """(M,) the feature families (:func:`.families.feature_families`) of ``dictionary`` from
    its atoms and ``codes``, the tokens it was applied to. A dictionary in views groups
    within each view only (its parts' atoms live in different spaces); families are numbered
    on across the views."""
    from .families import feature_families

    parts = getattr(dictionary, "parts", None)
    if not parts:
        return feature_families(dictionary.model.atoms.detach().cpu().numpy(), codes)
    csc = sp.csr_matrix(codes).tocsc()
    out, start = [], 0
    for _, part in parts:
        fam = feature_families(
            part.model.atoms.detach().cpu().numpy(), csc[:, start : start + part.n_atoms]
        )
        shift = max((int(f.max()) + 1 for f in out if (f >= 0).any()), default=0)
        out.append(np.where(fam >= 0, fam + shift, -1))
        start += part.n_atoms
    return np.concatenate(out)


def named_features(dictionary: Dictionary) -> pd.DataFrame | None:
    """The names and notes saved beside the dictionary file (``feature_notes``), one row per
    named feature, or None when there are none."""
    from ..dictionary.feature_notes import notes_for

    notes = notes_for(dictionary)
    if notes is None or not (notes.names or notes.notes):
        return None
    return notes.frame()


def profile_controls(dictionary: Dictionary, controls: str | None = None) -> str | None:
    """The control wells concept profiles are z-scored against: ``controls`` when given, else
    the controls the dictionary's whitening was fitted on (COLUMN=VALUE), else None."""
    if controls is not None:
        return controls
    return dictionary.meta.controls
