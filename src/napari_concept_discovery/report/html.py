"""The report's page: inline CSS, tables, the header and table of contents, the concept
profiles with their calibration, the quality section and one section per feature, each figure
embedded as base64 (no scripts, no files beside the page)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..analysis.families import FAMILY_DISTANCE
from ..analysis.profiles import HIT_FRACTION, MIN_WELLS, ConceptProfiles
from ..analysis.welltest import FDR_ALPHA, N_PERMUTATIONS
from ..dictionary.meta import DictionaryMeta
from ..dictionary.nested import describe_levels
from ..dictionary.views import describe_views
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


#: Families listed in the page, largest first.
FAMILIES_SHOWN = 20


def describe_whitening(meta: DictionaryMeta) -> str:
    w = meta.whitening
    if w is None or not w.controls:
        return "none"
    by = f" per {w.by}" if w.by else ""
    if meta.views:  # a dictionary in views: each part has the whitening of its view
        return f"views {' + '.join(meta.views)} (each on {w.controls}{by})"
    within = f", covariance within {w.within}" if w.within and w.mode == "pca" else ""
    return f"{w.mode} on {w.controls}{by}{within}"


def views_html(features: pd.DataFrame) -> str:
    """For a dictionary in views: each label's best feature in every view, side by side, so
    a reader sees which view found which concept ('' for a dictionary of one view)."""
    if "view" not in features.columns:
        return ""
    names = list(dict.fromkeys(features["view"].astype(str)))
    parts = [
        "<h3 id='views'>Views</h3><p class='note'>This dictionary has a part per <b>view</b> "
        f"of the tokens: {describe_views(names, lambda n: f'<i>{n}</i>', 'and')}. Every feature is "
        "labelled with the view that found it.</p>"
    ]
    if "top_label" not in features.columns:
        return "".join(parts)
    live = features[(features["n_active"] > 0) & (features["top_column"].astype(str) != "")]
    rows = []
    for (col, value), group in live.groupby(["top_column", "top_label"], sort=True):
        row = {"label": f"{col} = {value}"}
        for name in names:
            mine = group[group["view"].astype(str) == name]
            if mine.empty:
                row[f"{name}: feature"], row[f"{name}: selectivity"] = "", np.nan
                continue
            best = mine.loc[mine["selectivity_avg"].idxmax()]
            row[f"{name}: feature"] = int(best["feature"])
            row[f"{name}: selectivity"] = float(best["selectivity_avg"])
        rows.append(row)
    if rows:
        parts.append(
            "<p class='note'>Each label's most selective feature in each view (avg "
            "selectivity; empty: no feature of that view has it as its top label).</p>"
        )
        parts.append(html_table(pd.DataFrame(rows), "views"))
    return "".join(parts)


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


def _significant(prof: ConceptProfiles, i: int) -> str:
    """How many features the well-level test finds changed by value ``i`` ('' for the
    control value, which it is not tested against)."""
    if prof.tests is None or prof.values[i] not in set(prof.tests["value"]):
        return ""
    return str(int(prof.significant()[i].sum()))


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
                "significant (well test)": _significant(prof, i),
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
nav.toc li { break-inside: avoid; }
span.q { color: #777; font-size: 12px; }
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
        f"{html.escape(str(store.model_id))}, block {store.block}; stains "
        f"{html.escape(', '.join(map(str, getattr(store, 'channel_names', ()) or ())) or '?')}"
        "</p>"
        f"<p>dictionary: {html.escape(meta.method or '?')}"
        f", {dictionary.n_atoms} features on {html.escape(meta.unit)} "
        f"tokens, nested levels {describe_levels(dictionary.levels)}, whitening "
        f"{html.escape(describe_whitening(meta))}; labels: "
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
        named = feature_name(r)
        named = f" <b>{html.escape(named)}</b>:" if named else ""
        view = f" ({html.escape(str(r['view']))})" if "view" in r.index else ""
        items.append(f"<li><a href='#feature-{f}'>feature {f}</a>{view}{named}{label}</li>")
    return (
        "<h2>Contents</h2><p class='note'><a href='#dictionaries'>Dictionaries</a> · "
        "<a href='#quality'>Segmentation quality</a> · "
        "<a href='#families'>Feature families</a> · "
        "<a href='#profiles'>Concept profiles</a> · "
        "<a href='#activity'>Phenotypic activity</a> · <a href='#features'>Features</a> "
        "(most selective first, the best feature of each label before the runners-up; then "
        "the features that perturbations switch on most strongly). A feature is named by the "
        "name you gave it, else by the measurement it follows most closely; features that "
        "follow the same measurement share that name, and their labels tell them apart.</p>"
        f"<nav class='toc'><ol>{''.join(items)}</ol></nav>"
    )


def profiles_html(profiles, chosen, shown, notes, out) -> str:
    parts = ["<h2 id='profiles'>Concept profiles</h2>"]
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    if not profiles:
        return "".join(parts)
    p0 = profiles[0]
    # what the well test ranks within: the plate, and the cell type where the table has one
    by = next((p.strata[1] for p in profiles if len(p.strata) > 1), None)
    within = "plate" if by is None else f"plate and {html.escape(by)}"
    parts.append(
        "<p class='note'>For every label value, each feature's mean code per well, z-scored "
        f"against the control wells ({html.escape('='.join(p0.control))}) of the same plate, "
        "then the median over the value's wells. A value <b>switches a feature on</b> (a hit, "
        f"a dot in the heatmap) when more than {HIT_FRACTION:.0%} of its wells, and at least "
        f"{MIN_WELLS}, have z above {p0.threshold:g}, so one odd well does not make a hit. "
        "Rows and columns are ordered by hierarchical clustering (average linkage); the "
        "heatmap shows the features with the strongest profiles. All hits are in "
        "<a href='hits.csv'>hits.csv</a>.</p>"
        "<p class='note'><b>Well-level test</b>: hits count wells above a z threshold; a value "
        "with few wells gets some by chance. The test ranks each feature's well means within "
        f"each {within} and asks whether the value's wells rank apart from its control "
        f"wells more than relabelling the wells at random within each {within} gives "
        f"({N_PERMUTATIONS} permutations per feature, pooled over features; Benjamini-Hochberg "
        f"over every value and feature of the column, FDR {FDR_ALPHA:g}); <i>significant</i> "
        "counts the features it finds changed. A perturbation that changes nothing should have "
        "none. It needs replicate wells: with one well of a value per plate, nothing reaches "
        "significance over many features."
        + (
            ""
            if by is None
            else f" Ranked within {html.escape(by)} too, a value whose wells hold other "
            f"{html.escape(by)} values than the control wells is not called changed for that "
            f"alone ({html.escape(by)}'s own values are ranked within plates)."
        )
        + "</p>"
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
            keep = ["value", "feature", "median_z", "mean_z", "wells above"]
            names = [prof.column, "feature", "median z", "mean z", "wells above"]
            if "q_value" in shown_hits.columns:
                shown_hits["q_value"] = [
                    "" if not np.isfinite(q) else f"{q:.2g}" for q in shown_hits["q_value"]
                ]
                keep.append("q_value")
                names.append("q (well test)")
            shown_hits = shown_hits[keep]
            shown_hits.columns = names
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


def families_html(families: pd.DataFrame, shown: set[int], n: int = FAMILIES_SHOWN) -> str:
    """The families section: what a family is, and its largest families with their members,
    the label their summed code is most selective for, and its best member's selectivity."""
    parts = [
        "<h2 id='families'>Feature families</h2>",
        "<p class='note'>A concept that covers many cells is often split over several features "
        "(copies of one direction that each take part of the cells, or atoms picked together). "
        "A <b>family</b> groups features whose atoms point the same way or that fire on the same "
        "cells (average-linkage clustering on 1 - max(atom cosine, Jaccard co-activation), cut "
        f"at {FAMILY_DISTANCE:g}); its <b>summed code</b> (the sum of its members' codes) is "
        "scored as one feature. <i>selectivity (family)</i> is the summed code's, <i>best "
        "member</i> the best single member's for the same label.</p>",
    ]
    if families.empty:
        parts.append("<p class='note'>No families: no two features are that close.</p>")
        return "".join(parts)
    t = families.head(n).copy()

    def members(text: str) -> str:
        return " ".join(feature_link(int(f), shown) for f in text.split())

    t["members"] = [members(m) for m in t["members"]]
    t.insert(0, "id", [f"<span id='family-{f}'>{f}</span>" for f in t["family"]])
    cols = {"id": "family", "n_members": "features", "members": "members"}
    if "view" in t.columns:
        cols = {"id": "family", "view": "view", "n_members": "features", "members": "members"}
    cols["frequency"] = "frequency"
    if "top_column" in t.columns:
        t["label"] = t["top_column"].astype(str) + " = " + t["top_label"].astype(str)
        cols |= {
            "label": "top label",
            "selectivity_family": "selectivity (family)",
            "best_member": "best member",
            "selectivity_best_member": "selectivity (best member)",
        }
        t["best_member"] = [feature_link(int(f), shown) for f in t["best_member"]]
    t = t[list(cols)].rename(columns=cols)
    more = len(families) - len(t)
    parts.append(
        f"<p class='note'>{len(families)} families"
        + (f"; the {len(t)} largest:" if more > 0 else ":")
        + "</p>"
    )
    parts.append(html_table(t, "families", raw=["family", "members", "best member"]))
    return "".join(parts)


