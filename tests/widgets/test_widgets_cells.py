"""The concept explorer's names, similar cells and exports, driven as a user would in a real
viewer; every result is compared with the library call the command line makes.
Needs a display: ``xvfb-run -a python -m pytest tests/test_widgets_cells.py``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_concept_discovery.analysis.cell_selection import (
    cells_above,
    read_selection_labels,
    selection_labels,
    similar_cells,
    with_feature,
)
from napari_concept_discovery.analysis.measurements import describe_store
from napari_concept_discovery.dictionary.feature_notes import load_notes, notes_path
from napari_concept_discovery.plate import SiteKey
from napari_concept_discovery.views.feature_card import card_data
from widget_helpers import (
    WAIT,
    click,
    click_canvas,
    click_row,
    open_docked,
    wait_painter,
)

pytestmark = pytest.mark.gui


def _keys(cells: pd.DataFrame) -> list[tuple]:
    return list(cells[["plate", "well", "site", "label"]].itertuples(index=False, name=None))


def test_name_a_feature_select_cells_export_and_find_similar_cells(
    make_napari_viewer,
    demo_folder,
    qtbot,
    tmp_path,
):
    viewer, opened = open_docked(make_napari_viewer, demo_folder, qtbot, show=True)
    session, widget = opened.embed.session, opened.explorer
    dict_path = demo_folder / "dictionary-center.safetensors"
    notes_path(dict_path).unlink(missing_ok=True)
    opened.embed.open_store(demo_folder / "store.zarr")
    opened.dictionary.load(dict_path)
    qtbot.waitUntil(lambda: widget.features is not None, timeout=WAIT)
    explorer = session.explorer
    assert list(widget.model.frame.columns[:2]) == ["feature", "name"]

    # pick a feature in the table; its top cells fill the gallery and become the selection
    feature = widget.visible_features()[0]
    click_row(qtbot, widget, feature)
    assert session.feature == feature
    qtbot.waitUntil(lambda: len(widget.thumbnails) > 0, timeout=WAIT)
    assert _keys(widget.selection) == _keys(explorer.top_cells(feature, n=24))
    assert widget.save_button.isEnabled() and widget.layer_button.isEnabled()

    # name it and keep a note, as typed; saved beside the dictionary and shown in the table
    widget.tabs.setCurrentWidget(widget.feature_tab)
    qtbot.keyClicks(widget.name_edit, "bright nuclei")
    qtbot.keyClicks(widget.note_edit, "fires in B wells")
    click(qtbot, widget.name_button)
    notes = load_notes(dict_path)
    assert notes.names == {feature: "bright nuclei"} and notes.notes == {
        feature: "fires in B wells"
    }
    frame = widget.model.frame.set_index("feature")
    assert frame.loc[feature, "name"] == "bright nuclei"
    # loading the dictionary again brings the names back
    opened.dictionary.load(dict_path)
    qtbot.waitUntil(
        lambda: widget.features is not None and session.explorer is not explorer, timeout=WAIT
    )
    explorer = session.explorer
    assert widget.model.frame.set_index("feature").loc[feature, "name"] == "bright nuclei"
    session.select_feature(feature)
    assert widget.name_edit.text() == "bright nuclei"
    assert widget.note_edit.toPlainText() == "fires in B wells"

    # the measurements that follow each feature: the library's descriptions, in the table
    codes, _ = explorer.cell_codes()
    described = describe_store(explorer.store, codes)
    qtbot.waitUntil(lambda: "description" in widget.model.frame.columns, timeout=WAIT)
    shown = widget.model.frame.set_index("feature")["description"]
    assert shown.to_dict() == described.set_index("feature")["description"].to_dict()
    text = described.loc[described.feature == feature, "description"].iloc[0]
    assert (text or "No measurement follows it") in widget.description_label.text()
    # the feature card: drawn when its tab is shown, the cards' width, named
    widget.tabs.setCurrentWidget(widget.feature_tab)
    qtbot.waitUntil(lambda: widget.card_image is not None, timeout=WAIT)
    assert widget.card_image.shape[1] == max(360, widget.tabs.width() - 48)
    card = card_data(explorer, feature, name="bright nuclei")
    assert card.title == f"Feature {feature} \u201cbright nuclei\u201d"
    assert len(card.control_values) + len(card.other_values) == codes.shape[0]

    # select every cell at or above a threshold; export it as CSV and as a Labels layer
    col = codes[:, feature].toarray().ravel()
    threshold = round(float(np.median(col[col > 0])), 3)
    widget.tabs.setCurrentWidget(widget.gallery_tab)
    widget.threshold.setValue(threshold)
    click(qtbot, widget.threshold_button)
    want = cells_above(explorer, feature, threshold)
    qtbot.waitUntil(
        lambda: widget.selection is not None and len(widget.selection) == len(want), timeout=WAIT
    )
    assert _keys(widget.selection) == _keys(want)
    assert f"{len(want)} of " in widget.gallery_label.text()
    path = widget.save_selection(tmp_path / "cells.csv")
    got = pd.read_csv(path)
    expect = with_feature(explorer, want, feature)
    assert list(got.columns) == list(expect.columns)
    np.testing.assert_allclose(got[f"feature_{feature}"], expect[f"feature_{feature}"], rtol=1e-6)
    # one label image per site with selected cells, each keeping exactly those cells
    folder = widget.save_selection_labels(tmp_path / "selected")
    images = read_selection_labels(folder)
    assert len(images) == len(want[["plate", "well", "site"]].drop_duplicates())
    for k, image in images.items():
        np.testing.assert_array_equal(image, selection_labels(want, k, explorer.labels(k)))
    assert f"to {folder}" in widget.status.text()
    first = want.iloc[0]
    session.set_site(SiteKey(str(first.plate), str(first.well), int(first.site)))
    wait_painter(qtbot, viewer)
    click(qtbot, widget.layer_button)
    layer = viewer.layers["selected cells"]
    key = session.site_key
    np.testing.assert_array_equal(layer.data, selection_labels(want, key, explorer.labels(key)))
    assert (np.asarray(layer.data) > 0).any()

    # click a cell in the viewer, ask for cells like it: the library's neighbours, in order
    values = explorer.cell_values(key, feature)
    label = int(values[values.active]["label"].iloc[0])
    y, x = np.argwhere(explorer.labels(key) == label)[0]
    click_canvas(qtbot, viewer, (float(y), float(x)))
    assert session.cell == label
    qtbot.waitUntil(widget.similar_button.isEnabled, timeout=WAIT)
    click(qtbot, widget.similar_button)
    want = similar_cells(explorer, key, label, n=24)
    qtbot.waitUntil(
        lambda: widget.selection is not None and "most like" in widget.selection_what,
        timeout=WAIT,
    )
    assert _keys(widget.selection) == _keys(want)
    assert [(t.plate, t.well, t.site, t.label) for t in widget.thumbnails] == _keys(want)
    np.testing.assert_allclose([t.value for t in widget.thumbnails], want["similarity"], rtol=1e-6)
    assert widget.tabs.currentWidget() is widget.gallery_tab
    # a similar cell's thumbnail opens its site centred on it
    widget.gallery.itemClicked.emit(widget.gallery.item(0))
    t = widget.thumbnails[0]
    assert session.site_key == SiteKey(*t.key) and session.cell == t.label
    y0, x0, y1, x1 = t.box
    assert tuple(viewer.camera.center[-2:]) == pytest.approx(((y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2))
    notes_path(dict_path).unlink()
