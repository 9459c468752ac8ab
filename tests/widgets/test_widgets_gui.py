"""The plate navigator and the layer helpers in a real viewer, driven as a user would.

Needs a display: ``xvfb-run -a -s "-screen 0 1280x1024x24" python -m pytest tests/widgets/test_widgets_gui.py``.
Set ``NCD_SCREENSHOT_DIR`` to keep the screenshot of the docked navigator.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pandas as pd
import pytest
from matplotlib import colormaps

from napari_concept_discovery._reader import read_site
from napari_concept_discovery.plate import SiteKey
from napari_concept_discovery.views.channels import contrast_limits
from napari_concept_discovery.views.platemap import (
    colour_by_column,
    colour_by_value,
    well_table,
    well_tooltip,
)

pytestmark = pytest.mark.gui

PLUGIN = "napari-concept-discovery"
CHANNELS = ["DNA", "ER", "Actin", "RNA", "Mito", "Membrane"]


@pytest.fixture(scope="module")
def plates(tmp_path_factory):
    """Two small plates of five wells with two 96-pixel sites each."""
    from napari_concept_discovery.synth import write_synthetic_plates

    out = tmp_path_factory.mktemp("nav")
    return write_synthetic_plates(out, n_plates=2, n_wells=5, n_sites=2, size=96, seed=1)


def wait_idle(qtbot, viewer):
    from napari_concept_discovery.widgets._viewer import get_link

    link = get_link(viewer)
    qtbot.waitUntil(lambda: not link.busy, timeout=20000)


def assert_shows(viewer, plate, key):
    """The plate's layers hold exactly this site's pixels, labels and display ranges."""
    key = SiteKey.of(key)
    image = plate[key].read()
    for i, name in enumerate(CHANNELS):
        layer = viewer.layers[name]
        np.testing.assert_array_equal(layer.data, image[i])
        assert tuple(layer.contrast_limits) == pytest.approx(contrast_limits(image[i]))
        assert layer.metadata["site_key"] == tuple(key) and layer.metadata["channel"] == name
    np.testing.assert_array_equal(viewer.layers["cells"].data, plate[key].read_labels())
    assert viewer.layers["cells"].metadata["site_key"] == tuple(key)


def navigator(viewer):
    """The navigator as a user gets it: Plugins > Concept Discovery > Plate navigator."""
    from napari_concept_discovery.widgets import PlateNavigator

    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Plate navigator")
    assert isinstance(widget, PlateNavigator)
    return widget


def test_navigator_finds_a_plate_opened_before_it(make_napari_viewer, plates, qtbot):
    viewer = make_napari_viewer()
    viewer.open(str(plates), plugin=PLUGIN)
    nav = navigator(viewer)
    plate = nav.session.plate
    assert plate is not None and plate.root == plates
    assert nav.session.site_key == SiteKey("SYNTH_1", "B02", 1)
    assert nav.plate_name == "SYNTH_1" and nav.map_view.in_view == "B02"
    assert sorted(nav.map_view.wells) == ["B02", "B03", "B04", "C02", "C03"]
    assert nav.plate_combo.isVisibleTo(nav)  # two plates: the selector is offered
    assert nav.colour_choices()[:4] == ["cell_type", "perturbation", "well_type", "sirna"]
    assert nav.status.text() == "In view: SYNTH_1 B02 site 1"


def test_click_a_well_and_a_site_to_move_through_the_plate(make_napari_viewer, plates, qtbot):
    from qtpy.QtCore import Qt

    viewer = make_napari_viewer()
    nav = navigator(viewer)  # docked first: it follows the plate opened afterwards
    assert nav.map_view.wells == {}
    viewer.open(str(plates), plugin=PLUGIN)
    plate = nav.session.plate
    assert plate.root == plates
    layers_before = list(viewer.layers)
    viewer.layers["DNA"].colormap = "cyan"  # the user's own choices must survive a move
    viewer.layers["RNA"].visible = True

    nav.colour_combo.setCurrentIndex(nav.colour_choices().index("cell_type"))
    wells = well_table(plate.site_table())
    assert nav.map_view.colouring.colours == colour_by_column(wells, "cell_type").colours
    for cell_type in wells[wells.plate == "SYNTH_1"]["cell_type"].unique():
        assert cell_type in nav.legend.text()

    qtbot.mouseClick(nav.map_view, Qt.MouseButton.LeftButton, pos=nav.map_view.well_center("C03"))
    wait_idle(qtbot, viewer)
    assert nav.session.site_key == ("SYNTH_1", "C03", 1)
    assert_shows(viewer, plate, ("SYNTH_1", "C03", 1))
    assert list(viewer.layers) == layers_before  # the same layers, none added
    assert viewer.layers["DNA"].colormap.name == "cyan" and viewer.layers["RNA"].visible
    assert not viewer.layers["Mito"].visible
    assert [nav.site_combo.itemText(i) for i in range(nav.site_combo.count())] == [
        "site 1",
        "site 2",
    ]
    assert nav.map_view.selected == "C03" and nav.map_view.in_view == "C03"

    nav.site_combo.setCurrentIndex(1)  # what choosing "site 2" in the dropdown does
    nav.site_combo.activated.emit(1)
    wait_idle(qtbot, viewer)
    assert_shows(viewer, plate, ("SYNTH_1", "C03", 2))
    assert nav.status.text() == "In view: SYNTH_1 C03 site 2"

    nav.select_plate("SYNTH_2")  # another plate of the folder: its map, the viewer stays
    assert nav.plate_name == "SYNTH_2" and nav.map_view.in_view is None
    assert nav.session.site_key == ("SYNTH_1", "C03", 2)
    nav.select_well("B04")
    wait_idle(qtbot, viewer)
    assert_shows(viewer, plate, ("SYNTH_2", "B04", 1))
    assert nav.map_view.in_view == "B04" and nav.plate_combo.currentText() == "SYNTH_2"

    nav.session.set_site(("SYNTH_1", "B03", 2))  # moved by another widget (e.g. a gallery)
    wait_idle(qtbot, viewer)
    assert nav.plate_name == "SYNTH_1" and nav.map_view.selected == "B03"
    assert nav.site_combo.currentText() == "site 2"
    assert_shows(viewer, plate, ("SYNTH_1", "B03", 2))


def test_hovering_a_well_shows_its_metadata(make_napari_viewer, plates, qtbot):
    from qtpy.QtCore import QEvent
    from qtpy.QtGui import QHelpEvent
    from qtpy.QtWidgets import QApplication, QToolTip

    viewer = make_napari_viewer(show=True)
    viewer.open(str(plates), plugin=PLUGIN)
    nav = navigator(viewer)
    view = nav.map_view
    pos = view.well_center("B03")
    QApplication.sendEvent(view, QHelpEvent(QEvent.Type.ToolTip, pos, view.mapToGlobal(pos)))
    wells = well_table(nav.session.plate.site_table())
    row = wells[(wells.plate == "SYNTH_1") & (wells.well == "B03")].iloc[0].to_dict()
    assert QToolTip.text() == well_tooltip(row) + "\n\nClick to show this well in the viewer."
    assert QToolTip.text().startswith("B03 on SYNTH_1: 2 sites")
    assert f"cell_type: {row['cell_type']}" in QToolTip.text()
    assert view.tooltip("A01") == "A01: no images"


def test_per_well_values_colour_the_plate_with_a_colour_bar(make_napari_viewer, plates):
    viewer = make_napari_viewer()
    viewer.open(str(plates), plugin=PLUGIN)
    nav = navigator(viewer)
    wells = well_table(nav.session.plate.site_table())
    values = pd.DataFrame(
        {"plate": wells.plate, "well": wells.well, "value": np.linspace(0.0, 3.0, len(wells))}
    )
    values.loc[1, "value"] = np.nan
    title = "feature 7: mean activation"
    nav.show_values(values, title, colormap="magma")
    assert nav.colour_combo.currentText() == title and nav.colour_choices()[0] == title
    assert nav.colour_bar.isVisibleTo(nav)
    expected = colour_by_value(values, title, "magma")
    assert nav.map_view.colouring.colours == expected.colours
    first = values.iloc[0]
    assert np.allclose(expected.colours[(first.plate, first.well)], colormaps["magma"](0.0))
    assert f"{title}: 0" in nav.map_view.tooltip(first.well)
    assert f"{title}: no value" in nav.map_view.tooltip(values.iloc[1].well)

    nav.colour_by("well_type")  # back to metadata: the values stay one click away
    assert not nav.colour_bar.isVisibleTo(nav) and nav.colour_choices()[0] == title
    assert "negative_control" in nav.legend.text()
    nav.show_values(values.assign(value=values.value * 2), "feature 8: mean activation")
    assert nav.colour_choices().count("feature 8: mean activation") == 1
    assert title not in nav.colour_choices()  # replaced, not piled up
    nav.clear_values()
    assert nav.colour_choices()[0] == "cell_type" and not nav.colour_bar.isVisibleTo(nav)


def test_a_stale_site_is_dropped(make_napari_viewer, plates, qtbot):
    from napari_concept_discovery.widgets._viewer import get_link

    viewer = make_napari_viewer()
    viewer.open(str(plates), plugin=PLUGIN)
    nav = navigator(viewer)
    plate, link = nav.session.plate, get_link(viewer)
    old = nav.session.ticket()
    late = read_site(plate, old.site_key)  # a read that finishes after the user moved on
    nav.select_well("C02")
    wait_idle(qtbot, viewer)
    dropped = link.dropped
    assert link.show(old, late) is False and link.dropped == dropped + 1
    assert_shows(viewer, plate, ("SYNTH_1", "C02", 1))
    # quick clicks: reads of several sites in flight at once, only the last one lands
    for well in ("B03", "B04", "C03"):
        nav.select_well(well)
    wait_idle(qtbot, viewer)
    assert_shows(viewer, plate, ("SYNTH_1", "C03", 1))


def test_open_a_plate_folder_from_the_navigator(make_napari_viewer, plates, tmp_path, qtbot):
    from napari.utils.notifications import notification_manager

    viewer = make_napari_viewer()
    nav = navigator(viewer)
    empty = tmp_path / "not_a_plate"
    empty.mkdir()
    n = len(notification_manager.records)
    assert nav.open_plate_folder(str(empty)) is False
    assert len(viewer.layers) == 0 and nav.session.plate is None
    assert str(empty) in notification_manager.records[n].message

    assert nav.open_plate_folder(str(plates)) is True
    wait_idle(qtbot, viewer)
    assert [layer.name for layer in viewer.layers] == [*CHANNELS, "cells"]
    assert [layer.visible for layer in viewer.layers] == [True] * 3 + [False] * 4
    assert_shows(viewer, nav.session.plate, ("SYNTH_1", "B02", 1))
    assert nav.map_view.in_view == "B02"


def test_paint_a_feature_at_pixel_scale(make_napari_viewer, plates):
    from napari_concept_discovery.widgets._layers import feature_layers, paint_feature

    viewer = make_napari_viewer()
    viewer.open(str(plates), plugin=PLUGIN)
    grid = np.random.default_rng(0).random((6, 6)).astype(np.float32)  # 96 px / 16 px patches
    layer = paint_feature(
        viewer, grid, patch_size=16, contrast_limits=(0.0, 2.0), name="feature 12"
    )
    assert viewer.layers[-1] is layer and layer.name == "feature 12"
    np.testing.assert_array_equal(layer.data, grid)  # the grid itself, not an upsampled copy
    assert tuple(layer.scale) == (16.0, 16.0) and tuple(layer.translate) == (7.5, 7.5)
    assert layer.colormap.name == "magma" and layer.blending == "additive"
    assert tuple(layer.contrast_limits) == (0.0, 2.0)

    # it covers exactly the site's pixels, and each pixel shows the patch it belongs to
    def edges(lay):  # napari's extent runs between pixel centres; a pixel spans a step
        return lay.extent.world + np.array([-0.5, 0.5])[:, None] * lay.extent.step

    np.testing.assert_allclose(edges(layer), edges(viewer.layers["DNA"]))
    np.testing.assert_allclose(edges(layer), [[-0.5, -0.5], [95.5, 95.5]])
    for y, x in [(0, 0), (15, 15), (16, 16), (47, 80), (95, 95)]:
        assert layer.get_value((y, x), world=True) == grid[y // 16, x // 16]

    other = np.full((12, 12), 0.5, np.float32)  # another feature, another model's patch size
    again = paint_feature(
        viewer, other, patch_size=8, offset=(0, 0), contrast_limits=(0.0, 1.0), name="feature 3"
    )
    assert again is layer and feature_layers(viewer)[0] is layer
    assert layer.name == "feature 3" and tuple(layer.scale) == (8.0, 8.0)
    assert tuple(layer.translate) == (3.5, 3.5) and tuple(layer.contrast_limits) == (0.0, 1.0)
    assert sum(1 for lay in viewer.layers if lay.metadata.get("role") == "feature_map") == 1


def test_colour_active_cells_by_value(make_napari_viewer, plates, qtbot):
    from napari_concept_discovery.widgets._layers import feature_layers, paint_cells, paint_feature

    viewer = make_napari_viewer(show=True)
    viewer.open(str(plates), plugin=PLUGIN)
    nav = navigator(viewer)
    labels = viewer.layers["cells"].data
    ids = np.unique(labels)[1:]
    assert len(ids) >= 2
    values = np.where(np.arange(len(ids)) % 2 == 0, np.linspace(0.2, 1.0, len(ids)), 0.0)
    table = pd.DataFrame({"label": ids, "activation": values})
    key = nav.session.site_key
    image, layer = paint_cells(
        viewer, labels, table, contrast_limits=(0.0, 1.0), name="feature 12 cells", site_key=key
    )
    assert feature_layers(viewer)[1:] == (image, layer)
    assert image.name == "feature 12 cells" and image.metadata["site_key"] == tuple(key)
    assert image.colormap.name == "magma" and tuple(image.contrast_limits) == (0.0, 1.0)
    # each active cell's pixels hold its value; inactive cells and background are clear (NaN)
    for label, value in zip(ids, values, strict=True):
        inside = image.data[labels == label]
        if value > 0:
            np.testing.assert_allclose(inside, value, rtol=1e-6)
        else:
            assert np.isnan(inside).all()
    assert np.isnan(image.data[labels == 0]).all()
    # the cells' identity and values: a labels layer of outlines keyed by label
    np.testing.assert_array_equal(layer.data, labels)
    assert layer.metadata["site_key"] == tuple(key) and layer.contour == 1
    features = layer.features
    assert features["label"].tolist() == ids.tolist() and features["index"].tolist() == ids.tolist()
    np.testing.assert_allclose(features["activation"], values)
    assert features["active"].tolist() == (values > 0).tolist()

    # on screen: napari draws NaN transparent, so inactive cells show the stains as they are
    viewer.reset_view()
    for other in viewer.layers:
        other.visible = other is image or other.name == "DNA"

    def shot():
        return viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)

    painted = shot()
    image.visible = False
    bare = shot()
    image.visible = True
    assert (np.abs(painted - bare).max(axis=-1) > 8).sum() > 50  # the active cells are drawn
    paint_cells(viewer, labels, table.assign(activation=0.0), contrast_limits=(0.0, 1.0))
    assert np.abs(shot() - bare).max() <= 2  # no active cell: nothing drawn over the stains
    paint_cells(viewer, labels, table, contrast_limits=(0.0, 1.0))
    np.testing.assert_array_equal(shot(), painted)  # written in place, drawn again

    heard = []
    layer.events.features.connect(lambda e: heard.append(1))
    buffer = image.data
    again = paint_cells(viewer, labels, table.assign(activation=0.5), contrast_limits=(0.0, 2.0))
    assert again == (image, layer) and heard  # re-assigned: listeners hear the new table
    assert image.data is buffer and tuple(image.contrast_limits) == (0.0, 2.0)  # written in place
    np.testing.assert_allclose(image.data[labels == ids[1]], 0.5)

    # label ids beyond 2**16 keep their own ids (no renumbering needed for an image of values)
    big = np.where(labels > 0, labels + 100_000, 0)
    big_table = table.assign(label=table.label + 100_000)
    paint_cells(viewer, big, big_table, contrast_limits=(0.0, 1.0))
    assert layer.features["label"].tolist() == (ids + 100_000).tolist()
    np.testing.assert_allclose(image.data[big == ids[0] + 100_000], values[0], rtol=1e-6)

    # moving to another site empties the painted layers until the feature is painted again
    paint_feature(viewer, np.ones((6, 6)), patch_size=16, contrast_limits=(0.0, 1.0))
    nav.select_well("C03")
    wait_idle(qtbot, viewer)
    fmap = viewer.layers["feature"]
    assert not fmap.data.any() and fmap.metadata["site_key"] is None
    assert np.isnan(image.data).all() and image.metadata["site_key"] is None
    assert not layer.data.any() and len(layer.features) == 0


def test_screenshot_of_the_docked_navigator(make_napari_viewer, plates, qtbot, tmp_path):
    from napari_concept_discovery.widgets._layers import paint_cells, paint_feature

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1280, 860)
    viewer.open(str(plates), plugin=PLUGIN)
    nav = navigator(viewer)
    nav.colour_by("perturbation")
    nav.select_well("C03")
    wait_idle(qtbot, viewer)
    labels = viewer.layers["cells"].data
    ids = np.unique(labels)[1:]
    grid = np.zeros((6, 6), np.float32)
    grid[2:5, 1:4] = np.linspace(0.3, 1.0, 9).reshape(3, 3)
    paint_feature(viewer, grid, patch_size=16, contrast_limits=(0.0, 1.0), name="feature 12")
    table = pd.DataFrame({"label": ids, "activation": np.linspace(0.0, 1.0, len(ids))})
    paint_cells(viewer, labels, table, contrast_limits=(0.0, 1.0), name="feature 12 cells")
    viewer.reset_view()
    qtbot.wait(100)
    shot = viewer.screenshot(canvas_only=False, flash=False)
    import imageio.v3 as iio

    path = tmp_path / "widgets_shot.png"
    iio.imwrite(path, shot)
    if os.environ.get("NCD_SCREENSHOT_DIR"):
        shutil.copy(path, os.path.join(os.environ["NCD_SCREENSHOT_DIR"], "widgets_shot.png"))
    rgb = shot[..., :3].astype(int)
    assert shot.shape[1] >= 1000 and rgb.std() > 10
    # the well in view is drawn in its perturbation's colour somewhere in the dock
    colour = nav.map_view.colouring.colours[("SYNTH_1", "C03")]
    target = np.round(np.array(colour[:3]) * 255).astype(int)
    assert (np.abs(rgb - target).max(axis=-1) <= 2).sum() > 50


def test_closing_the_navigator_leaves_the_session_working(make_napari_viewer, plates, qtbot):
    from qtpy.QtWidgets import QApplication

    from napari_concept_discovery.widgets import PlateNavigator

    viewer = make_napari_viewer()
    viewer.open(str(plates), plugin=PLUGIN)
    session = navigator(viewer).session
    before = len(session.site_changed)
    second = PlateNavigator(viewer)
    dock = viewer.window.add_dock_widget(second, name="second navigator")
    assert len(session.site_changed) == before + 1
    viewer.window.remove_dock_widget(dock)
    second.deleteLater()
    qtbot.waitUntil(lambda: len(session.site_changed) == before, timeout=5000)
    QApplication.processEvents()
    session.set_site(("SYNTH_1", "B03", 1))  # no slot of a deleted widget is called
    wait_idle(qtbot, viewer)
    assert viewer.layers["DNA"].metadata["site_key"] == ("SYNTH_1", "B03", 1)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_named_like_an_image_does_not_freeze_the_navigator(
    make_napari_viewer, plates, tmp_path, qtbot
):
    """A FIFO (or socket, device) where a channel image should be is skipped with a warning that
    names it; opening the plate does not block the viewer on reading its header."""
    import signal

    from napari.utils.notifications import notification_manager

    copy = tmp_path / "plates"
    shutil.copytree(plates, copy)
    image = sorted(copy.rglob("*_w1.png"))[-1]
    image.unlink()
    os.mkfifo(image)

    def stuck(*_):
        raise TimeoutError(f"opening the plate blocked on {image}")

    viewer = make_napari_viewer()
    nav = navigator(viewer)
    n = len(notification_manager.records)
    old = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(60)
    try:
        opened = nav.open_plate_folder(str(copy))
        wait_idle(qtbot, viewer)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert opened is True and nav.session.plate is not None
    said = " ".join(str(r.message) for r in notification_manager.records[n:])
    assert image.name in said and "not a regular file" in said, said


def test_a_new_window_starts_at_most_of_the_screen(qtbot):
    """napari opens at ~1,090 x 630, where the docks leave the canvas a quarter of the width;
    the view command's window grows to 90% of the screen's free area, and a window the user
    already made larger is not shrunk."""
    from qtpy.QtWidgets import QMainWindow

    from napari_concept_discovery.widgets._open import fit_screen

    small = QMainWindow()
    qtbot.addWidget(small)
    small.resize(400, 300)
    fit_screen(small)
    free = small.screen().availableGeometry()
    assert small.width() == int(free.width() * 0.9)
    assert small.height() == int(free.height() * 0.9)

    big = QMainWindow()
    qtbot.addWidget(big)
    big.resize(free.width(), free.height())
    fit_screen(big, share=0.5)
    assert (big.width(), big.height()) == (free.width(), free.height())
