"""One feature in one place: the numbers behind the explorer's feature card, and its figure.

A person judging a feature wants, side by side, the cells where it is strongest, how its
activations spread in control cells and in the rest, which label values it is selective for,
which stains drive it, where on the plate it fires, and what measurements follow it. This module
gathers them (:func:`card_data`) and draws them as one matplotlib figure (:func:`card_figure`,
an RGB array), Qt-free; the explorer widget shows the picture and the report could too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from ..analysis.concepts import selectivity
from .thumbnails import RGB

#: Top cells drawn large on the card.
N_CELLS = 8
CELL_SIZE = 112


@dataclass
class CardData:
    """What the card shows for one feature (arrays in, no drawing)."""

    feature: int
    title: str
    description: str
    controls_label: str | None  # "well_type=negative_control", or None without controls
    control_values: np.ndarray  # codes of control cells (0 where inactive)
    other_values: np.ndarray  # codes of the other cells
    selectivity_column: str | None
    selectivity: pd.Series  # avg selectivity per value of that column
    stains: pd.Series  # share of the atom per stain (empty for channel-mean tokens)
    plates: list[tuple[str, np.ndarray, list[str], list[int]]] = field(default_factory=list)
    cells: list = field(default_factory=list)  # feature_views.Thumbnail, strongest first


def card_data(
    explorer,
    feature: int,
    *,
    plate=None,
    colours: Mapping[str, RGB] | None = None,
    column: str | None = None,
    name: str = "",
    description: str = "",
    controls: str | None = None,
    n_cells: int = N_CELLS,
    size: int = CELL_SIZE,
    cancel=None,
) -> CardData:
    """Gather a feature's card. ``column`` is the label column whose values the selectivity
    panel shows (the one the feature is most selective for, from the feature table);
    ``controls`` (COLUMN=VALUE, default: the dictionary's
    whitening controls) splits the histogram; ``plate`` (to read pixels) adds the top cells."""
    from ..analysis.analyze import profile_controls
    from ..dictionary.control import parse_control
    from .feature_views import top_cell_thumbnails

    f = explorer._feature(feature)
    codes, table = explorer.cell_codes()
    values = np.asarray(codes[:, f].todense()).ravel().astype(np.float32)
    controls = profile_controls(explorer.dictionary, controls)
    is_ctrl = np.zeros(len(values), bool)
    if controls:
        ccol, cval = parse_control(controls)
        if ccol in table.columns:
            is_ctrl = table[ccol].astype(str).to_numpy() == str(cval)
        else:
            controls = None
    sel = pd.Series(dtype=float)
    if column is not None and column in table.columns:
        s = selectivity(codes[:, [f]], table[column].astype(str).to_numpy(), column)
        sel = pd.Series(s.avg[:, 0], index=[str(v) for v in s.values]).sort_values()
    shares = explorer.dictionary.stain_table()
    stains = pd.Series(dtype=float)
    if shares is not None:
        cols = [c for c in shares.columns if c.startswith("stain_")]
        stains = pd.Series(
            shares.iloc[f][cols].to_numpy(np.float64), index=[c[len("stain_") :] for c in cols]
        )
    plates = []
    for p in sorted(table["plate"].astype(str).unique())[:2]:
        grid, rows, cols = explorer.plate_grid(f, p)
        plates.append((p, grid, rows, cols))
    cells = []
    if plate is not None:
        cells = top_cell_thumbnails(
            explorer, plate, f, colours or {}, n=n_cells, size=size, cancel=cancel
        )
    title = f"Feature {f}" + (f" \u201c{name}\u201d" if name else "")
    views = explorer.dictionary.feature_views()
    if views is not None:  # a dictionary in views: the view that found it
        title += f" ({views[f]} view)"
    return CardData(
        f,
        title,
        description,
        controls,
        values[is_ctrl],
        values[~is_ctrl],
        column,
        sel,
        stains,
        plates,
        cells,
    )


def card_figure(card: CardData, width_px: int = 900, dpi: int = 100) -> np.ndarray:
    """The card as one (H, W, 3) uint8 picture: top cells large on top; the activation
    histogram, selectivity per label value, stain shares and plate map below."""
    import textwrap

    from matplotlib.figure import Figure

    n_cells = len(card.cells)
    cell_rows = math.ceil(n_cells / 4) if n_cells else 0
    w_in = width_px / dpi
    cell_h = 0.83 * w_in / 4.6  # square cells: a column's width between the margins
    plot_h = max(1.9, 0.36 * w_in)
    described = (
        textwrap.fill(card.description, max(30, int(width_px / 6.2))) if card.description else ""
    )
    head = 0.45 + 0.16 * (described.count("\n") + 1 if described else 0)
    h_in = head + cell_rows * (cell_h + 0.2) + 2 * (plot_h + 0.55) + 0.35
    fig = Figure(figsize=(w_in, h_in), dpi=dpi)
    if cell_rows:
        outer = fig.add_gridspec(
            2, 1, height_ratios=[cell_rows * (cell_h + 0.2), 2 * (plot_h + 0.55)], hspace=0.1
        )
        cells_gs = outer[0].subgridspec(cell_rows, 4, hspace=0.2, wspace=0.08)
        plots = outer[1].subgridspec(2, 2, hspace=0.5, wspace=0.5)
    else:
        plots = fig.add_gridspec(2, 2, hspace=0.6, wspace=0.45)
    for i, t in enumerate(card.cells):
        ax = fig.add_subplot(cells_gs[i // 4, i % 4])
        ax.imshow(t.rgb, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(f"{t.well} s{t.site} #{t.label}: {t.value:.2g}", fontsize=7, pad=2)
    _histogram(fig.add_subplot(plots[0, 0]), card)
    _selectivity(fig.add_subplot(plots[0, 1]), card)
    _stains(fig.add_subplot(plots[1, 0]), card)
    _plate(fig.add_subplot(plots[1, 1]), card)
    fig.suptitle(card.title, fontsize=10, y=1 - 0.08 / h_in)
    if described:
        fig.text(0.5, 1 - 0.3 / h_in, described, ha="center", va="top", fontsize=8, color="#333")
    fig.subplots_adjust(left=0.12, right=0.9, top=1 - head / h_in, bottom=0.35 / h_in + 0.04)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _histogram(ax, card: CardData) -> None:
    on_c = card.control_values[card.control_values > 0]
    on_o = card.other_values[card.other_values > 0]
    top = max([float(v.max()) for v in (on_c, on_o) if v.size] + [1e-6])
    bins = np.linspace(0, top, 25)
    n_c, n_o = len(card.control_values), len(card.other_values)
    if card.controls_label and n_c:
        ax.hist(on_c, bins, color="#888888", alpha=0.7, density=False, label="controls")
    ax.hist(on_o, bins, color="#d95f02", alpha=0.6, label="other cells" if n_c else "cells")
    ax.set_xlabel("activation (active cells)", fontsize=7)
    ax.set_ylabel("cells", fontsize=7)
    frac_c = f"{(card.control_values > 0).mean():.0%} of controls, " if n_c else ""
    frac_o = f"{(card.other_values > 0).mean():.0%} of the rest" if n_o else ""
    ax.set_title(f"active: {frac_c}{frac_o}", fontsize=8)
    ax.tick_params(labelsize=7)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, frameon=False)


def _selectivity(ax, card: CardData) -> None:
    sel = card.selectivity
    if sel.empty:
        ax.text(0.5, 0.5, "no label column to judge selectivity", ha="center", fontsize=8)
        ax.set_axis_off()
        return
    sel = sel.iloc[-12:]  # the most selective values
    colours = ["#1b9e77" if v > 0 else "#bbbbbb" for v in sel]
    ax.barh(range(len(sel)), sel.to_numpy(), color=colours)
    ax.set_yticks(range(len(sel)), [str(v)[:18] for v in sel.index], fontsize=7)
    ax.tick_params(axis="y", pad=1)
    ax.xaxis.set_major_locator(MaxNLocator(4))
    ax.axvline(0, color="#444", lw=0.5)
    ax.set_title(f"selectivity per {card.selectivity_column}", fontsize=8)
    ax.tick_params(labelsize=7)


def _stains(ax, card: CardData) -> None:
    if card.stains.empty:
        ax.text(0.5, 0.5, "stain shares need per-channel tokens", ha="center", fontsize=8)
        ax.set_axis_off()
        return
    ax.bar(range(len(card.stains)), card.stains.to_numpy(), color="#7570b3")
    ax.set_xticks(range(len(card.stains)), list(card.stains.index), fontsize=7, rotation=30)
    ax.set_ylim(0, 1)
    ax.set_title("share of the atom per stain", fontsize=8)
    ax.tick_params(labelsize=7)


def _plate(ax, card: CardData) -> None:
    if not card.plates:
        ax.set_axis_off()
        return
    grids = [g for _, g, _, _ in card.plates]
    both = np.concatenate([g.ravel() for g in grids])
    vmax = float(np.nanmax(both)) if np.isfinite(both).any() else 1.0
    plate, grid, rows, cols = card.plates[0]
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=vmax if vmax > 0 else 1.0)
    step = max(1, math.ceil(len(cols) / 12))
    ax.set_xticks(range(0, len(cols), step), [str(c) for c in cols[::step]], fontsize=6)
    ax.set_yticks(range(len(rows)), rows, fontsize=6)
    more = f" (1 of {len(card.plates)})" if len(card.plates) > 1 else ""
    ax.set_title(f"mean per cell, {plate}{more}", fontsize=8)
    cb = ax.figure.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cb.ax.tick_params(labelsize=6)


__all__ = ["CardData", "card_data", "card_figure"]
