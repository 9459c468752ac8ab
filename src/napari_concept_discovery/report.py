"""A report of a dictionary on a whole store that a person reads in a browser, with no server.

Everything is computed through :class:`~.explore.Explorer` (top cells with their boxes, site
activation maps, per-well means, the feature table) and :mod:`.concepts` (selectivity per label
value, concept profiles), so the report, the viewer and ``analyze`` show the same numbers.
Figures are drawn with matplotlib's Agg canvas (no pyplot, no backend switch, no Qt) and embedded
in one HTML file as base64 PNGs; the page has no scripts, fonts or style sheets from elsewhere
(docs/architecture.md, "The report").
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import textwrap
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ._files import atomic_path, atomic_write_text, check_not_foreign, owned_files
from .concepts import (
    HIT_FRACTION,
    MIN_WELLS,
    ConceptProfiles,
    concept_profiles,
    require_columns,
    selectivity,
)
from .errors import ConceptDiscoveryError, DataWarning, StoreError
from .progress import Cancel, ProgressCallback, is_cancelled, report
from .settings import Settings, SettingsError, check, option

#: Columns of a token table that are never a metadata label (keys, geometry, counts).
NOT_LABELS = ("plate", "well", "site", "label", "row", "col", "column", "tile", "cell", "patch")
#: A column with more distinct values than this is not offered as a label by default.
MAX_LABEL_VALUES = 50
#: A label's best feature leads the ranking only when at least this selective.
LEAD_SELECTIVITY = 0.2
#: Features and perturbations drawn in the clustered profile heatmap at most.
HEATMAP_FEATURES = 40
HEATMAP_VALUES = 60
#: Hits listed in the page (all of them go to hits.csv).
HITS_SHOWN = 40
#: Sites whose composites are kept in memory while the thumbnails are cut.
SITE_CACHE = 16
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
        check(self.threshold > 0, "threshold", f"must be positive, got {self.threshold}")
        if self.controls is not None:
            from .dictionary.whiten import parse_control

            try:
                parse_control(self.controls)
            except ConceptDiscoveryError as exc:
                raise SettingsError(str(exc)) from None


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


class _Pixels:
    """Channel composites of the plate's sites (a few kept), for thumbnails and overlays."""

    def __init__(self, store):
        from .plate_embedding import reopen_plate

        self.plate = None
        self.problem = None
        try:
            self.plate = reopen_plate(store)
        except StoreError as exc:
            self.problem = str(exc)
        self._cache: OrderedDict = OrderedDict()

    def composite(self, key) -> np.ndarray | None:
        """An RGB (H, W, 3) float image in [0, 1] of the site, or None without the plate."""
        from ._reader import channel_colormaps, contrast_limits, initially_visible
        from .plate import SiteKey
        from .thumbnails import composite, named_colour

        if self.plate is None:
            return None
        key = SiteKey.of(key)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        image = np.asarray(self.plate[key].read(), dtype=np.float32)
        names = list(self.plate.channel_names)
        colours = channel_colormaps(names, image)
        shown = initially_visible(names, colours)
        on = [i for i, v in enumerate(shown) if v]
        rgb = (
            composite(
                image[on],
                [named_colour(colours[i]) for i in on],
                [contrast_limits(image[i]) for i in on],
            ).astype(np.float32)
            / 255.0
        )
        self._cache[key] = rgb
        while len(self._cache) > SITE_CACHE:
            self._cache.popitem(last=False)
        return rgb


def _crop(image: np.ndarray, box: Sequence[int], pad: float = 0.4, least: int = 48):
    """A square window around ``box`` (y0, x0, y1, x1), zero-padded at the borders."""
    y0, x0, y1, x1 = (int(v) for v in box)
    side = max(least, int(math.ceil(max(y1 - y0, x1 - x0) * (1 + pad))))
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    top, left = cy - side // 2, cx - side // 2
    out = np.zeros((side, side, *image.shape[2:]), image.dtype)
    sy0, sx0 = max(top, 0), max(left, 0)
    sy1, sx1 = min(top + side, image.shape[0]), min(left + side, image.shape[1])
    out[sy0 - top : sy1 - top, sx0 - left : sx1 - left] = image[sy0:sy1, sx0:sx1]
    return out


