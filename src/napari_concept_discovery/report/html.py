"""The report's page: inline CSS, tables, the header and table of contents, the concept
profiles with their calibration, the quality section and one section per feature, each figure
embedded as base64 (no scripts, no files beside the page)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..analysis.profiles import HIT_FRACTION, MIN_WELLS, ConceptProfiles
from ..dictionary.meta import DictionaryMeta
from .figures import (
    QUALITY_FIGURES,
    Pixels,
    encode_figure,
    plate_figure,
    profile_figure,
    quality_figure,
    selectivity_figure,
    site_figure,
    top_cells_figure,
)

#: Features and perturbations drawn in the clustered profile heatmap at most.
HEATMAP_FEATURES = 40


#: Hits listed in the page (all of them go to hits.csv).
HITS_SHOWN = 40


def describe_whitening(meta: DictionaryMeta) -> str:
    w = meta.whitening
    if w is None or not w.controls:
        return "none"
    by = f" per {w.by}" if w.by else ""
    return f"{w.mode} on {w.controls}{by}"


def _chance(prof: ConceptProfiles, n_wells: int) -> str:
    value = prof.chance_hits(n_wells)
    return "-" if not np.isfinite(value) else f"{value:.1f}"


def calibration_note(prof: ConceptProfiles) -> str | None:
    """One sentence on how far the hits can be trusted, from the held-out control wells."""
    if not np.isfinite(prof.control_exceed):
        return (
            f"Calibration: no plate has 3 or more control wells, so how often a well with no "
            f"effect passes z {prof.threshold:g} cannot be measured here; read the hits with care."
        )
    typical = int(np.median(prof.n_wells)) if len(prof.n_wells) else 0
    text = (
        f"Calibration: each control well, z-scored against the other control wells of its plate, "
        f"is above z {prof.threshold:g} on {prof.control_exceed:.1%} of the features"
    )
    chance = prof.chance_hits(typical)
    if np.isfinite(chance):
        text += (
            f"; a value with {typical} wells and no effect would switch on about {chance:.1f} "
            f"of the {prof.n_features} features by chance (column 'expected by chance')"
        )
    if prof.control_exceed > 0.05:
        text += (
            ". That is well above the ~2% of a normal tail (few control wells, or control wells "
            "that differ among themselves, e.g. in cell type): a value with no more hits than "
            "chance has not shown an effect"
        )
    return text + "."


def profile_summary(prof: ConceptProfiles, shown: set[int], n: int = 4) -> pd.DataFrame:
    """Per label value: wells, hit features, and its strongest features by median z."""
    hits = prof.hit_mask()
    rows = []
    for i, v in enumerate(prof.values):
        top = np.argsort(-prof.median_z[i])[:n]
        rows.append(
            {
                prof.column: v,
                "wells": int(prof.n_wells[i]),
                "features switched on": int(hits[i].sum()),
                "expected by chance": _chance(prof, int(prof.n_wells[i])),
                "strongest (median z)": ", ".join(
                    f"{feature_link(int(f), shown)} ({prof.median_z[i, f]:+.1f})" for f in top
                ),
            }
        )
    return pd.DataFrame(rows)


CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 0;
       color: #222; background: #fafafa; line-height: 1.4; }
header { background: #263238; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 4px 0; font-size: 22px; }
header p { margin: 2px 0; color: #cfd8dc; font-size: 13px; }
main { padding: 8px 32px 40px 32px; max-width: 1400px; }
h2 { border-bottom: 2px solid #263238; padding-bottom: 4px; margin-top: 32px; }
h3 { margin: 0 0 6px 0; }
p.note { color: #555; font-size: 13px; max-width: 900px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0 16px 0; background: #fff; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
th { background: #eceff1; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
section.feature { background: #fff; border: 1px solid #ddd; border-radius: 6px;
                  padding: 14px 18px; margin: 18px 0; }
.facts { font-size: 13px; color: #333; margin-bottom: 8px; }
.facts b { color: #000; }
.figs { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; }
.figs img { max-width: 100%; border: 1px solid #eee; }
nav.toc { font-size: 13px; columns: 3; max-width: 1100px; }
nav.toc a { text-decoration: none; }
.pill { display: inline-block; background: #fce4ec; color: #880e4f; border-radius: 10px;
        padding: 0 8px; margin-right: 4px; font-size: 12px; }
"""


