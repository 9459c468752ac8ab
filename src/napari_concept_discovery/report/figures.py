"""The report's figures, drawn on matplotlib's Agg canvas (no pyplot, so importing the report
changes no backend in a napari process): micrographs of top cells and sites with the feature
painted as the viewer paints it, plate maps, selectivity bars, the clustered profile heatmap
and the quality gallery. ``Pixels`` reads and caches site images as the viewer shows them."""

from __future__ import annotations

import io
import math
import textwrap
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..analysis.profiles import ConceptProfiles
from ..errors import StoreError

HEATMAP_VALUES = 60


#: Sites whose composites are kept in memory while the thumbnails are cut.
SITE_CACHE = 16


class Pixels:
    """Channel composites of the plate's sites (a few kept), for thumbnails and overlays."""

    def __init__(self, store):
        from ..embed.plate import reopen_plate

        self.plate = None
        self.problem = None
        try:
            self.plate = reopen_plate(store)
        except StoreError as exc:
            self.problem = str(exc)
        self._cache: OrderedDict = OrderedDict()

    def composite(self, key) -> np.ndarray | None:
        """An RGB (H, W, 3) float image in [0, 1] of the site, or None without the plate."""
        from ..plate import SiteKey
        from ..views.channels import channel_colormaps, contrast_limits, initially_visible
        from ..views.thumbnails import composite, named_colour

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


def crop_box(image: np.ndarray, box: Sequence[int], pad: float = 0.4, least: int = 48):
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


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def encode_figure(fig, photo: bool = False) -> bytes:
    """PNG for plots; JPEG for figures made of micrographs, which PNG compresses poorly."""
    buf = io.BytesIO()
    kw = {"format": "jpeg", "pil_kwargs": {"quality": 88}} if photo else {"format": "png"}
    fig.savefig(buf, dpi=100, bbox_inches="tight", facecolor=fig.get_facecolor(), **kw)
    return buf.getvalue()


def top_cells_figure(ex, pixels: Pixels, cells: pd.DataFrame, feature: int):
    """Thumbnails of the feature's top cells, the cell outlined, code and well in the title."""
    n = len(cells)
    ncol = max(1, math.ceil(n / math.ceil(n / 8))) if n else 1  # rows of at most 8, even
    nrow = max(1, math.ceil(n / ncol))
    fig = new_figure(1.6 * ncol, 1.75 * nrow)
    fig.set_facecolor("black")
    for i, c in enumerate(cells.itertuples(index=False)):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        ax.set_axis_off()
        key = (c.plate, c.well, int(c.site))
        rgb = pixels.composite(key)
        if rgb is None or c.y0 < 0:
            continue
        box = (c.y0, c.x0, c.y1, c.x1)
        ax.imshow(crop_box(rgb, box), interpolation="nearest")
        mask = crop_box(ex.labels(key) == int(c.label), box)
        if mask.any():
            ax.contour(mask.astype(float), levels=[0.5], colors=["white"], linewidths=0.9)
        ax.set_title(f"{c.plate} {c.well} s{c.site}\ncode {c.value:.2f}", fontsize=7, color="w")
    wells = cells[["plate", "well"]].drop_duplicates().shape[0] if n else 0
    fig.suptitle(
        f"feature {feature}: its {n} most active cells, from {wells} well"
        + ("s" if wells != 1 else ""),
        color="w",
        fontsize=9,
        y=1.0,
        va="bottom",
    )
    return fig


def site_figure(ex, pixels: Pixels, key, feature: int):
    """One site: its channel composite, and the feature's patch activations over it (for a
    cell dictionary only the patches mostly in cells, as the viewer shows them)."""
    from ..plate import SiteKey
    from ..views.overlay import shown_map

    key = SiteKey.of(key)
    rgb = pixels.composite(key)
    amap = shown_map(ex, key, feature, ex.labels(key))
    lo, hi = ex.feature_limits(feature)
    fig = new_figure(8.6, 4.2)
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
    fig = new_figure(min(4.2, 0.33 * w + 1.2) * ncol + 0.8, min(3.4, 0.33 * h + 1.0) * nrow)
    im = None
    axes = []
    for i, (plate, grid, rows, cols) in enumerate(grids):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        axes.append(ax)
        cmap = colormap("viridis")
        im = ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        step = max(1, math.ceil(len(cols) / 12))
        ax.set_xticks(range(0, len(cols), step), [str(c) for c in cols[::step]], fontsize=7)
        rstep = max(1, math.ceil(len(rows) / 8))
        ax.set_yticks(range(0, len(rows), rstep), rows[::rstep], fontsize=7)
        ax.set_title(f"plate {plate}", fontsize=9)
        if controls is not None:
            from ..plate.model import well_position

            wells = controls.loc[controls.plate == plate, "well"]
            ys = [well_position(x)[0] for x in wells]
            xs = [well_position(x)[1] for x in wells]
            ax.scatter(xs, ys, s=9, c="white", edgecolors="black", linewidths=0.5)
    cb = fig.colorbar(im, ax=axes, fraction=0.03, pad=0.02)
    cb.set_label("mean code per cell", fontsize=8)
    if controls is not None:
        fig.text(0.01, 0.0, "dots: control wells; grey: no well", fontsize=7, color="#444")
    cb.ax.tick_params(labelsize=7)
    return fig


def colormap(name: str):
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
    fig = new_figure(4.4, sum(heights) + 0.3)
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
    # The row labels sit right of the heatmap, in a column of their own sized to the longest
    # label, so neither the dendrogram (left) nor the colour bar can print over them.
    label_w = 0.55 + 0.062 * max((len(str(v)) for v in values), default=1)
    widths = [1.0, 0.28 * nf + 0.5, label_w, 0.25]
    fig = new_figure(min(16, sum(widths) + 1.0), min(16, 1.4 + 0.24 * nv + 0.8))
    gs = fig.add_gridspec(
        2, 4, width_ratios=widths, height_ratios=[0.9, 0.24 * nv + 0.4], wspace=0.04
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
    ax.yaxis.tick_right()
    ax.set_yticks(range(nv), [values[i] for i in rows], fontsize=7)
    ax.set_xticks(range(nf), [str(features[j]) for j in cols], fontsize=6, rotation=90)
    ax.set_xlabel("feature", fontsize=8)
    ax.yaxis.set_label_position("right")
    ax.set_ylabel(prof.column, fontsize=8, labelpad=6)
    cax = fig.add_subplot(gs[1, 3])
    cb = fig.colorbar(im, cax=cax)
    cb.set_label("median well z vs controls", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    return fig


#: Flagged sites drawn with their cell outlines in the report's quality section.
QUALITY_FIGURES = 4


def quality_figure(ex, pixels: Pixels, keys: Sequence, reasons: Sequence[str]):
    """Flagged sites: the composite with the cells' outlines in white, the reason as title."""
    from skimage.segmentation import find_boundaries

    from ..plate import SiteKey

    n = len(keys)
    cols = min(n, 2)  # two abreast, so the sites stay large on a page of any width
    rows = -(-n // cols)
    fig = new_figure(4.6 * cols, 5.0 * rows)
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
