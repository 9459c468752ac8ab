"""How a site's channels are first shown: a colour per stain, which channels start visible, and
a display range per plane. Shared by the napari reader, the viewer's feature views and the
report's micrographs, so the three draw a site alike. No Qt, no napari.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

# Cell Painting colours as in RxRx's and JUMP's own renderings: DNA blue, ER green, actin/AGP red,
# RNA cyan, mitochondria magenta, membrane yellow. Matched on whole words of the channel name.
_COLOURS: list[tuple[tuple[str, ...], str]] = [
    (("dna", "hoechst", "dapi", "nuclei", "nucleus", "nuclear", "h33342", "draq5"), "blue"),
    (("er", "cona", "concanavalin", "endoplasmic", "calnexin"), "green"),
    (("actin", "phalloidin", "agp", "f-actin"), "red"),
    (("rna", "syto", "syto14", "nucleoli", "nucleolar"), "cyan"),
    (("mito", "mitotracker", "mitochondria", "tom20"), "magenta"),
    (("membrane", "wga", "golgi", "plasma"), "yellow"),
    (("gfp", "egfp", "fitc", "alexa488", "af488"), "green"),
    (("rfp", "mcherry", "tdtomato", "cy3", "tritc", "alexa568", "af568"), "red"),
    (("yfp",), "yellow"),
    (("cfp",), "cyan"),
    (("brightfield", "bf", "phase", "dic", "transmitted", "tl"), "gray"),
]
# For channels whose names say nothing (Phenix "ch1".."ch6"): distinct colours, in this order.
_FALLBACK = ["blue", "green", "red", "magenta", "yellow", "cyan", "bop orange", "gray"]
_BRIGHTFIELD_RATIO = 0.3


def _known_colour(name: str) -> str | None:
    words = set(re.split(r"[^a-z0-9]+", name.lower())) | {name.lower()}
    for keys, colour in _COLOURS:
        if words & set(keys) or any(name.lower().startswith(k) for k in keys if len(k) > 3):
            return colour
    return None


def looks_like_brightfield(plane: np.ndarray) -> bool:
    """Transmitted light has a bright background: its median sits far above the dark floor.

    Fluorescence backgrounds are near the floor (median at 1-15% of the 1-99.8 percentile range
    on the real plates here); brightfield sits at ~40%. Added on top of the stains it washes
    the picture out, so such channels start hidden.
    """
    lo, mid, hi = np.percentile(_subsample(plane), [1, 50, 99.8])
    return hi > lo and (mid - lo) / (hi - lo) > _BRIGHTFIELD_RATIO


def _foreground_fraction(plane: np.ndarray) -> float:
    lo, hi = contrast_limits(plane)
    return float((_subsample(plane) > lo + 0.25 * (hi - lo)).mean())


def channel_colormaps(names: Sequence[str], image: np.ndarray | None = None) -> list[str]:
    """A napari colormap per channel: by stain name, else distinct colours, gray for brightfield.

    With names that say nothing (Phenix "ch1".."ch6") and pixels at hand, the channel with the
    smallest bright area is taken for the nuclear stain and drawn blue, as a biologist expects
    DNA to be; only the colour is guessed, the name stays.
    """
    colours = [_known_colour(n) for n in names]
    if image is not None:
        for i, colour in enumerate(colours):
            if colour is None and looks_like_brightfield(image[i]):
                colours[i] = "gray"
        unknown = [i for i, c in enumerate(colours) if c is None]
        if "blue" not in colours and len(unknown) >= 2:
            nuclear = min(unknown, key=lambda i: _foreground_fraction(image[i]))
            colours[nuclear] = "blue"
    free = [c for c in _FALLBACK if c not in colours]
    for i, colour in enumerate(colours):
        if colour is None:
            colours[i] = free.pop(0) if free else _FALLBACK[i % len(_FALLBACK)]
    return colours


def initially_visible(names: Sequence[str], colours: Sequence[str]) -> list[bool]:
    """Which channels start shown: the nucleus and the next two stains (blue, green, red).

    Five or six stains added up turn every cell white, so only a classic three-colour composite
    starts shown; the other stains are one click away in the layer list. Brightfield never
    starts shown.
    """
    rank = {"blue": 0, "green": 1, "red": 2}
    stains = [i for i, c in enumerate(colours) if c != "gray"]
    shown = sorted(stains, key=lambda i: rank.get(colours[i], 3))[:3]
    return [i in shown for i in range(len(names))]


def _subsample(plane: np.ndarray, target: int = 512 * 512) -> np.ndarray:
    step = max(1, int(np.sqrt(plane.size / target)))
    return plane[::step, ::step]


def contrast_limits(plane: np.ndarray) -> tuple[float, float]:
    """Display range: black at the background peak, white at the 99.8th percentile.

    The background peak (the histogram's mode) rather than a low percentile puts camera offset
    and background noise at black, which matters when five or six channels are added up;
    it is capped at the median so a confluent field keeps its dim cytoplasm.
    """
    sub = _subsample(plane).astype(np.float64, copy=False)
    p1, p50, hi = np.percentile(sub, [1, 50, 99.8])
    if hi <= p1:
        return float(p1), float(p1) + 1.0
    counts, edges = np.histogram(sub, bins=256, range=(p1, hi))
    mode = edges[np.argmax(counts)] + (edges[1] - edges[0]) / 2
    lo = float(min(mode, p50))
    return lo, float(hi)
