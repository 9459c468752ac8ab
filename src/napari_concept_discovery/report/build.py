"""A report of a dictionary on a whole store that a person reads in a browser, with no server.

Everything is computed through :class:`~.explore.Explorer` (top cells with their boxes, site
activation maps, per-well means, the feature table) and :mod:`.concepts` (selectivity per label
value, concept profiles), so the report, the viewer and ``analyze`` show the same numbers.
Figures are drawn with matplotlib's Agg canvas (no pyplot, no backend switch, no Qt) and embedded
in one HTML file as base64 PNGs; the page has no scripts, fonts or style sheets from elsewhere
(docs/architecture.md, "The report").
"""

from __future__ import annotations

import html
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .._files import atomic_path, atomic_write_text, check_not_foreign, owned_files
from ..analysis.concepts import require_columns, selectivity
from ..analysis.families import family_table
from ..analysis.profiles import ConceptProfiles, concept_profiles
from ..analysis.write import join_feature_columns
from ..dictionary.control import check_control, parse_control
from ..dictionary.nested import describe_levels
from ..errors import ConceptDiscoveryError, DataWarning
from ..progress import Cancel, ProgressCallback, is_cancelled, report
from ..settings import Settings, check, option
from .figures import Pixels
from .html import (
    CSS,
    activity_html,
    describe_whitening,
    families_html,
    feature_html,
    header_html,
    html_table,
    profiles_html,
    quality_html,
    toc_html,
    views_html,
)

#: Columns of a token table that are never a metadata label (keys, geometry, counts).
NOT_LABELS = ("plate", "well", "site", "label", "row", "col", "column", "tile", "cell", "patch")
#: A column with more distinct values than this is not offered as a label by default.
MAX_LABEL_VALUES = 50
#: A label's best feature leads the ranking only when at least this selective.
LEAD_SELECTIVITY = 0.2
#: The files a report writes into its folder, and the marker that lists the ones it wrote.
REPORT_FILES = ("index.html", "hits.csv")
REPORT_MARKER = "report.json"


class ReportError(ConceptDiscoveryError):
    """The report cannot be made from these inputs (the message says which)."""


@dataclass
class ReportSettings(Settings):
    """What the report shows: which labels, how many features and cells, which controls."""

    labels: tuple[str, ...] | None = option(
        None,
        "metadata columns for selectivity and concept profiles, comma-separated (default: the "
        f"cell table's text columns with 2 to {MAX_LABEL_VALUES} values)",
    )
    top: int = option(12, "features shown, most selective first", label="features")
    cells: int = option(12, "top cells shown per feature", label="cells per feature")
    per_well: int = option(
        3,
        "top cells of one well at most, so a feature's gallery spans several wells",
        label="top cells per well",
    )
    controls: str | None = option(
        None,
        "control wells the concept profiles are z-scored against, as COLUMN=VALUE (default: "
        "the first dictionary's whitening controls)",
        label="profile controls (COLUMN=VALUE)",
    )
    threshold: float = option(2.0, "z above which a well switches a feature on", flag="--z")

    def __post_init__(self) -> None:
        if isinstance(self.labels, str):
            self.labels = tuple(c.strip() for c in self.labels.split(",") if c.strip())
        elif self.labels is not None:
            self.labels = tuple(str(c) for c in self.labels)
        super().__post_init__()

    def validate(self) -> None:
        check(self.top >= 1, "top", f"must be at least 1, got {self.top}")
        check(self.cells >= 1, "cells", f"must be at least 1, got {self.cells}")
        check(self.per_well >= 1, "per_well", f"must be at least 1, got {self.per_well}")
        check(self.threshold > 0, "threshold", f"must be positive, got {self.threshold}")
        check_control(self.controls)


# --- choosing what to show ------------------------------------------------------------------


