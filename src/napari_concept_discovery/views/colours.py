"""Colours for values and categories, shared by the plate map and the feature overlays.

Values go through a perceptual matplotlib colormap (the same tables napari uses for "magma",
"viridis", ...), so a cell and the plate map of the same feature agree; categories get the
tab10/tab20 palettes, easy to tell apart on a dark background. Qt-free.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps

RGBA = tuple[float, float, float, float]

MISSING: RGBA = (0.45, 0.45, 0.45, 1.0)  # a well or cell with no value: mid grey
MAX_CATEGORIES = 20  # tab20; more categories than this cannot be told apart by colour


def value_range(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """(low, high) over the finite values; a single value or none gives a range of width 1."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def map_values(
    values: Sequence[float] | np.ndarray,
    colormap: str = "viridis",
    limits: tuple[float, float] | None = None,
    missing: RGBA = MISSING,
) -> np.ndarray:
    """(N, 4) RGBA in [0, 1]: values scaled by ``limits`` (default: their range) and clipped.

    NaN (no value) gets ``missing``. ``colormap`` is a matplotlib colormap name.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    lo, hi = value_range(v) if limits is None else (float(limits[0]), float(limits[1]))
    if not hi > lo:
        raise ValueError(f"contrast limits must rise, got {limits}")
    try:
        cmap = colormaps[colormap]
    except KeyError:
        raise ValueError(f"unknown colormap {colormap!r} (a matplotlib name, e.g. magma)") from None
    scaled = np.clip((v - lo) / (hi - lo), 0.0, 1.0)
    rgba = cmap(np.nan_to_num(scaled, nan=0.0))
    rgba[~np.isfinite(v)] = missing
    return rgba


def category_palette(n: int) -> list[RGBA]:
    """``n`` distinct colours (n <= MAX_CATEGORIES): tab10 up to ten, else tab20."""
    if not 0 <= n <= MAX_CATEGORIES:
        raise ValueError(f"at most {MAX_CATEGORIES} categories get their own colour, asked {n}")
    table = colormaps["tab10" if n <= 10 else "tab20"].colors
    return [tuple(float(x) for x in (*table[i][:3], 1.0)) for i in range(n)]


def to_hex(rgba: Sequence[float]) -> str:
    """``#rrggbb`` for an RGBA in [0, 1] (alpha dropped), e.g. for Qt style sheets."""
    r, g, b = (int(round(float(x) * 255)) for x in rgba[:3])
    return f"#{r:02x}{g:02x}{b:02x}"
