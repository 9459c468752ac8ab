"""Time to recolour ~2000 cells of a 1080 x 1080 site by a feature's values, drawn on screen.

The known trap is napari issue 6732 (slow updates of a DirectLabelColormap). This compares the
ways to show per-cell values on napari 0.9.2 and prints the median and p95 over features of:

- ``paint_cells`` (what the widgets use): each active cell's value as pixels of an image layer
  (NaN elsewhere) gathered through a label index kept per site and written in place, plus the
  table into the ``features`` of a labels layer of outlines whose colours never change;
- a new DirectLabelColormap per feature on int32 labels with the table in ``Labels.features``
  (what the widgets did before);
- the same colormap on uint16 labels (napari then builds a 65536-entry lookup in Python).

"update" is the time until the layer holds the new colours (CPU), "shown" adds one render of
the canvas (a screenshot); an idle screenshot's time is printed beside them for reference.
On a shared machine the numbers move with the load: compare the rows of one run. Run shown
under Xvfb:

    xvfb-run -a -s "-screen 0 1280x1024x24" python benchmarks/bench_label_colours.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch  # noqa: F401  (before Qt, see docs/architecture.md)
from scipy import ndimage as ndi
from skimage.segmentation import watershed


def site_labels(size: int, n_cells: int, seed: int) -> np.ndarray:
    """Touching cells of ~20 px radius grown from random seeds, like a confluent site."""
    rng = np.random.default_rng(seed)
    markers = np.zeros((size, size), np.int32)
    pts = rng.integers(0, size, (n_cells, 2))
    markers[pts[:, 0], pts[:, 1]] = np.arange(1, n_cells + 1)
    dist = ndi.distance_transform_edt(markers == 0)
    labels = watershed(dist, markers).astype(np.int32)
    labels[dist > 12] = 0
    return labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1080)
    ap.add_argument("--cells", type=int, default=2000)
    ap.add_argument("--features", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import napari
    from napari.utils.colormaps import DirectLabelColormap

    from napari_concept_discovery.views.colours import map_values
    from napari_concept_discovery.views.overlay import cell_table
    from napari_concept_discovery.widgets._layers import paint_cells

    labels = site_labels(args.size, args.cells, args.seed)
    ids = np.unique(labels)[1:]
    rng = np.random.default_rng(args.seed)
    tables = []
    for _ in range(args.features):
        values = rng.random(len(ids))
        values[values < 0.6] = 0.0  # sparse codes: most cells inactive
        tables.append(pd.DataFrame({"label": ids, "activation": values}))

    def direct_colormap(table) -> DirectLabelColormap:
        active = table["activation"].to_numpy() > 0
        rgba = map_values(table["activation"][active], "magma", (0.0, 1.0))
        colours = {int(i): tuple(c) for i, c in zip(table["label"][active], rgba, strict=True)}
        colours[None] = (0.0, 0.0, 0.0, 0.0)
        return DirectLabelColormap(color_dict=colours)

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1280, 900)
    viewer.add_image(rng.random((args.size, args.size), np.float32), name="stain")

    def render() -> float:
        t = time.perf_counter()
        viewer.screenshot(canvas_only=True, flash=False)
        return time.perf_counter() - t

    render()
    idle = float(np.median([render() for _ in range(5)]))

    def timed(step) -> tuple[list[float], list[float]]:
        step(tables[0])  # layer creation and first upload are not what a click costs
        render()
        update, shown = [], []
        for table in tables:
            t = time.perf_counter()
            step(table)
            update.append(time.perf_counter() - t)
            shown.append(update[-1] + render())
        return update, shown

    results = {}
    results["paint_cells (values image + outlines, features)"] = timed(
        lambda table: paint_cells(viewer, labels, table, contrast_limits=(0.0, 1.0))
    )
    viewer.layers.clear()
    viewer.add_image(rng.random((args.size, args.size), np.float32), name="stain")
    direct = viewer.add_labels(labels, name="direct", opacity=0.6)

    def direct_int32(table):
        direct.colormap = direct_colormap(table)
        direct.features = cell_table(table)

    results["direct colormap per feature (int32, features)"] = timed(direct_int32)
    viewer.layers.remove(direct)
    u16 = viewer.add_labels(labels.astype(np.uint16), name="uint16")

    def direct_uint16(table):
        u16.colormap = direct_colormap(table)

    results["direct colormap on uint16 labels"] = timed(direct_uint16)

    print(
        f"{args.size} x {args.size} site, {len(ids)} cells, {args.features} features, "
        f"napari {napari.__version__}; an idle render takes {idle * 1e3:.1f} ms"
    )
    print(f"  {'':50s} {'update median/p95':>20s} {'shown median/p95':>20s}")
    for name, (update, shown) in results.items():
        u, s = np.array(update) * 1e3, np.array(shown) * 1e3
        print(
            f"  {name:50s} {np.median(u):9.1f} /{np.percentile(u, 95):6.1f} ms"
            f" {np.median(s):9.1f} /{np.percentile(s, 95):6.1f} ms"
        )
    viewer.close()


if __name__ == "__main__":
    main()