def img_tag(fig, alt: str, kind: str, photo: bool = False) -> str:
    data = base64.b64encode(encode_figure(fig, photo)).decode("ascii")
    mime = "image/jpeg" if photo else "image/png"
    return f'<img alt="{html.escape(alt)}" data-kind="{kind}" src="data:{mime};base64,{data}">'


def fmt_value(v) -> str:
    if isinstance(v, (float, np.floating)):
        if not np.isfinite(v):
            return ""
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def html_table(df: pd.DataFrame, cls: str, raw: Sequence[str] = ()) -> str:
    """An HTML table; cells of the ``raw`` columns are HTML already, the rest are escaped."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for row in df.itertuples(index=False):
        cells = []
        for c, v in zip(df.columns, row, strict=True):
            num = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            text = str(v) if c in raw else html.escape(fmt_value(v))
            cells.append(f'<td class="num">{text}</td>' if num else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>'
        + "".join(body)
        + "</tbody></table>"
    )


def feature_link(f: int, shown: set[int]) -> str:
    return f'<a href="#feature-{f}">{f}</a>' if f in shown else str(f)


def quality_html(store, ex, pixels: Pixels) -> str:
    """The segmentation quality section: the plate's medians, the flagged sites and reasons,
    and the first flagged sites drawn with their cells."""
    from ..segment.qc import summary

    parts = ["<h2 id='quality'>Segmentation quality</h2>"]
    quality = store.quality() if hasattr(store, "quality") else None
    if quality is None or quality.empty:
        parts.append(
            "<p class='note'>No quality table: the store's cells came from label files without "
            "nuclei, or from a version before the table was kept.</p>"
        )
        return "".join(parts)
    head = summary(quality, limit=0)[0].removeprefix("quality:").strip()
    parts.append(
        f"<p class='note'>Per site (segmentation quality control): {html.escape(head)}. A site "
        "is flagged when its cells tile it (the cell foreground floods the background), are "
        "implausibly large or small against their nuclei, lack nuclei, or a stain was left out "
        "of its cell foreground.</p>"
    )
    flagged = quality[quality["flag"]]
    if flagged.empty:
        return "".join(parts)
    cols = ["plate", "well", "site", "foreground", "cells", "cell_nucleus_ratio", "reason"]
    parts.append(
        html_table(flagged[[c for c in cols if c in flagged]].reset_index(drop=True), "qc")
    )
    first = flagged.head(QUALITY_FIGURES)
    keys = [(r.plate, r.well, int(r.site)) for r in first.itertuples(index=False)]
    try:
        fig = quality_figure(ex, pixels, keys, list(first["reason"]))
        picture = img_tag(fig, "flagged sites with their cells outlined", "quality", photo=True)
        parts.append(f"<div class='figs'>{picture}</div>")
    except Exception as exc:  # a figure is a courtesy; the table above says what matters
        parts.append(f"<p class='note'>No figure of the flagged sites: {html.escape(str(exc))}</p>")
    return "".join(parts)


def header_html(store, name, dictionary, table, labels, controls) -> str:
    n_wells = table[["plate", "well"]].drop_duplicates().shape[0]
    n_sites = table[["plate", "well", "site"]].drop_duplicates().shape[0]
    meta = dictionary.meta
    return (
        "<header><h1>Concepts found by "
        f"{html.escape(name)}</h1>"
        f"<p>store {html.escape(str(store.path))}: {len(table)} cells, {n_sites} sites, "
        f"{n_wells} wells, {table['plate'].nunique()} plates; model "
        f"{html.escape(str(store.model_id))}, block {store.block}</p>"
        f"<p>dictionary: {html.escape(meta.method or '?')}"
        f", {dictionary.n_atoms} features on {html.escape(meta.unit)} "
        f"tokens, whitening {html.escape(describe_whitening(meta))}; labels: "
        f"{html.escape(', '.join(labels) or 'none')}; profile controls: "
        f"{html.escape(controls or 'none')}</p></header><main>"
    )


def toc_html(chosen, feats, why: dict[int, str]) -> str:
    items = []
    for f in chosen:
        r = feats.loc[f]
        label = (
            f" switched on by {html.escape(why[f])}"
            if f in why
            else (
                f" {html.escape(str(r['top_column']))} = {html.escape(str(r['top_label']))}"
                f" ({r['selectivity_avg']:+.2f})"
                if "top_label" in r.index
                else ""
            )
        )
        named = given_name(r)
        named = f" <b>{html.escape(named)}</b>:" if named else ""
        items.append(f"<li><a href='#feature-{f}'>feature {f}</a>{named}{label}</li>")
    return (
        "<h2>Contents</h2><p class='note'><a href='#dictionaries'>Dictionaries</a> · "
        "<a href='#quality'>Segmentation quality</a> · "
        "<a href='#profiles'>Concept profiles</a> · <a href='#features'>Features</a> "
        "(most selective first, the best feature of each label before the runners-up; then "
        "the features that perturbations switch on most strongly)</p>"
        f"<nav class='toc'><ol>{''.join(items)}</ol></nav>"
    )


def profiles_html(profiles, chosen, shown, notes, out) -> str:
    parts = ["<h2 id='profiles'>Concept profiles</h2>"]
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    if not profiles:
        return "".join(parts)
    p0 = profiles[0]
    parts.append(
        "<p class='note'>For every label value, each feature's mean code per well, z-scored "
        f"against the control wells ({html.escape('='.join(p0.control))}) of the same plate, "
        "then the median over the value's wells. A value <b>switches a feature on</b> (a hit, "
        f"a dot in the heatmap) when more than {HIT_FRACTION:.0%} of its wells, and at least "
        f"{MIN_WELLS}, have z above {p0.threshold:g}, so one odd well does not make a hit. "
        "Rows and columns are ordered by hierarchical clustering (average linkage); the "
        "heatmap shows the features with the strongest profiles. All hits are in "
        "<a href='hits.csv'>hits.csv</a>.</p>"
    )
    for prof in profiles:
        parts.append(f"<h3 id='profile-{html.escape(prof.column)}'>{html.escape(prof.column)}</h3>")
        if prof.skipped_plates:
            parts.append(
                "<p class='note'>Left out, no control wells: plates "
                f"{html.escape(', '.join(prof.skipped_plates))}.</p>"
            )
        note = calibration_note(prof)
        if note:
            parts.append(f"<p class='note calibration'>{html.escape(note)}</p>")
        strength = np.abs(prof.median_z).max(0)
        hit_f = np.flatnonzero(prof.hit_mask().any(0))
        pool = list(dict.fromkeys([*hit_f[np.argsort(-strength[hit_f])].tolist(), *chosen]))
        pool += [int(f) for f in np.argsort(-strength) if f not in pool]
        pick = sorted(pool[:HEATMAP_FEATURES])
        if len(prof.values) >= 1 and pick:
            parts.append(
                "<div class='figs'>"
                + img_tag(
                    profile_figure(prof, pick), f"profile heatmap of {prof.column}", "profile"
                )
                + "</div>"
            )
        parts.append(
            html_table(profile_summary(prof, shown), "profiles", raw=["strongest (median z)"])
        )
        hits = prof.hits()
        if len(hits):
            shown_hits = hits.head(HITS_SHOWN).copy()
            shown_hits["feature"] = [feature_link(int(f), shown) for f in shown_hits["feature"]]
            shown_hits["wells above"] = [
                f"{a}/{n}" for a, n in zip(shown_hits.wells_above, shown_hits.n_wells, strict=True)
            ]
            for c in ("median_z", "mean_z"):
                shown_hits[c] = [f"{v:+.2f}" for v in shown_hits[c]]
            shown_hits = shown_hits[["value", "feature", "median_z", "mean_z", "wells above"]]
            shown_hits.columns = [prof.column, "feature", "median z", "mean z", "wells above"]
            more = len(hits) - len(shown_hits)
            parts.append(
                f"<p class='note'>{len(hits)} hits"
                + (f"; the first {len(shown_hits)} by median z:" if more > 0 else ":")
                + "</p>"
            )
            parts.append(html_table(shown_hits, "hits", raw=["feature"]))
        else:
            parts.append("<p class='note'>No hits.</p>")
    return "".join(parts)


def given_name(row) -> str:
    """The name a person gave the feature (``feature_notes``), or ''."""
    v = row["name"] if "name" in row.index else ""
    return v if isinstance(v, str) else ""


def feature_html(
    ex, pixels, f, row, sels, stain_cols, profiles, plates, control_wells, n_cells, why=None
) -> str:
    facts = [
        f"<b>frequency</b> {row['frequency']:.3f} of cells",
        f"<b>mean code when active</b> {row['mean_activation']:.3g}",
    ]
    title = f"Feature {f}"
    if given_name(row):
        title += f" “{given_name(row)}”"
    note = str(row["note"]) if "note" in row.index and isinstance(row["note"], str) else ""
    if note:
        facts.insert(0, f"<b>note</b> {html.escape(note)}")
    described = row["description"] if "description" in row.index else ""
    if isinstance(described, str) and described:
        facts.insert(0, f"<b>measurements that follow it</b> {html.escape(described)}")
    if why is not None:
        title += f": switched on by {why.rsplit(' (', 1)[0]}"
    if "top_label" in row.index and row["top_column"]:
        if why is None:
            title += f": {row['top_column']} = {row['top_label']}"
        facts.append(
            f"<b>selectivity</b> {row['selectivity_avg']:+.2f} (avg), "
            f"{row['selectivity_max']:+.2f} (max) for {html.escape(str(row['top_column']))} = "
            f"{html.escape(str(row['top_label']))}"
        )
    switched = []
    for prof in profiles:
        hit = prof.hit_mask()[:, f]
        for i in np.flatnonzero(hit)[np.argsort(-prof.median_z[hit, f])]:
            above = int(round(prof.fraction_above[i, f] * prof.n_wells[i]))
            switched.append(
                f"<span class='pill'>{html.escape(prof.column)} = "
                f"{html.escape(prof.values[i])} (z {prof.median_z[i, f]:+.1f}, {above}/"
                f"{prof.n_wells[i]} wells)</span>"
            )
    if switched:
        facts.append("<b>switched on by</b> " + " ".join(switched[:8]))
    attribution = row[stain_cols].astype(float) if stain_cols else None
    if attribution is not None:
        top = attribution.idxmax()
        facts.append(
            f"<b>stain</b> {html.escape(str(top)[len('stain_') :])} "
            f"({attribution[top]:.0%} of the atom)"
        )
    cells = ex.top_cells(f, n_cells)
    figs = []
    if pixels.plate is not None and len(cells):
        figs.append(
            img_tag(
                top_cells_figure(ex, pixels, cells, f),
                f"top cells of feature {f}",
                "cells",
                photo=True,
            )
        )
        first = cells.iloc[0]
        figs.append(
            img_tag(
                site_figure(ex, pixels, (first.plate, first.well, int(first.site)), f),
                f"site overlay of feature {f}",
                "site",
                photo=True,
            )
        )
    figs.append(
        img_tag(plate_figure(ex, f, plates, control_wells), f"plate map of feature {f}", "plate")
    )
    if sels or attribution is not None:
        figs.append(
            img_tag(
                selectivity_figure(sels, f, attribution),
                f"selectivity of feature {f}",
                "selectivity",
            )
        )
    return (
        f"<section class='feature' id='feature-{f}' data-feature='{f}'><h3>{html.escape(title)}"
        f"</h3><div class='facts'>{' · '.join(facts)}</div><div class='figs'>{''.join(figs)}"
        "</div></section>"
    )