def default_labels(table: pd.DataFrame) -> list[str]:
    """Text or boolean columns with 2 to ``MAX_LABEL_VALUES`` values, keys left out."""
    keys = [k for k in ("plate", "well", "site") if k in table.columns]
    ids = {len(table[keys[: i + 1]].drop_duplicates()) for i in range(1, len(keys))}
    out = []
    for c in table.columns:
        name = str(c)
        if name in NOT_LABELS or name.startswith(("centroid", "bbox", "area", "metadata_")):
            continue
        s = table[c]
        if not (s.dtype == object or isinstance(s.dtype, pd.CategoricalDtype) or s.dtype == bool):
            continue
        n = s.nunique(dropna=True)
        if not 2 <= n <= MAX_LABEL_VALUES or n in ids:
            continue  # constant, too many values, or one value per well or site (an id)
        out.append(name)
    return out


def rank_features(features: pd.DataFrame, n: int) -> list[int]:
    """Live features, most selective first; the best feature of each label (if at least
    ``LEAD_SELECTIVITY``) comes before the runners-up of a label already shown, so that one
    strong label does not fill the page."""
    live = features[features["n_active"] > 0]
    if live.empty:
        return []
    if "selectivity_avg" not in live.columns:
        order = live.sort_values(["frequency", "feature"], ascending=[False, True])
        return order["feature"].head(n).astype(int).tolist()
    order = live.sort_values(["selectivity_avg", "feature"], ascending=[False, True])
    first = order.groupby(["top_column", "top_label"], sort=False).head(1)
    first = first[first["selectivity_avg"] >= LEAD_SELECTIVITY]
    rest = order.drop(first.index)
    return pd.concat([first, rest])["feature"].head(n).astype(int).tolist()


# --- pixels ---------------------------------------------------------------------------------


# --- figures ----------------------------------------------------------------------------------


# --- HTML -------------------------------------------------------------------------------------


# --- the report -------------------------------------------------------------------------------


def _load(dictionary):
    from ..dictionary.io import load_dictionary

    if isinstance(dictionary, (str, Path)):
        return Path(dictionary).stem, load_dictionary(dictionary)
    return str(dictionary.meta.extra.get("name", "dictionary")), dictionary


def _view_entries(entries):
    """``entries`` with a dictionary in views given as one entry per view: ``name [view]``,
    the part and its features, so the comparison shows the views side by side."""
    for name, d, features in entries:
        parts = getattr(d, "parts", ())
        if not parts or "view" not in features.columns:
            yield name, d, features
            continue
        for view, part in parts:
            yield f"{name} [{view}]", part, features[features["view"].astype(str) == view]


def comparison_table(entries, labels: Sequence[str]) -> pd.DataFrame:
    """One row per dictionary: method, size, preparation, quality and selective features.

    ``entries`` are (name, dictionary, feature table) triples.
    """
    rows = []
    for name, d, features in _view_entries(entries):
        meta = d.meta
        m = meta.metrics
        live = features[features["n_active"] > 0]
        row = {
            "dictionary": name,
            "method": meta.method or "?",
            "atoms": int(d.n_atoms),
            "nested levels": describe_levels(d.levels),
            "unit": meta.unit,
            "whitening": describe_whitening(meta),
            "FVU": float(m.get("fvu", np.nan)),
            "mean cosine": float(m.get("mean_cosine", np.nan)),
            "L0": float(m.get("l0", np.nan)),
            "dead": f"{int(m['n_dead'])}/{int(m['n_atoms'])}" if "n_dead" in m else "",
            "silent here": int((features["n_active"] == 0).sum()),
        }
        if labels and "selectivity_avg" in features.columns:
            row["selective > 0.5"] = int((live["selectivity_avg"] > 0.5).sum())
            row["selective > 0.2"] = int((live["selectivity_avg"] > 0.2).sum())
        rows.append(row)
    return pd.DataFrame(rows)


def check_report_folder(out: str | Path) -> Path:
    """Refuse, before any work, a report folder that cannot be written, that holds an
    ``index.html`` or ``hits.csv`` this package did not write there (the one rule of
    :func:`._files.check_not_foreign`), or that lies inside an activation store."""
    from ..embed.store import refuse_inside_store

    out = check_not_foreign(
        out,
        marker=REPORT_MARKER,
        what="report folder",
        kind="a report",
        writes=(*REPORT_FILES, REPORT_MARKER),
    )
    refuse_inside_store(out, "report folder", ReportError)
    return out