def given_name(row) -> str:
    """The name a person gave the feature (``feature_notes``), or ''."""
    v = row["name"] if "name" in row.index else ""
    return v if isinstance(v, str) else ""


def feature_name(row) -> str:
    """What to call a feature: the name a person gave it, else the first phrase of its
    description (the measurement it follows most closely, e.g. "RNA: nuclear total intensity
    up"), else ''."""
    named = given_name(row)
    if named:
        return named
    described = row["description"] if "description" in row.index else ""
    if not isinstance(described, str) or not described:
        return ""
    first = described.split(";")[0].split(",")[0]
    return first.rsplit(" (", 1)[0].strip()


#: A stain leads an atom when its share is at least this many times an even share (1 / C).
STAIN_LEAD = 1.5


def stain_shares(row, stain_cols: Sequence[str], least: float = 0.05) -> str:
    """The stains an atom reads, largest share first (those of at least ``least``), said
    plainly when none stands out of an even split."""
    if not stain_cols:
        return ""
    shares = row[list(stain_cols)].astype(float).sort_values(ascending=False)
    kept = [(str(c)[len("stain_") :], v) for c, v in shares.items() if v >= least]
    listed = ", ".join(f"{name} {v:.0%}" for name, v in kept)
    even = 1.0 / len(stain_cols)
    if shares.iloc[0] < STAIN_LEAD * even:
        return f"no stain stands out (even split {even:.0%}): {listed}"
    return listed


