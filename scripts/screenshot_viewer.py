"""Screenshot of the viewer as `concept-discovery view` opens it, with a feature painted.

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshot_viewer.py DEMO_OUT \
        [--out /tmp/viewer_full.png] [--docs docs/images/viewer.png] [--feature N]

DEMO_OUT is the output folder of `concept-discovery demo`. The feature painted is the most
selective of those active on at most a fifth of the cells and on several cells of the site
shown (or ``--feature``); the cell where it fires most is clicked so the cell panel is filled.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def wait(app, condition, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("the viewer did not get there in time")
        app.processEvents()
        time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo_out")
    parser.add_argument("--out", default="/tmp/viewer_full.png")
    parser.add_argument("--feature", type=int)
    parser.add_argument("--size", default="1500x950")
    parser.add_argument(
        "--docs", help="also write a 256-colour copy here (small enough for the README)"
    )
    args = parser.parse_args()

    import imageio.v3 as iio
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_concept_discovery.views.workspace import find_view_inputs
    from napari_concept_discovery.widgets import open_viewer
    from napari_concept_discovery.widgets._viewer import get_link, get_painter

    inputs = find_view_inputs(args.demo_out)
    viewer = napari.Viewer(title="Concept discovery")
    width, height = (int(v) for v in args.size.split("x"))
    viewer.window._qt_window.resize(width, height)  # noqa: SLF001
    opened = open_viewer(inputs.plate, inputs.store, inputs.dictionary, viewer=viewer)
    app = QApplication.instance()
    session = opened.embed.session
    wait(app, lambda: opened.explorer.features is not None)
    explorer, key = session.explorer, session.site_key
    feature = args.feature
    if feature is None:
        table = opened.explorer.features
        sparse = table[(table["n_active"] >= 5) & (table["frequency"] <= 0.2)]
        ranked = sparse.sort_values("selectivity_avg", ascending=False)
        feature = next(
            int(f) for f in ranked["feature"] if explorer.cell_values(key, f)["active"].sum() >= 3
        )
    opened.explorer.select_row(feature)
    painter, link = get_painter(viewer), get_link(viewer)
    wait(app, lambda: painter.painted is not None and not painter.busy and not link.busy)
    values = explorer.cell_values(key, feature)
    session.select_cell(int(values.sort_values("value").iloc[-1]["label"]))
    wait(app, lambda: len(opened.explorer.cell_table) > 0 and len(opened.explorer.thumbnails) > 0)
    nav = opened.navigator
    wait(app, lambda: nav.colour_combo.currentText().startswith(f"feature {feature}"))
    viewer.layers["cells"].visible = False
    viewer.reset_view()
    for _ in range(20):
        app.processEvents()
        time.sleep(0.05)
    shot = viewer.screenshot(canvas_only=False, flash=False)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(out, shot)
    print(f"feature {feature} on {key}: wrote {out} ({shot.shape[1]} x {shot.shape[0]})")
    if args.docs:
        from PIL import Image

        docs = Path(args.docs)
        docs.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(shot[..., :3]).quantize(colors=256).save(docs, optimize=True)
        print(f"wrote {docs} ({docs.stat().st_size // 1024} KB)")
    viewer.close()


if __name__ == "__main__":
    main()