def write_report(
    store,
    dictionaries: Sequence,
    out: str | Path,
    settings: ReportSettings | None = None,
    *,
    progress: ProgressCallback = None,
    cancel: Cancel = None,
) -> Path:
    """Write ``out/index.html`` (and ``out/hits.csv``) about ``store`` and the first of
    ``dictionaries`` (paths or loaded dictionaries); the others join the comparison table.
    Returns the HTML file's path."""
    from ..analysis.analyze import profile_controls
    from ..analysis.explore import Explorer

    settings = settings or ReportSettings()
    if not dictionaries:
        raise ReportError("a report needs at least one dictionary")
    out = check_report_folder(out)
    loaded = [_load(d) for d in dictionaries]
    name, primary = loaded[0]
    stale = store.stale_labels()
    if stale:
        warnings.warn(stale, DataWarning, stacklevel=2)
    ex = Explorer(store, primary)
    report(progress, "encode", 0, len(loaded))
    codes, table = ex.cell_codes(cancel=cancel)
    if codes.shape[0] == 0:
        raise ReportError(f"the store at {store.path} has no cells to report on")
    if settings.labels is not None:
        require_columns(table, settings.labels, "the report's labels")
        labels = list(settings.labels)
    else:
        labels = default_labels(table)
    labels = [c for c in labels if table[c].astype(str).nunique() >= 2]
    sels = {c: selectivity(codes, table[c].to_numpy(), c) for c in labels}
    features = ex.feature_table(labels)
    entries = [(name, primary, features)]
    stains = primary.stain_table()
    if stains is not None:  # which stains each atom reads (per-channel tokens only)
        features = join_feature_columns(
            features, stains.assign(feature=np.arange(len(stains), dtype=features["feature"].dtype))
        )
    from ..analysis.analyze import named_features

    named = named_features(primary)
    if named is not None:  # names and notes a person gave, beside the dictionary file
        features = join_feature_columns(features, named)
    for i, (other_name, other) in enumerate(loaded[1:], start=1):
        if is_cancelled(cancel):
            raise _cancelled()
        report(progress, "encode", i, len(loaded))
        entries.append((other_name, other, Explorer(store, other).feature_table(labels)))
    report(progress, "encode", len(loaded), len(loaded))

    controls = profile_controls(primary, settings.controls)
    profiles: list[ConceptProfiles] = []
    control_wells = None
    notes = []
    if controls:
        ccol, cval = parse_control(controls)
        if ccol not in table.columns:
            if settings.controls is not None:
                require_columns(table, [ccol], "the report's controls")
            notes.append(f"No concept profiles: the cell table has no column {ccol!r}.")
        else:
            for col in labels:
                if col != ccol:
                    profiles.append(
                        concept_profiles(codes, table, col, controls, threshold=settings.threshold)
                    )
            ctrl = table[table[ccol].astype(str) == cval]
            control_wells = ctrl[["plate", "well"]].astype(str).drop_duplicates()
    else:
        notes.append(
            "No concept profiles: the dictionary was not whitened on controls and no --controls "
            "was given."
        )

    chosen = rank_features(features, settings.top)
    # the features that perturbations switch on most strongly get a section too
    hits = pd.concat([p.hits() for p in profiles]) if profiles else pd.DataFrame()
    why: dict[int, str] = {}
    if not hits.empty:
        for h in hits.sort_values("median_z", ascending=False).itertuples(index=False):
            f = int(h.feature)
            if f not in chosen and f not in why and len(why) < max(2, settings.top // 3):
                why[f] = f"{h.column} = {h.value} (median z {h.median_z:+.1f})"
    chosen += list(why)
    shown = set(chosen)
    pixels = Pixels(store)
    if pixels.plate is not None:  # what measurements follow each feature (cached per store)
        from ..analysis.measurements import describe_store

        described = describe_store(store, codes, plate=pixels.plate, cancel=cancel)
        if described is not None:
            features = join_feature_columns(features, described[["feature", "description"]])
    plates = sorted(table["plate"].astype(str).unique())
    stain_cols = [c for c in features.columns if str(c).startswith("stain_")]
    feats = features.set_index("feature")

    parts = [header_html(store, name, primary, table, labels, controls)]
    parts.append(toc_html(chosen, feats, why))
    parts.append("<h2 id='dictionaries'>Dictionaries</h2>")
    parts.append(
        "<p class='note'>FVU (fraction of variance unexplained), mean cosine, L0 (non-zeros per "
        "token) and dead features are measured after training on the training tokens; "
        "<i>silent here</i> counts features that fire on no cell of this store; "
        "<i>selective</i> counts features whose best selectivity (P(active | label) - "
        "P(active | other labels), over the label columns) is above 0.5 or 0.2. The feature "
        f"sections describe <b>{html.escape(name)}</b>.</p>"
    )
    parts.append(html_table(comparison_table(entries, labels), "comparison"))
    parts.append(views_html(features))
    fams = family_table(codes, ex.families(), table, labels)
    views = primary.feature_views()
    if views is not None and not fams.empty:
        fams.insert(1, "view", [str(views[int(m.split()[0])]) for m in fams["members"]])
    parts.append(families_html(fams, shown))
    parts.append(quality_html(store, ex, pixels))
    parts.append(profiles_html(profiles, chosen, shown, notes, out))
    parts.append(activity_html(*_activity(store, primary, codes, table, labels, controls)))
    parts.append("<h2 id='features'>Features</h2>")
    if pixels.problem:
        parts.append(f"<p class='note'>No cell thumbnails: {html.escape(pixels.problem)}</p>")
    for i, f in enumerate(chosen):
        if is_cancelled(cancel):
            raise _cancelled()
        report(progress, "report", i, len(chosen))
        parts.append(
            feature_html(
                ex,
                pixels,
                f,
                feats.loc[f],
                sels,
                stain_cols,
                profiles,
                plates,
                control_wells,
                settings.cells,
                why.get(f),
                per_well=settings.per_well,
            )
        )
    report(progress, "report", len(chosen), len(chosen))
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>Concept report: {html.escape(name)}</title><style>{CSS}</style></head>"
        f"<body>{''.join(parts)}</main></body></html>"
    )
    out = check_report_folder(out)  # again: the folder may have changed in the meantime
    out.mkdir(parents=True, exist_ok=True)
    written = ["index.html"]
    if profiles:
        hits = pd.concat([p.hits() for p in profiles], ignore_index=True)
        with atomic_path(out / "hits.csv") as tmp:
            hits.to_csv(tmp, index=False)
        written.append("hits.csv")
    elif "hits.csv" in owned_files(out, REPORT_MARKER):
        (out / "hits.csv").unlink(missing_ok=True)  # an earlier report's, not this one's
    # the marker first: a file it lists but that is not there yet is never somebody else's
    atomic_write_text(out / REPORT_MARKER, json.dumps({"files": written}))
    return atomic_write_text(out / "index.html", page)


def _activity(store, dictionary, codes, table, labels, controls):
    """The phenotypic activity table of the report's labels (codes, raw tokens and cached
    CellProfiler measurements; ``analysis.analyze.store_activity``) and notes on what is
    missing."""
    from ..analysis.analyze import store_activity

    if not controls:
        return None, ["No phenotypic activity: it needs control wells (--controls)."]
    ccol = parse_control(controls).column
    if ccol not in table.columns:
        return None, [f"No phenotypic activity: the cell table has no column {ccol!r}."]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        activity = store_activity(store, dictionary, codes, table, labels, controls)
    notes = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    if (
        activity is not None
        and not activity.empty
        and "CellProfiler" not in set(activity["features"])
    ):
        notes.append("No CellProfiler column: the store has no cached measurements of these cells.")
    return activity, notes


def _cancelled():
    from ..progress import Cancelled

    return Cancelled("report cancelled")


__all__ = [
    "ReportError",
    "ReportSettings",
    "comparison_table",
    "default_labels",
    "rank_features",
    "write_report",
]