# --- figures ----------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _encode(fig, photo: bool = False) -> bytes:
    """PNG for plots; JPEG for figures made of micrographs, which PNG compresses poorly."""
    buf = io.BytesIO()
    kw = {"format": "jpeg", "pil_kwargs": {"quality": 88}} if photo else {"format": "png"}
    fig.savefig(buf, dpi=100, bbox_inches="tight", facecolor=fig.get_facecolor(), **kw)
    return buf.getvalue()


def top_cells_figure(ex, pixels: _Pixels, cells: pd.DataFrame, feature: int):
    """Thumbnails of the feature's top cells, the cell outlined, code and well in the title."""
    n = len(cells)
    ncol = max(1, math.ceil(n / math.ceil(n / 8))) if n else 1  # rows of at most 8, even
    nrow = max(1, math.ceil(n / ncol))
    fig = _figure(1.6 * ncol, 1.75 * nrow)
    fig.set_facecolor("black")
    for i, c in enumerate(cells.itertuples(index=False)):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        ax.set_axis_off()
        key = (c.plate, c.well, int(c.site))
        rgb = pixels.composite(key)
        if rgb is None or c.y0 < 0:
            continue
        box = (c.y0, c.x0, c.y1, c.x1)
        ax.imshow(_crop(rgb, box), interpolation="nearest")
        mask = _crop(ex.labels(key) == int(c.label), box)
        if mask.any():
            ax.contour(mask.astype(float), levels=[0.5], colors=["white"], linewidths=0.9)
        ax.set_title(f"{c.plate} {c.well} s{c.site}\ncode {c.value:.2f}", fontsize=7, color="w")
    fig.suptitle(
        f"feature {feature}: its {n} most active cells", color="w", fontsize=9, y=1.0, va="bottom"
    )
    return fig