def disagreement(row, f: int, profiles, sels) -> str:
    """A plain sentence for a feature whose well profiles single out other values than its
    most selective label (cell by cell); '' when they agree or there is nothing to compare."""
    if "top_label" not in row.index or not row["top_column"]:
        return ""
    column, label = str(row["top_column"]), str(row["top_label"])
    hits = [
        (prof.column, prof.values[i])
        for prof in profiles
        for i in np.flatnonzero(prof.hit_mask()[:, f])
    ]
    others = [(c, str(v)) for c, v in hits if (c, str(v)) != (column, label)]
    if not others:
        return ""
    also = " also" if len(others) < len(hits) else ""
    named = ", ".join(f"{c} = {v}" for c, v in others[:3])
    named += f" and {len(others) - 3} more" if len(others) > 3 else ""
    fractions = ""
    sel = sels.get(column)
    if sel is not None and label in [str(v) for v in sel.values]:
        i = [str(v) for v in sel.values].index(label)
        others = np.delete(sel.p_active[:, f], i)
        fractions = (
            f" (active in {sel.p_active[i, f]:.0%} of its cells, at most "
            f"{(others.max() if others.size else 0):.0%} of any other value's)"
        )
    return (
        f"Cell by cell this feature is most selective for {column} = {label}{fractions}, but "
        f"the well profiles{also} single out {named}. The two measure different things: "
        "selectivity counts the cells where a feature fires at all, over every well; a profile "
        "compares each well's mean code with its own plate's control wells. They part when a "
        "few strongly active cells lift a well's mean, or when those wells differ from their "
        "controls in something other than the label (cell type, plate, position). If either "
        "value is known to change nothing (a null or mock treatment), read the feature as such "
        "a well effect, not a concept."
    )


def _positive_wells(ex, f: int) -> int:
    """How many wells have at least one cell with a positive code of feature ``f``."""
    codes, table = ex.cell_codes()
    col = codes[:, f].tocoo()
    rows = col.row[col.data > 0]
    return int(table[["plate", "well"]].iloc[rows].drop_duplicates().shape[0])


