"""Cell thumbnails for the gallery: a channel composite crop around a cell, with its outline.

The gallery shows the cells where a feature fires most; a biologist judges them by eye, so a
thumbnail is drawn like the viewer draws the site (the channels shown, in their colours and
display ranges, added up) with the cell's outline on top. Qt-free: arrays in, an RGB array out
(see docs/architecture.md, "The viewer").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RGB = tuple[float, float, float]

# The napari colormap names the reader gives channels, as the colour of a channel at full value.
NAMED_COLOURS: dict[str, RGB] = {
    "blue": (0.0, 0.0, 1.0),
    "green": (0.0, 1.0, 0.0),
    "red": (1.0, 0.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "gray": (1.0, 1.0, 1.0),
    "grey": (1.0, 1.0, 1.0),
    "bop orange": (1.0, 0.6, 0.0),
}
OUTLINE: RGB = (1.0, 1.0, 1.0)


def named_colour(name: str) -> RGB:
    """The colour of a napari colormap name at full value; unknown names are white."""
    return NAMED_COLOURS.get(str(name).lower(), (1.0, 1.0, 1.0))


def composite(
    image: np.ndarray,
    colours: Sequence[RGB],
    limits: Sequence[tuple[float, float]],
) -> np.ndarray:
    """(H, W, 3) uint8: each (C, H, W) channel scaled to its limits, tinted, added, clipped.

    This is napari's additive blending of linear colormaps; pass only the channels shown.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"a composite needs a (C, H, W) image, got shape {image.shape}")
    if not len(colours) == len(limits) == image.shape[0]:
        raise ValueError(
            f"{image.shape[0]} channels need as many colours and limits, got {len(colours)} "
            f"colours and {len(limits)} limits"
        )
    out = np.zeros((*image.shape[1:], 3), np.float32)
    for plane, colour, (lo, hi) in zip(image, colours, limits, strict=True):
        span = float(hi) - float(lo)
        scaled = np.clip((plane.astype(np.float32) - float(lo)) / (span if span > 0 else 1.0), 0, 1)
        out += scaled[..., None] * np.asarray(colour, np.float32)
    return (np.clip(out, 0.0, 1.0) * 255).round().astype(np.uint8)


def outline(mask: np.ndarray) -> np.ndarray:
    """The inner boundary of a boolean mask: pixels of the mask with a 4-neighbour outside it."""
    mask = np.asarray(mask, bool)
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & mask
    return mask & ~inner


def square_box(
    box: Sequence[float], shape: Sequence[int], pad: float = 0.25, min_size: int = 24
) -> tuple[int, int, int, int]:
    """A square (y0, x0, y1, x1) around a cell's box, ``pad`` of its size added on each side.

    Kept inside the image when it fits (shifted rather than cut), so a cell at the edge is
    not shown squeezed.
    """
    y0, x0, y1, x1 = (float(v) for v in box)
    h, w = int(shape[0]), int(shape[1])
    side = max(y1 - y0, x1 - x0) * (1 + 2 * pad)
    side = int(min(max(side, min_size), h, w))
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    top = int(round(cy - side / 2))
    left = int(round(cx - side / 2))
    top = min(max(top, 0), h - side)
    left = min(max(left, 0), w - side)
    return top, left, top + side, left + side


def resize_nearest(array: np.ndarray, size: int) -> np.ndarray:
    """A (size, size, ...) copy of a square-ish array by nearest neighbour (pixels stay crisp).

    The outline is drawn after resizing, so it stays one thumbnail pixel wide and unbroken.
    """
    h, w = array.shape[:2]
    ys = np.minimum((np.arange(size) + 0.5) * h / size, h - 1).astype(int)
    xs = np.minimum((np.arange(size) + 0.5) * w / size, w - 1).astype(int)
    return array[ys][:, xs]


def cell_thumbnail(
    image: np.ndarray,
    labels: np.ndarray,
    label: int,
    box: Sequence[float],
    colours: Sequence[RGB],
    limits: Sequence[tuple[float, float]],
    size: int = 80,
    outline_colour: RGB = OUTLINE,
) -> np.ndarray:
    """(size, size, 3) uint8 thumbnail of cell ``label``: composite crop and its outline.

    ``image`` is (C, H, W) with only the channels to show; ``labels`` (H, W) the site's cell
    labels; ``box`` the cell's (y0, x0, y1, x1) bounding box in pixels (end exclusive).
    """
    labels = np.asarray(labels)
    if labels.shape != image.shape[1:]:
        raise ValueError(f"labels {labels.shape} do not match the image {image.shape[1:]}")
    y0, x0, y1, x1 = square_box(box, labels.shape)
    rgb = resize_nearest(composite(image[:, y0:y1, x0:x1], colours, limits), int(size))
    mask = resize_nearest(labels[y0:y1, x0:x1] == int(label), int(size))
    rgb[outline(mask)] = (np.asarray(outline_colour) * 255).round().astype(np.uint8)
    return rgb