def site_figure(ex, pixels: _Pixels, key, feature: int):
    """One site: its channel composite, and the feature's patch activations over it (for a
    cell dictionary only the patches mostly in cells, as the viewer shows them)."""
    from .overlay import shown_map
    from .plate import SiteKey

    key = SiteKey.of(key)
    rgb = pixels.composite(key)
    amap = shown_map(ex, key, feature, ex.labels(key))
    lo, hi = ex.feature_limits(feature)
    fig = _figure(8.6, 4.2)
    ax1 = fig.add_subplot(1, 2, 1)
    ax2 = fig.add_subplot(1, 2, 2)
    shape = rgb.shape[:2] if rgb is not None else None
    up = amap.upsampled(shape)
    if rgb is not None:
        ax1.imshow(rgb, interpolation="nearest")
        ax2.imshow(rgb.mean(-1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    shown = np.ma.masked_invalid(np.ma.masked_less_equal(up, 0))
    im = ax2.imshow(shown, cmap="magma", vmin=lo, vmax=hi, alpha=0.75, interpolation="nearest")
    for ax in (ax1, ax2):
        ax.set_xticks([])
        ax.set_yticks([])
    ax1.set_title(f"site {key.plate} {key.well} s{key.site}", fontsize=9)
    ax2.set_title(f"feature {feature} on its {amap.scale[0]:.0f}-px patches", fontsize=9)
    cb = fig.colorbar(im, ax=ax2, fraction=0.046, pad=0.03)
    cb.set_label("code", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    return fig


def plate_figure(ex, feature: int, plates: Sequence[str], controls: pd.DataFrame | None):
    """Mean code per well on every plate, one colour scale; control wells marked with a dot."""
    grids = [(p, *ex.plate_grid(feature, p)) for p in plates]
    vmax = max((np.nanmax(g) for _, g, _, _ in grids if np.isfinite(g).any()), default=1.0)
    vmin = min((np.nanmin(g) for _, g, _, _ in grids if np.isfinite(g).any()), default=0.0)
    vmin, vmax = min(vmin, 0.0), vmax if vmax > min(vmin, 0.0) else min(vmin, 0.0) + 1.0
    ncol = min(3, len(grids))
    nrow = math.ceil(len(grids) / ncol)
    h, w = grids[0][1].shape
    fig = _figure(min(4.2, 0.33 * w + 1.2) * ncol + 0.8, min(3.4, 0.33 * h + 1.0) * nrow)
    im = None
    axes = []
    for i, (plate, grid, rows, cols) in enumerate(grids):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        axes.append(ax)
        cmap = _cmap("viridis")
        im = ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        step = max(1, math.ceil(len(cols) / 12))
        ax.set_xticks(range(0, len(cols), step), [str(c) for c in cols[::step]], fontsize=7)
        rstep = max(1, math.ceil(len(rows) / 8))
        ax.set_yticks(range(0, len(rows), rstep), rows[::rstep], fontsize=7)
        ax.set_title(f"plate {plate}", fontsize=9)
        if controls is not None:
            from .explore import _row_index
            from .plate.model import normalize_well

            wells = [normalize_well(x) for x in controls.loc[controls.plate == plate, "well"]]
            ys = [_row_index(x.rstrip("0123456789")) for x in wells]
            xs = [int(x[len(x.rstrip("0123456789")) :]) - 1 for x in wells]
            ax.scatter(xs, ys, s=9, c="white", edgecolors="black", linewidths=0.5)
    cb = fig.colorbar(im, ax=axes, fraction=0.03, pad=0.02)
    cb.set_label("mean code per cell", fontsize=8)
    if controls is not None:
        fig.text(0.01, 0.0, "dots: control wells; grey: no well", fontsize=7, color="#444")
    cb.ax.tick_params(labelsize=7)
    return fig


def _cmap(name: str):
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad="#d9d9d9")


def selectivity_figure(sels: dict, feature: int, attribution: pd.Series | None):
    """Per label value, the fraction of its cells where the feature is active; the stains'
    shares of the atom beside them when the feature table has them."""
    panels = [(col, s) for col, s in sels.items()]
    extra = attribution is not None and len(attribution) > 0
    n = len(panels) + int(extra)
    heights = [max(1.2, 0.22 * len(s.values) + 0.7) for _, s in panels]
    if extra:
        heights.append(max(1.2, 0.22 * len(attribution) + 0.7))
    fig = _figure(4.4, sum(heights) + 0.3)
    gs = fig.add_gridspec(n, 1, height_ratios=heights, hspace=0.9)
    for i, (col, s) in enumerate(panels):
        ax = fig.add_subplot(gs[i])
        p = s.p_active[:, feature]
        best = int(np.argmax(s.avg[:, feature]))
        colours = ["#c2185b" if j == best else "#9e9e9e" for j in range(len(s.values))]
        y = np.arange(len(s.values))
        ax.barh(y, p, color=colours)
        ax.set_yticks(y, [str(v) for v in s.values], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, max(1e-3, float(p.max()) * 1.25))
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(
            f"{col}: active in this fraction of cells (selectivity "
            f"{s.avg[best, feature]:+.2f} for {s.values[best]})",
            fontsize=8,
        )
    if extra:
        ax = fig.add_subplot(gs[n - 1])
        y = np.arange(len(attribution))
        ax.barh(y, attribution.to_numpy(float), color="#00897b")
        ax.set_yticks(y, [str(i)[len("stain_") :] for i in attribution.index], fontsize=7)
        ax.invert_yaxis()
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title("stain attribution: share of the atom in each stain", fontsize=8)
    return fig


def profile_figure(prof: ConceptProfiles, features: Sequence[int]):
    """Clustered heatmap of median well z (label values x features), hits marked with dots."""
    from scipy.cluster.hierarchy import dendrogram, leaves_list, linkage

    order_v = np.argsort(-np.abs(prof.median_z[:, features]).max(1))[:HEATMAP_VALUES]
    z = prof.median_z[np.ix_(np.sort(order_v), features)]
    values = [prof.values[i] for i in np.sort(order_v)]
    hits = prof.hit_mask()[np.ix_(np.sort(order_v), features)]
    nv, nf = z.shape
    fig = _figure(min(14, 1.8 + 0.28 * nf + 1.2), min(16, 1.4 + 0.24 * nv + 0.8))
    gs = fig.add_gridspec(
        2, 3, width_ratios=[1.0, 0.28 * nf + 0.5, 0.25], height_ratios=[0.9, 0.24 * nv + 0.4]
    )
    ax = fig.add_subplot(gs[1, 1])
    rows, cols = np.arange(nv), np.arange(nf)
    tree = {"no_labels": True, "color_threshold": 0, "above_threshold_color": "#555555"}
    if nv > 1:
        left = fig.add_subplot(gs[1, 0])
        lv = linkage(z, "average", optimal_ordering=True)
        dendrogram(lv, ax=left, orientation="left", **tree)
        left.set_ylim(left.get_ylim()[::-1])  # leaves run bottom-up, heatmap rows top-down
        left.set_axis_off()
        rows = leaves_list(lv)
    if nf > 1:
        top = fig.add_subplot(gs[0, 1])
        lf = linkage(z.T, "average", optimal_ordering=True)
        dendrogram(lf, ax=top, **tree)
        top.set_axis_off()
        cols = leaves_list(lf)
    zz = z[np.ix_(rows, cols)]
    lim = float(max(prof.threshold * 2, np.nanpercentile(np.abs(zz), 98) if zz.size else 1.0))
    im = ax.imshow(zz, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    hy, hx = np.nonzero(hits[np.ix_(rows, cols)])
    ax.scatter(hx, hy, s=8, c="black")
    ax.set_yticks(range(nv), [values[i] for i in rows], fontsize=7)
    ax.set_xticks(range(nf), [str(features[j]) for j in cols], fontsize=6, rotation=90)
    ax.set_xlabel("feature", fontsize=8)
    ax.set_ylabel(prof.column, fontsize=8)
    cax = fig.add_subplot(gs[1, 2])
    cb = fig.colorbar(im, cax=cax)
    cb.set_label("median well z vs controls", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    return fig


# --- HTML -------------------------------------------------------------------------------------


_CSS = """
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


def _img(fig, alt: str, kind: str, photo: bool = False) -> str:
    data = base64.b64encode(_encode(fig, photo)).decode("ascii")
    mime = "image/jpeg" if photo else "image/png"
    return f'<img alt="{html.escape(alt)}" data-kind="{kind}" src="data:{mime};base64,{data}">'


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        if not np.isfinite(v):
            return ""
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def _table(df: pd.DataFrame, cls: str, raw: Sequence[str] = ()) -> str:
    """An HTML table; cells of the ``raw`` columns are HTML already, the rest are escaped."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for row in df.itertuples(index=False):
        cells = []
        for c, v in zip(df.columns, row, strict=True):
            num = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            text = str(v) if c in raw else html.escape(_fmt(v))
            cells.append(f'<td class="num">{text}</td>' if num else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>'
        + "".join(body)
        + "</tbody></table>"
    )


def _feature_link(f: int, shown: set[int]) -> str:
    return f'<a href="#feature-{f}">{f}</a>' if f in shown else str(f)


# --- the report -------------------------------------------------------------------------------


def _load(dictionary):
    from .dictionary.io import load_dictionary

    if isinstance(dictionary, (str, Path)):
        return Path(dictionary).stem, load_dictionary(dictionary)
    return str(dictionary.meta.get("name", dictionary.meta.get("method", "dictionary"))), dictionary


def _describe_whitening(meta: dict) -> str:
    w = meta.get("whitening") or {}
    if not w.get("controls"):
        return "none"
    by = f" per {w['by']}" if w.get("by") else ""
    return f"{w.get('mode', 'pca')} on {w['controls']}{by}"


def comparison_table(entries, labels: Sequence[str]) -> pd.DataFrame:
    """One row per dictionary: method, size, preparation, quality and selective features.

    ``entries`` are (name, dictionary, feature table) triples.
    """
    rows = []
    for name, d, features in entries:
        meta = d.meta
        m = meta.get("metrics") or {}
        cfg = (meta.get("train_settings") or {}) if isinstance(meta, dict) else {}
        live = features[features["n_active"] > 0]
        row = {
            "dictionary": name,
            "method": str(cfg.get("method", meta.get("method", "?"))),
            "atoms": int(d.n_atoms),
            "unit": str(meta.get("unit", "cell")),
            "whitening": _describe_whitening(meta),
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
                    f"{_feature_link(int(f), shown)} ({prof.median_z[i, f]:+.1f})" for f in top
                ),
            }
        )
    return pd.DataFrame(rows)


def check_report_folder(out: str | Path) -> Path:
    """Refuse, before any work, a report folder that cannot be written, that holds an
    ``index.html`` or ``hits.csv`` this package did not write there (the one rule of
    :func:`._files.check_not_foreign`), or that lies inside an activation store."""
    from .store import refuse_inside_store

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
    from .dictionary.pipeline import profile_controls
    from .explore import Explorer

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
    from .concepts import join_feature_columns
    from .dictionary.pipeline import named_features

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
        from .dictionary.whiten import parse_control

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
    pixels = _Pixels(store)
    if pixels.plate is not None:  # what measurements follow each feature (cached per store)
        from .measurements import describe_store

        described = describe_store(store, codes, plate=pixels.plate, cancel=cancel)
        if described is not None:
            features = join_feature_columns(features, described[["feature", "description"]])
    plates = sorted(table["plate"].astype(str).unique())
    stain_cols = [c for c in features.columns if str(c).startswith("stain_")]
    feats = features.set_index("feature")

    parts = [_header(store, name, primary, table, labels, controls)]
    parts.append(_toc(chosen, feats, why))
    parts.append("<h2 id='dictionaries'>Dictionaries</h2>")
    parts.append(
        "<p class='note'>FVU (fraction of variance unexplained), mean cosine, L0 (non-zeros per "
        "token) and dead features are measured after training on the training tokens; "
        "<i>silent here</i> counts features that fire on no cell of this store; "
        "<i>selective</i> counts features whose best selectivity (P(active | label) - "
        "P(active | other labels), over the label columns) is above 0.5 or 0.2. The feature "
        f"sections describe <b>{html.escape(name)}</b>.</p>"
    )
    parts.append(_table(comparison_table(entries, labels), "comparison"))
    parts.append(_quality_html(store, ex, pixels))
    parts.append(_profiles_html(profiles, chosen, shown, notes, out))
    parts.append("<h2 id='features'>Features</h2>")
    if pixels.problem:
        parts.append(f"<p class='note'>No cell thumbnails: {html.escape(pixels.problem)}</p>")
    for i, f in enumerate(chosen):
        if is_cancelled(cancel):
            raise _cancelled()
        report(progress, "report", i, len(chosen))
        parts.append(
            _feature_html(
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
            )
        )
    report(progress, "report", len(chosen), len(chosen))
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>Concept report: {html.escape(name)}</title><style>{_CSS}</style></head>"
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


#: Flagged sites drawn with their cell outlines in the report's quality section.
QUALITY_FIGURES = 4


def quality_figure(ex, pixels: _Pixels, keys: Sequence, reasons: Sequence[str]):
    """Flagged sites: the composite with the cells' outlines in white, the reason as title."""
    from skimage.segmentation import find_boundaries

    from .plate import SiteKey

    n = len(keys)
    cols = min(n, 2)  # two abreast, so the sites stay large on a page of any width
    rows = -(-n // cols)
    fig = _figure(4.6 * cols, 5.0 * rows)
    for i, (key, why) in enumerate(zip(keys, reasons, strict=True)):
        key = SiteKey.of(key)
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_axis_off()
        rgb = pixels.composite(key)
        labels = ex.labels(key)
        if rgb is None:
            rgb = np.zeros((*labels.shape, 3), np.float32)
        rgb = rgb.copy()
        if labels is not None and labels.shape == rgb.shape[:2]:
            rgb[find_boundaries(labels, mode="inner")] = (1.0, 1.0, 1.0)
        ax.imshow(rgb, interpolation="nearest")
        title = textwrap.fill(f"{key.plate} {key.well} s{key.site}: {why}", 64)
        ax.set_title(title, fontsize=7.5)
    return fig


def _quality_html(store, ex, pixels: _Pixels) -> str:
    """The segmentation quality section: the plate's medians, the flagged sites and reasons,
    and the first flagged sites drawn with their cells."""
    from .segment_qc import summary

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
    parts.append(_table(flagged[[c for c in cols if c in flagged]].reset_index(drop=True), "qc"))
    first = flagged.head(QUALITY_FIGURES)
    keys = [(r.plate, r.well, int(r.site)) for r in first.itertuples(index=False)]
    try:
        fig = quality_figure(ex, pixels, keys, list(first["reason"]))
        picture = _img(fig, "flagged sites with their cells outlined", "quality", photo=True)
        parts.append(f"<div class='figs'>{picture}</div>")
    except Exception as exc:  # a figure is a courtesy; the table above says what matters
        parts.append(f"<p class='note'>No figure of the flagged sites: {html.escape(str(exc))}</p>")
    return "".join(parts)


def _cancelled():
    from .progress import Cancelled

    return Cancelled("report cancelled")


def _header(store, name, dictionary, table, labels, controls) -> str:
    n_wells = table[["plate", "well"]].drop_duplicates().shape[0]
    n_sites = table[["plate", "well", "site"]].drop_duplicates().shape[0]
    meta = dictionary.meta
    return (
        "<header><h1>Concepts found by "
        f"{html.escape(name)}</h1>"
        f"<p>store {html.escape(str(store.path))}: {len(table)} cells, {n_sites} sites, "
        f"{n_wells} wells, {table['plate'].nunique()} plates; model "
        f"{html.escape(str(store.model_id))}, block {store.block}</p>"
        f"<p>dictionary: {html.escape(str(meta.get('train_settings', {}).get('method', '?')))}"
        f", {dictionary.n_atoms} features on {html.escape(str(meta.get('unit', 'cell')))} "
        f"tokens, whitening {html.escape(_describe_whitening(meta))}; labels: "
        f"{html.escape(', '.join(labels) or 'none')}; profile controls: "
        f"{html.escape(controls or 'none')}</p></header><main>"
    )


def _toc(chosen, feats, why: dict[int, str]) -> str:
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
        named = _given_name(r)
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


def _profiles_html(profiles, chosen, shown, notes, out) -> str:
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
                + _img(profile_figure(prof, pick), f"profile heatmap of {prof.column}", "profile")
                + "</div>"
            )
        parts.append(_table(profile_summary(prof, shown), "profiles", raw=["strongest (median z)"]))
        hits = prof.hits()
        if len(hits):
            shown_hits = hits.head(HITS_SHOWN).copy()
            shown_hits["feature"] = [_feature_link(int(f), shown) for f in shown_hits["feature"]]
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
            parts.append(_table(shown_hits, "hits", raw=["feature"]))
        else:
            parts.append("<p class='note'>No hits.</p>")
    return "".join(parts)


def _given_name(row) -> str:
    """The name a person gave the feature (``feature_notes``), or ''."""
    v = row["name"] if "name" in row.index else ""
    return v if isinstance(v, str) else ""


def _feature_html(
    ex, pixels, f, row, sels, stain_cols, profiles, plates, control_wells, n_cells, why=None
) -> str:
    facts = [
        f"<b>frequency</b> {row['frequency']:.3f} of cells",
        f"<b>mean code when active</b> {row['mean_activation']:.3g}",
    ]
    title = f"Feature {f}"
    if _given_name(row):
        title += f" “{_given_name(row)}”"
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
            _img(
                top_cells_figure(ex, pixels, cells, f),
                f"top cells of feature {f}",
                "cells",
                photo=True,
            )
        )
        first = cells.iloc[0]
        figs.append(
            _img(
                site_figure(ex, pixels, (first.plate, first.well, int(first.site)), f),
                f"site overlay of feature {f}",
                "site",
                photo=True,
            )
        )
    figs.append(
        _img(plate_figure(ex, f, plates, control_wells), f"plate map of feature {f}", "plate")
    )
    if sels or attribution is not None:
        figs.append(
            _img(
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


__all__ = [
    "ReportError",
    "ReportSettings",
    "comparison_table",
    "default_labels",
    "rank_features",
    "write_report",
]