def feature_html(
    ex,
    pixels,
    f,
    row,
    sels,
    stain_cols,
    profiles,
    plates,
    control_wells,
    n_cells,
    why=None,
    *,
    per_well: int | None = None,
) -> str:
    facts = [
        f"<b>frequency</b> {row['frequency']:.3f} of cells",
        f"<b>mean code when active</b> {row['mean_activation']:.3g}",
    ]
    title = f"Feature {f}"
    if feature_name(row):
        title += f" “{feature_name(row)}”"
    note = str(row["note"]) if "note" in row.index and isinstance(row["note"], str) else ""
    if note:
        facts.insert(0, f"<b>note</b> {html.escape(note)}")
    if "view" in row.index:
        title += f" ({html.escape(str(row['view']))})"
        facts.append(f"<b>view</b> {html.escape(str(row['view']))}")
    if "level" in row.index:
        facts.append(f"<b>level</b> {int(row['level'])} (in the first {int(row['level'])} atoms)")
    if "family" in row.index and int(row["family"]) >= 0:
        facts.append(
            f"<b>family</b> <a href='#family-{int(row['family'])}'>{int(row['family'])}</a>"
        )
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
        facts.append(
            f"<b>stains</b> {html.escape(stain_shares(row, stain_cols))} (share of the atom "
            "in each stain's channel tokens)"
        )
    cells = ex.top_cells(f, n_cells, per_well=per_well)
    figs = []
    if len(cells):
        n_wells = cells[["plate", "well"]].drop_duplicates().shape[0]
        spread = f"<b>top cells</b> {len(cells)} from {n_wells} well{'s' if n_wells != 1 else ''}"
        if per_well is not None:
            spread += (
                f" (at most {per_well} per well; {_positive_wells(ex, f)} wells have a cell "
                "where it is positive)"
            )
        facts.append(spread)
    sentence = disagreement(row, f, profiles, sels)
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
    sentence = f"<p class='note disagree'>{html.escape(sentence)}</p>" if sentence else ""
    return (
        f"<section class='feature' id='feature-{f}' data-feature='{f}'><h3>{html.escape(title)}"
        f"</h3><div class='facts'>{' · '.join(facts)}</div>{sentence}"
        f"<div class='figs'>{''.join(figs)}</div></section>"
    )


def activity_html(activity: pd.DataFrame | None, notes: Sequence[str] = ()) -> str:
    """The phenotypic activity section: what mAP means, then one row per label value with the
    mAP and q-value of each kind of features (:func:`..analysis.activity.activity_table`)."""
    from ..analysis.activity import EXPLANATION, FDR_ALPHA, activity_side_by_side

    parts = ["<h2 id='activity'>Phenotypic activity (mAP)</h2>"]
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    if activity is None or activity.empty:
        if not notes:
            parts.append(
                "<p class='note'>No phenotypic activity: no label column has replicate wells "
                "and control wells.</p>"
            )
        return "".join(parts)
    names = list(dict.fromkeys(activity["features"]))
    what = {
        "codes": "the dictionary's codes",
        "tokens": "the raw cell tokens the dictionary reads (before whitening)",
        "CellProfiler": "CellProfiler measurements (cp-measure, cached beside the store)",
    }
    parts.append(
        f"<p class='note'>{html.escape(EXPLANATION)}. A well "
        "profile is the mean over the well's cells; each kind of features is scored the same "
        f"way. <b>Bold</b>: active (q &le; {FDR_ALPHA:g}). A value needs replicate wells to "
        "be scored, and with few of them even a perfect mAP has a large q.</p>"
        "<p class='note'>Compared: "
        + "; ".join(html.escape(f"{n}: {what.get(n, n)}") for n in names)
        + ".</p>"
    )
    wide = activity_side_by_side(activity)
    if {"codes mAP", "tokens mAP"} <= set(wide.columns):
        scored = wide.dropna(subset=["codes mAP", "tokens mAP"])
        counts = []
        for column, part in scored.groupby("column", sort=False):
            better = int((part["codes mAP"] >= part["tokens mAP"]).sum())
            noun = "value" if len(part) == 1 else "values"
            counts.append(f"{better} of {len(part)} {column} {noun}")
        if counts:
            parts.append(
                "<p class='note'>The codes' mAP is at least the raw tokens' for "
                f"{html.escape(', '.join(counts))}.</p>"
            )
    shown = wide[["column", "value", "wells"]].copy()
    for n in names:
        cells = []
        for m, q in zip(wide[f"{n} mAP"], wide[f"{n} q"], strict=True):
            if not np.isfinite(m):
                cells.append("")
                continue
            text = f"{m:.2f} <span class='q'>(q {q:.3f})</span>"
            cells.append(f"<b>{text}</b>" if q <= FDR_ALPHA else text)
        shown[f"{n} mAP"] = cells
    shown["random mAP"] = [f"{r:.2f}" if np.isfinite(r) else "" for r in wide["random mAP"]]
    raw = [f"{n} mAP" for n in names]
    return "".join(parts) + html_table(shown, "activity", raw=raw)
