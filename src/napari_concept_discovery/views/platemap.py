"""A plate as a grid of wells coloured by metadata or by a number per well (Qt-free).

Everything the plate navigator draws is decided here: which plate format holds the wells, where
each well sits in a widget of a given size, which metadata columns are worth colouring by, the
colour of every well with its legend, and the text of a well's tooltip. The widget only paints
rectangles and forwards clicks (see docs/architecture.md, "The viewer").
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..plate.model import natural_key, normalize_well, row_letters, well_position
from .colours import MAX_CATEGORIES, MISSING, RGBA, category_palette, map_values, value_range

# Standard microplates (rows, columns), smallest first; a plate is drawn in the smallest one
# that holds all its wells so that a well sits where it sits on the bench.
STANDARD_FORMATS: tuple[tuple[int, int], ...] = (
    (2, 3),
    (3, 4),
    (4, 6),
    (6, 8),
    (8, 12),
    (16, 24),
    (32, 48),
)
# Metadata columns a biologist most often colours a plate by, offered first when present.
PREFERRED_COLUMNS = (
    "cell_type",
    "perturbation",
    "well_type",
    "treatment",
    "compound",
    "sirna",
    "gene",
    "moa",
    "concentration",
    "dose",
)
KEY_COLUMNS = ("plate", "well", "site")
OTHER: RGBA = (0.75, 0.75, 0.75, 1.0)  # the categories beyond the palette, lumped together


@dataclass(frozen=True)
class PlateGrid:
    """Rows x columns of a plate format; wells are named by row letter and 1-based column."""

    n_rows: int
    n_cols: int

    @classmethod
    def for_wells(cls, wells: Iterable[str]) -> PlateGrid:
        """The smallest standard plate holding every well (the wells' bounding box beyond 1536)."""
        positions = [well_position(w) for w in wells]
        if not positions:
            return cls(*STANDARD_FORMATS[4])  # nothing to place: a 96-well plate
        need_r = max(r for r, _ in positions) + 1
        need_c = max(c for _, c in positions) + 1
        for rows, cols in STANDARD_FORMATS:
            if need_r <= rows and need_c <= cols:
                return cls(rows, cols)
        return cls(need_r, need_c)

    @property
    def row_names(self) -> list[str]:
        return [row_letters(r + 1) for r in range(self.n_rows)]

    def well(self, row: int, col: int) -> str:
        """The well at 0-based (row, col), e.g. (1, 2) -> ``"B03"``."""
        if not (0 <= row < self.n_rows and 0 <= col < self.n_cols):
            raise IndexError(f"({row}, {col}) is outside a {self.n_rows} x {self.n_cols} plate")
        return normalize_well(f"{row_letters(row + 1)}{col + 1}")

    def position(self, well: str) -> tuple[int, int]:
        r, c = well_position(well)
        if r >= self.n_rows or c >= self.n_cols:
            raise IndexError(f"well {well} is outside a {self.n_rows} x {self.n_cols} plate")
        return r, c


@dataclass(frozen=True)
class GridGeometry:
    """Where each well of ``grid`` is drawn in a ``width`` x ``height`` area, in pixels.

    Wells are square, with room on the left for row letters and on top for column numbers;
    the grid is centred horizontally.
    """

    grid: PlateGrid
    width: float
    height: float
    margin: float = 18.0  # room for row letters and column numbers
    gap: float = 0.12  # fraction of a well's pitch left between wells

    @property
    def pitch(self) -> float:
        """Distance between the centres of neighbouring wells."""
        w = (self.width - self.margin - 2) / self.grid.n_cols
        h = (self.height - self.margin - 2) / self.grid.n_rows
        return max(1.0, min(w, h))

    @property
    def origin(self) -> tuple[float, float]:
        used = self.margin + self.pitch * self.grid.n_cols
        return max(self.margin, self.margin + (self.width - used) / 2), self.margin

    def well_rect(self, row: int, col: int) -> tuple[float, float, float, float]:
        """(x, y, w, h) of the well at 0-based (row, col)."""
        x0, y0 = self.origin
        inset = self.pitch * self.gap / 2
        size = self.pitch - 2 * inset
        return x0 + col * self.pitch + inset, y0 + row * self.pitch + inset, size, size

    def well_at(self, x: float, y: float) -> tuple[int, int] | None:
        """0-based (row, col) under the point, or None outside the wells."""
        x0, y0 = self.origin
        col = math.floor((x - x0) / self.pitch)
        row = math.floor((y - y0) / self.pitch)
        if 0 <= row < self.grid.n_rows and 0 <= col < self.grid.n_cols:
            return row, col
        return None

    def label_step(self, min_pixels: float = 14.0) -> int:
        """Label every n-th row and column so that labels do not overlap (1536 wells: every 2nd)."""
        return max(1, math.ceil(min_pixels / self.pitch))

    def row_label_pos(self, row: int) -> tuple[float, float]:
        """Centre of the row letter of 0-based ``row``."""
        x0, y0 = self.origin
        return x0 - self.margin / 2, y0 + (row + 0.5) * self.pitch

    def col_label_pos(self, col: int) -> tuple[float, float]:
        x0, y0 = self.origin
        return x0 + (col + 0.5) * self.pitch, y0 - self.margin / 2


# --- per-well metadata ---------------------------------------------------------------------------


def well_table(sites: pd.DataFrame) -> pd.DataFrame:
    """One row per (plate, well): ``n_sites``, ``sites`` and every per-well metadata column.

    ``sites`` is :meth:`Plate.site_table` (plate, well, site, metadata...). A column whose value
    differs between the sites of one well (``site_id``) says nothing about the well and is left
    out; NaN counts as a value, so a column empty for some sites of a well is left out too.
    """
    for col in ("plate", "well", "site"):
        if col not in sites.columns:
            raise ValueError(f"a site table needs a {col!r} column; it has {list(sites.columns)}")
    groups = sites.groupby(["plate", "well"], sort=True, dropna=False)
    out = groups["site"].agg(n_sites="size", sites=lambda s: tuple(sorted(int(x) for x in s)))
    for col in sites.columns:
        if col in KEY_COLUMNS:
            continue
        if groups[col].nunique(dropna=False).max() <= 1:
            out[col] = groups[col].first()
    return out.reset_index()


def colour_columns(wells: pd.DataFrame) -> list[str]:
    """Metadata columns worth colouring a plate by, best first.

    A column needs at least two values. Identifiers (``well_id``: a different ``..._id`` in every
    well) are left out: they colour every well differently and say nothing a tooltip does not.
    Well-known columns (cell type, perturbation, well type, ...) come first, then the others in
    table order, then those with a different value in every well (e.g. one siRNA per well).
    """
    skip = {*KEY_COLUMNS, "n_sites", "sites"}
    useful, distinct = [], []
    for col in wells.columns:
        if col in skip:
            continue
        n = wells[col].astype(str).nunique(dropna=False)
        if n < 2:
            continue
        if n == len(wells) and len(wells) > 2:
            if str(col).lower() == "id" or str(col).lower().endswith("_id"):
                continue
            distinct.append(col)
        else:
            useful.append(col)
    lower = {str(c).lower(): c for c in useful + distinct}
    first = [lower[p] for p in PREFERRED_COLUMNS if p in lower]
    return first + [c for c in useful + distinct if c not in first]


def well_tooltip(row: dict, value: tuple[str, object] | None = None) -> str:
    """The text shown when hovering a well: plate, well, sites, then its metadata.

    ``value`` is (title, number) when the plate is coloured by a number per well.
    """
    n = int(row.get("n_sites", 0))
    lines = [f"{row['well']} on {row['plate']}: {n} site{'s' if n != 1 else ''}"]
    if value is not None:
        title, number = value
        shown = "no value" if _missing(number) else f"{float(number):.4g}"
        lines.append(f"{title}: {shown}")
    for col, val in row.items():
        if col in (*KEY_COLUMNS, "n_sites", "sites"):
            continue
        lines.append(f"{col}: {'(none)' if _missing(val) else val}")
    return "\n".join(lines)


# --- colours -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LegendEntry:
    label: str
    colour: RGBA
    count: int  # wells with this colour, over all plates


@dataclass(frozen=True)
class PlateColouring:
    """The colour of every well that has one, keyed by (plate, well), and what explains it.

    Categorical colourings have a ``legend`` (counts over all plates) and each well's legend
    label in ``labels``; numeric ones have ``limits`` and a ``colormap`` for a colour bar.
    ``values`` holds what each well shows, for tooltips.
    """

    title: str
    colours: dict[tuple[str, str], RGBA]
    values: dict[tuple[str, str], object] = field(default_factory=dict)
    legend: tuple[LegendEntry, ...] = ()
    labels: dict[tuple[str, str], str] = field(default_factory=dict)
    limits: tuple[float, float] | None = None
    colormap: str | None = None

    @property
    def numeric(self) -> bool:
        return self.limits is not None

    def legend_for(self, plate: str) -> list[LegendEntry]:
        """The legend entries present on one plate, with that plate's well counts.

        Colours stay those of the whole folder, so a category looks the same on every plate.
        """
        counts: dict[str, int] = {}
        for (p, _), label in self.labels.items():
            if p == plate:
                counts[label] = counts.get(label, 0) + 1
        return [
            LegendEntry(e.label, e.colour, counts[e.label])
            for e in self.legend
            if e.label in counts
        ]


def colour_by_column(
    wells: pd.DataFrame, column: str, max_categories: int = MAX_CATEGORIES
) -> PlateColouring:
    """Categorical colours for ``column`` of :func:`well_table`, the same on every plate.

    Categories are in natural order (``2 < 10``); beyond ``max_categories`` the most frequent
    ones keep a colour and the rest share one "other" entry. Empty cells are "(none)", grey.
    """
    if column not in wells.columns:
        raise ValueError(
            f"no metadata column {column!r} to colour wells by; the plate has "
            f"{', '.join(colour_columns(wells)) or 'no per-well columns'}"
        )
    labels = ["(none)" if _missing(v) else str(v) for v in wells[column]]
    keys = list(zip(wells["plate"].astype(str), wells["well"].astype(str), strict=True))
    counts = pd.Series(labels).value_counts()
    present = [c for c in counts.index if c != "(none)"]
    if len(present) > max_categories:
        ranked = sorted(present, key=lambda c: (-counts[c], natural_key(c)))
        kept = sorted(ranked[: max_categories - 1], key=natural_key)
    else:
        kept = sorted(present, key=natural_key)
    palette = dict(zip(kept, category_palette(len(kept)), strict=True))
    others = [c for c in present if c not in palette]
    other_label = f"{len(others)} other values"
    colours: dict[tuple[str, str], RGBA] = {}
    shown: dict[tuple[str, str], str] = {}
    for key, label in zip(keys, labels, strict=True):
        if label == "(none)":
            colours[key], shown[key] = MISSING, label
        elif label in palette:
            colours[key], shown[key] = palette[label], label
        else:
            colours[key], shown[key] = OTHER, other_label
    legend = [LegendEntry(c, palette[c], int(counts[c])) for c in kept]
    if others:
        legend.append(LegendEntry(other_label, OTHER, int(sum(counts[c] for c in others))))
    if "(none)" in counts.index:
        legend.append(LegendEntry("(none)", MISSING, int(counts["(none)"])))
    values = dict(zip(keys, wells[column].tolist(), strict=True))
    return PlateColouring(column, colours, values, tuple(legend), shown)


def per_well_values(df: pd.DataFrame) -> pd.DataFrame:
    """Check and normalise a (plate, well, value) table; messages name the rows at fault."""
    missing = [c for c in ("plate", "well", "value") if c not in df.columns]
    if missing:
        raise ValueError(
            f"per-well values need columns plate, well and value; missing {', '.join(missing)} "
            f"(the table has {', '.join(map(str, df.columns))})"
        )
    out = pd.DataFrame(
        {
            "plate": df["plate"].astype(str),
            "well": [normalize_well(w) for w in df["well"]],
            "value": pd.to_numeric(df["value"], errors="coerce"),
        }
    )
    bad = out["value"].isna() & df["value"].notna()
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(
            f"per-well value of {out['well'].iloc[i]} on {out['plate'].iloc[i]} is not a number: "
            f"{df['value'].iloc[i]!r}"
        )
    dup = out.duplicated(["plate", "well"], keep=False)
    if dup.any():
        first = out[dup].iloc[0]
        raise ValueError(f"per-well values name well {first['well']} on {first['plate']} twice")
    return out


def colour_by_value(
    df: pd.DataFrame,
    title: str,
    colormap: str = "viridis",
    limits: tuple[float, float] | None = None,
) -> PlateColouring:
    """Colours for a number per well (plate, well, value), one scale over all plates.

    ``limits`` default to the range of the finite values; NaN wells are grey ("no value").
    """
    table = per_well_values(df)
    limits = value_range(table["value"]) if limits is None else (float(limits[0]), float(limits[1]))
    rgba = map_values(table["value"].to_numpy(), colormap, limits)
    keys = list(zip(table["plate"], table["well"], strict=True))
    colours = {k: tuple(float(x) for x in c) for k, c in zip(keys, rgba, strict=True)}
    values = dict(zip(keys, table["value"].tolist(), strict=True))
    return PlateColouring(title, colours, values, limits=limits, colormap=colormap)


def colour_bar(colormap: str, n: int = 64) -> np.ndarray:
    """(n, 4) RGBA from low to high, for drawing the colour bar of a numeric colouring."""
    return map_values(np.linspace(0.0, 1.0, n), colormap, (0.0, 1.0))


def _missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip() == "" or value.lower() == "nan"
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False
