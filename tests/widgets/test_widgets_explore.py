"""Embed, train, explore: the four dock widgets driven as a user would, in a real viewer.

A small synthetic plate (one plate, six wells of 160 px) and a tiny random channel-agnostic
ViT saved as a checkpoint file (picked in the Embed widget as "Checkpoint file…" would) keep
this fast. Every result shown is compared with the library call the CLI makes.
Needs a display: ``xvfb-run -a python -m pytest tests/widgets/test_widgets_explore.py``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from napari_concept_discovery.dictionary.io import load_dictionary
from napari_concept_discovery.dictionary.pipeline import train_on_store
from napari_concept_discovery.embed.store import ActivationStore
from napari_concept_discovery.plate import SiteKey
from napari_concept_discovery.views.feature_views import feature_overview
from napari_concept_discovery.views.overlay import cell_limits, cells_only
from napari_concept_discovery.views.workspace import default_store_path
from widget_helpers import (
    CONTROL,
    WAIT,
    click,
    click_canvas,
    click_row,
    dictionary_settings,
    fill_dictionary_form,
    open_docked,
    wait_painter,
)

pytestmark = pytest.mark.gui

PLUGIN = "napari-concept-discovery"


def embed_and_train(qtbot, viewer, opened, workdir):
    """Embed with the tiny model and train a small dictionary, through the widgets' buttons."""
    session = opened.embed.session
    opened.embed.set_model(str(workdir / "tiny.safetensors"))
    click(qtbot, opened.embed.run_button)
    qtbot.waitUntil(lambda: session.store is not None and not opened.embed.jobs.busy, timeout=WAIT)
    qtbot.waitUntil(lambda: bool(opened.dictionary.choices), timeout=WAIT)
    plot = opened.dictionary.plot  # before the first step it says what it will draw
    assert plot.empty.get_visible() and "loss, FVU and dead features" in plot.empty.get_text()
    assert not plot.axes[-1].xaxis.get_tick_params()["labelbottom"]
    fill_dictionary_form(opened.dictionary, dictionary_settings())
    click(qtbot, opened.dictionary.train_button)
    qtbot.waitUntil(lambda: session.explorer is not None, timeout=WAIT)
    qtbot.waitUntil(lambda: opened.explorer.features is not None, timeout=WAIT)
    return session


def test_embed_train_select_a_feature_click_a_cell_open_a_top_cell(
    make_napari_viewer, workdir, demo_folder, qtbot
):
    viewer, opened = open_docked(make_napari_viewer, workdir, qtbot, show=True)
    session = opened.embed.session
    plate = session.plate
    assert plate.root == workdir / "plates" and session.site_key == plate.keys[0]
    model = str(workdir / "tiny.safetensors")
    opened.embed.set_model(model)
    expected_out = default_store_path(plate.root, model, None)
    assert opened.embed.out_path() == expected_out  # beside the plate, named by plate and model

    click(qtbot, opened.embed.run_button)
    qtbot.waitUntil(lambda: session.store is not None and not opened.embed.jobs.busy, timeout=WAIT)
    first = session.store
    assert first.path == expected_out and first.model_id == "ca-vit:tiny.safetensors"
    assert "Done:" in opened.embed.status.text() and not first.reused
    lib = ActivationStore.open(demo_folder / "store.zarr")  # embed_plate, the CLI's call
    np.testing.assert_array_equal(first.tokens("cell")[:], lib.tokens("cell")[:])
    pd.testing.assert_frame_equal(
        first.sites().drop(columns="site_id"), lib.sites().drop(columns="site_id")
    )
    click(qtbot, opened.embed.run_button)  # again: the matching store is reused
    qtbot.waitUntil(lambda: not opened.embed.jobs.busy, timeout=WAIT)
    store = session.store
    assert store is not first and store.reused and "reused" in opened.embed.status.text()

    # train through the form: the library's dictionary for the same settings, plotted live
    qtbot.waitUntil(lambda: bool(opened.dictionary.choices), timeout=WAIT)
    plot = opened.dictionary.plot  # before the first step it says what it will draw
    assert plot.empty.get_visible() and "loss, FVU and dead features" in plot.empty.get_text()
    assert not plot.axes[-1].xaxis.get_tick_params()["labelbottom"]
    fill_dictionary_form(opened.dictionary, dictionary_settings())
    click(qtbot, opened.dictionary.train_button)
    qtbot.waitUntil(lambda: session.explorer is not None, timeout=WAIT)
    dictionary = session.dictionary
    trained = train_on_store(store, dictionary_settings())
    for name, value in trained.dictionary.model.tensors().items():
        torch.testing.assert_close(dictionary.model.tensors()[name], value)
    steps, fvu = opened.dictionary.plot.data("fvu")
    assert not plot.empty.get_visible() and plot.axes[-1].xaxis.get_tick_params()["labelbottom"]
    assert steps == [p.done for p in trained.result.history]
    np.testing.assert_allclose(fvu, [p.info["fvu"] for p in trained.result.history], rtol=1e-5)
    assert "Trained 30 steps" in opened.dictionary.status.text()
    # centring estimates no covariance, so "within" has nothing to choose, and the status says so
    assert "Whitening: centring only: no covariance to estimate." in opened.dictionary.status.text()

    # the feature table is the library's, sorted by frequency
    qtbot.waitUntil(
        lambda: session.explorer is not None and opened.explorer.features is not None, timeout=WAIT
    )
    explorer = session.explorer
    pd.testing.assert_frame_equal(opened.explorer.features, feature_overview(explorer))
    shown = opened.explorer.visible_features()
    freq = opened.explorer.features.set_index("feature")["frequency"]
    assert list(freq[shown]) == sorted(freq[shown], reverse=True)
    assert all(freq[f] > 0 for f in shown)  # "Active only"

    # select a feature active on the site in view by clicking its row
    key = session.site_key
    feature = next(f for f in shown if explorer.cell_values(key, f)["active"].sum() >= 2)
    click_row(qtbot, opened.explorer, feature)
    assert session.feature == feature
    wait_painter(qtbot, viewer)
    _assert_painted(viewer, explorer, key, feature)

    # the navigator colours the wells by the feature's mean per cell
    title = f"feature {feature}: mean per cell"
    nav = opened.navigator
    qtbot.waitUntil(lambda: nav.colour_combo.currentText() == title, timeout=WAIT)
    means = explorer.well_means(feature)
    assert nav.map_view.colouring.values == {
        (p, w): pytest.approx(v)
        for p, w, v in zip(means.plate, means.well, means.value, strict=True)
    }

    # click a cell in the viewer: the cell panel lists its strongest features
    values = explorer.cell_values(key, feature)
    label = int(values[values.active]["label"].iloc[0])
    y, x = np.argwhere(explorer.labels(key) == label)[0]
    click_canvas(qtbot, viewer, (float(y), float(x)))
    assert session.cell == label
    qtbot.waitUntil(lambda: len(opened.explorer.cell_table) > 0, timeout=WAIT)
    top = explorer.cell_features(key, label, n=10)
    pd.testing.assert_frame_equal(opened.explorer.cell_table[["feature", "value"]], top)
    assert feature in top["feature"].tolist()
    other = (
        int(top["feature"].iloc[-1])
        if int(top["feature"].iloc[0]) == feature
        else int(top["feature"].iloc[0])
    )
    index = opened.explorer.cell_model.index(top["feature"].tolist().index(other), 0)
    opened.explorer.cell_view.clicked.emit(index)  # what a click on that row sends
    assert session.feature == other
    wait_painter(qtbot, viewer)
    _assert_painted(viewer, explorer, key, other)

    # the gallery holds the feature's top cells; a click opens the site and centres the cell
    qtbot.waitUntil(lambda: len(opened.explorer.thumbnails) > 0, timeout=WAIT)
    best = explorer.top_cells(other, n=24)
    got = [(t.plate, t.well, t.site, t.label) for t in opened.explorer.thumbnails]
    assert got == list(best[["plate", "well", "site", "label"]].itertuples(index=False, name=None))
    elsewhere = next(
        (i for i, t in enumerate(opened.explorer.thumbnails) if t.key != tuple(key)), 0
    )
    thumb = opened.explorer.thumbnails[elsewhere]
    item = opened.explorer.gallery.item(elsewhere)
    opened.explorer.gallery.itemClicked.emit(item)
    assert session.site_key == SiteKey(*thumb.key) and session.cell == thumb.label
    wait_painter(qtbot, viewer)
    y0, x0, y1, x1 = thumb.box
    assert tuple(viewer.camera.center[-2:]) == pytest.approx(((y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2))
    # the feature stays painted on the new site
    _assert_painted(viewer, explorer, session.site_key, other)
    np.testing.assert_array_equal(viewer.layers["DNA"].data, plate[thumb.key].read()[0])


def _assert_painted(viewer, explorer, key, feature) -> None:
    from napari_concept_discovery.widgets._layers import feature_layers

    image, cells, outlines = feature_layers(viewer)
    # a cell dictionary's patch map, blank outside the cells drawn (overlay.cells_only)
    amap = cells_only(explorer.activation_map(key, feature), np.asarray(outlines.data))
    assert np.isnan(amap.data).any() and not np.isnan(amap.data).all()
    np.testing.assert_array_equal(image.data, amap.data)
    assert tuple(image.scale) == amap.scale and tuple(image.translate) == amap.translate
    assert tuple(image.contrast_limits) == pytest.approx(explorer.feature_limits(feature))
    assert image.metadata["site_key"] == tuple(key) and image.name == f"feature {feature}"
    values = explorer.cell_values(key, feature)
    labels = explorer.labels(key)
    # the cells' identity: the store's labels, with the library's per-cell values as features
    np.testing.assert_array_equal(outlines.data, labels)
    got = outlines.features[["label", "value", "active"]].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, values, check_dtype=False)
    # exactly the active cells are coloured, each by its own value within the feature's fixed
    # cell range; inactive cells and background are clear (NaN, drawn transparent)
    assert cells.metadata["site_key"] == tuple(key) and cells.name == f"feature {feature} cells"
    assert tuple(cells.contrast_limits) == pytest.approx(cell_limits(explorer, feature))
    expected = np.full(labels.shape, np.nan, np.float32)
    for label, value, active in values.itertuples(index=False):
        if active:
            expected[labels == label] = value
    np.testing.assert_array_equal(cells.data, expected)
    coloured = np.unique(labels[~np.isnan(cells.data)])
    np.testing.assert_array_equal(coloured, np.sort(values["label"][values["active"]]))


def test_a_dictionary_of_another_model_is_refused_naming_both(
    make_napari_viewer, demo_folder, other_dictionary, qtbot
):
    from napari.utils.notifications import notification_manager

    viewer, opened = open_docked(make_napari_viewer, demo_folder, qtbot)
    session = opened.embed.session
    assert opened.embed.open_store(demo_folder / "store.zarr") is not None
    n = len(notification_manager.records)
    assert opened.dictionary.load(other_dictionary) is None
    assert session.dictionary is None
    text = opened.dictionary.status.text()
    assert "ca-vit:other.safetensors" in text and "ca-vit:tiny.safetensors" in text
    # both read 6 channel tokens side by side: 6 x 48 against 6 x 32
    assert "width 288" in text and "width 192" in text
    assert notification_manager.records[n].message == text
    # the matching one is accepted and becomes the session's
    good = opened.dictionary.load(demo_folder / "dictionary-center.safetensors")
    assert good is not None and session.dictionary is good
    qtbot.waitUntil(lambda: session.explorer is not None, timeout=WAIT)


def start_endless_training(make_napari_viewer, demo_folder, qtbot):
    """(viewer, opened) with the demo store open and a training of a million steps started
    from the Dictionary widget's form, as a user starts one."""
    viewer, opened = open_docked(make_napari_viewer, demo_folder, qtbot)
    widget = opened.dictionary
    opened.embed.open_store(demo_folder / "store.zarr")
    qtbot.waitUntil(lambda: bool(widget.choices), timeout=WAIT)
    fill_dictionary_form(widget, dictionary_settings(steps=1_000_000))
    click(qtbot, widget.train_button)
    return viewer, opened


def test_cancel_keeps_a_usable_dictionary_and_the_viewer_responsive(
    make_napari_viewer, demo_folder, qtbot, tmp_path
):
    from napari_concept_discovery.widgets._viewer import get_link

    viewer, opened = start_endless_training(make_napari_viewer, demo_folder, qtbot)
    session, widget = opened.embed.session, opened.dictionary
    qtbot.waitUntil(lambda: len(widget.curves) >= 3, timeout=WAIT)
    assert widget.training and widget.cancel_button.isEnabled()
    # while it trains the viewer still moves through the plate
    opened.navigator.select_well("C03")
    link = get_link(viewer)
    qtbot.waitUntil(lambda: not link.busy, timeout=WAIT)
    assert viewer.layers["DNA"].metadata["site_key"] == ("SYNTH_1", "C03", 1)
    click(qtbot, widget.cancel_button)
    qtbot.waitUntil(lambda: not widget.training, timeout=WAIT)
    dictionary = session.dictionary
    assert dictionary is not None and dictionary.meta.cancelled
    assert 0 < dictionary.meta.steps < 1_000_000 and "Cancelled" in widget.status.text()
    # usable: it encodes the store, and a feature paints
    qtbot.waitUntil(lambda: session.explorer is not None, timeout=WAIT)
    session.select_feature(0)
    painter = wait_painter(qtbot, viewer)
    assert painter.painted is not None and painter.painted.feature == 0
    # and it saves (atomically, through save_dictionary) and loads back the same
    path = widget.save(tmp_path / "cancelled.safetensors")
    again = load_dictionary(path)
    for name, value in dictionary.model.tensors().items():
        torch.testing.assert_close(again.model.tensors()[name], value)
    assert again.meta.cancelled and path.name in widget.status.text()


def test_a_stale_feature_paint_is_dropped(make_napari_viewer, demo_folder, qtbot):
    from napari_concept_discovery.views.overlay import feature_paint
    from napari_concept_discovery.widgets._layers import feature_layers

    viewer, opened = open_docked(make_napari_viewer, demo_folder, qtbot)
    session = opened.embed.session
    opened.embed.open_store(demo_folder / "store.zarr")
    opened.dictionary.load(demo_folder / "dictionary-center.safetensors")
    qtbot.waitUntil(lambda: session.explorer is not None, timeout=WAIT)
    explorer = session.explorer
    session.select_feature(1)
    painter = wait_painter(qtbot, viewer)
    old = session.ticket()
    late = feature_paint(explorer, old.site_key, 1)  # finishes after the user moved on
    opened.navigator.select_well("C04")
    painter = wait_painter(qtbot, viewer)
    dropped = painter.dropped
    assert painter.show(old, explorer, late) is False and painter.dropped == dropped + 1
    image, cells, outlines = feature_layers(viewer)
    assert image.metadata["site_key"] == ("SYNTH_1", "C04", 1)
    assert cells.metadata["site_key"] == ("SYNTH_1", "C04", 1)
    shown = cells_only(explorer.activation_map(session.site_key, 1), np.asarray(outlines.data))
    np.testing.assert_array_equal(image.data, shown.data)


def test_embed_the_site_in_view_only(make_napari_viewer, demo_folder, qtbot):
    from napari_concept_discovery.analysis.explore import Explorer
    from napari_concept_discovery.widgets._layers import feature_layers

    viewer, opened = open_docked(make_napari_viewer, demo_folder, qtbot)
    session, embed = opened.embed.session, opened.embed
    opened.navigator.select_well("B03")
    qtbot.waitUntil(lambda: session.site_key == ("SYNTH_1", "B03", 1), timeout=WAIT)
    embed.set_model(str(demo_folder / "tiny.safetensors"))
    embed.site_in_view.setChecked(True)
    assert embed.out_path().name == "plates-tiny.safetensors-SYNTH_1_B03_s1.zarr"
    click(qtbot, embed.run_button)
    qtbot.waitUntil(lambda: session.store is not None and not embed.jobs.busy, timeout=WAIT)
    store = session.store
    assert [tuple(k) for k in store.sites()[["plate", "well", "site"]].itertuples(index=False)] == [
        ("SYNTH_1", "B03", 1)
    ]
    whole = ActivationStore.open(demo_folder / "store.zarr")
    key = ("SYNTH_1", "B03", 1)
    np.testing.assert_allclose(
        store.site_tokens("cell", key), whole.site_tokens("cell", key), rtol=1e-5, atol=1e-6
    )
    assert store.plate_source == whole.plate_source  # it reopens the whole plate

    # a feature on a site the one-site store lacks: embedded on demand with the store's model,
    # the same codes as the whole plate's store gives (up to the store's float16 patch tokens)
    opened.dictionary.load(demo_folder / "dictionary-center.safetensors")
    qtbot.waitUntil(lambda: session.explorer is not None, timeout=WAIT)
    session.select_feature(2)
    wait_painter(qtbot, viewer)
    opened.navigator.select_well("C02")
    painter = wait_painter(qtbot, viewer)
    assert painter.painted is not None and painter.painted.key == ("SYNTH_1", "C02", 1)
    reference = Explorer(whole, session.dictionary)
    other = ("SYNTH_1", "C02", 1)
    image, _, cells = feature_layers(viewer)
    np.testing.assert_allclose(
        image.data,
        cells_only(reference.activation_map(other, 2), whole.site_labels(other)).data,
        rtol=1e-2,
        atol=1e-3,
    )
    np.testing.assert_array_equal(cells.data, whole.site_labels(other))
    np.testing.assert_allclose(
        cells.features["value"], reference.cell_values(other, 2)["value"], rtol=1e-4, atol=1e-5
    )


def test_view_opens_a_demo_folder_with_everything_loaded(make_napari_viewer, demo_folder, qtbot):
    from napari_concept_discovery.cli import build_parser
    from napari_concept_discovery.views.workspace import find_view_inputs
    from napari_concept_discovery.widgets import (
        ConceptExplorer,
        DictionaryWidget,
        EmbedWidget,
        PlateNavigator,
        open_viewer,
    )

    args = build_parser().parse_args(["view", str(demo_folder)])
    assert args.func.__name__ == "run_view" and args.store is None
    inputs = find_view_inputs(args.plate, args.store, args.dictionary)
    viewer = make_napari_viewer()
    opened = open_viewer(inputs.plate, inputs.store, inputs.dictionary, viewer=viewer)
    assert isinstance(opened.navigator, PlateNavigator)
    assert isinstance(opened.explorer, ConceptExplorer)
    assert isinstance(opened.embed, EmbedWidget)
    assert isinstance(opened.dictionary, DictionaryWidget)
    session = opened.embed.session
    assert session.plate.root == demo_folder / "plates"
    assert session.store.path == demo_folder / "store.zarr"
    saved = load_dictionary(demo_folder / "dictionary-center.safetensors")
    for name, value in saved.model.tensors().items():
        torch.testing.assert_close(session.dictionary.model.tensors()[name], value)
    qtbot.waitUntil(lambda: opened.explorer.features is not None, timeout=WAIT)
    assert len(opened.explorer.features) == saved.n_atoms
    assert [layer.name for layer in viewer.layers][:1] == ["DNA"]


def test_closing_the_dictionary_widget_cancels_its_training(make_napari_viewer, demo_folder, qtbot):
    viewer, opened = start_endless_training(make_napari_viewer, demo_folder, qtbot)
    session, widget = opened.embed.session, opened.dictionary
    job = widget.job
    qtbot.waitUntil(lambda: len(widget.curves) >= 1, timeout=WAIT)
    dock = next(d for d in viewer.window._dock_widgets.values() if d.widget() is widget)
    viewer.window.remove_dock_widget(dock)
    widget.deleteLater()
    qtbot.waitUntil(lambda: not job.running, timeout=WAIT)
    assert job.cancelled and job.error is None
    assert job.result.cancelled and job.result.result.steps_done < 1_000_000
    assert session.dictionary is None  # nobody is left to hand it to the session


def test_cancel_an_embedding_then_resume_it(make_napari_viewer, demo_folder, qtbot, tmp_path):
    from qtpy.QtCore import Qt

    viewer, opened = open_docked(make_napari_viewer, demo_folder, qtbot)
    session, embed = opened.embed.session, opened.embed
    embed.set_model(str(demo_folder / "tiny.safetensors"))
    embed.fields["batch_size"].set_value(1)  # one tile per batch: a site at a time
    out = tmp_path / "resumed.zarr"
    embed.out_edit.setText(str(out))
    embed.out_edit.textEdited.emit(str(out))  # typed by the user: kept when the site changes
    click(qtbot, embed.run_button)
    job = embed.job
    # the user presses Cancel once the first site is done (run in the worker's thread, so that
    # it lands before the next site starts however fast the sites go)
    job.progressed.connect(
        lambda p: job.cancel() if p.done >= 1 else None, Qt.ConnectionType.DirectConnection
    )
    qtbot.waitUntil(lambda: not job.running, timeout=WAIT)
    assert job.cancelled and job.result is None and session.store is None
    assert "Cancelled" in embed.status.text()
    parts = [p for p in (out / "parts").iterdir() if not p.name.startswith(".")]
    assert 1 <= len(parts) < 6  # the finished sites are kept for the next run
    click(qtbot, embed.run_button)
    qtbot.waitUntil(lambda: session.store is not None and not embed.jobs.busy, timeout=WAIT)
    whole = ActivationStore.open(demo_folder / "store.zarr")
    assert session.store.path == out
    np.testing.assert_array_equal(session.store.tokens("cell")[:], whole.tokens("cell")[:])


def test_cells_from_a_labels_layer_replace_the_segmentation(make_napari_viewer, demo_folder, qtbot):
    from napari_concept_discovery.embed.compute import embed_site
    from napari_concept_discovery.embed.plate import reload_model
    from napari_concept_discovery.widgets._layers import feature_layers

    viewer, opened = open_docked(make_napari_viewer, demo_folder, qtbot)
    session, embed = opened.embed.session, opened.embed
    store = opened.embed.open_store(demo_folder / "store.zarr")
    opened.dictionary.load(demo_folder / "dictionary-center.safetensors")
    qtbot.waitUntil(lambda: session.explorer is not None, timeout=WAIT)
    explorer, key = session.explorer, session.site_key
    session.select_feature(0)
    painter = wait_painter(qtbot, viewer)

    # the user draws two cells on the site in view and picks that layer under "Cells in view"
    image = session.plate[key].read()
    drawn = np.zeros(image.shape[-2:], np.int32)
    drawn[10:60, 20:80] = 7
    drawn[90:150, 40:120] = 9
    viewer.add_labels(drawn, name="my cells")
    assert embed.cells_combo.itemText(0) == "Segmentation"
    index = embed.cells_combo.findData("my cells")
    assert index > 0 and embed.cells_combo.findData("feature 0 cells") < 0
    embed.cells_combo.setCurrentIndex(index)
    embed.cells_combo.activated.emit(index)  # what choosing it in the menu sends
    painter = wait_painter(qtbot, viewer)
    assert not painter.errors

    # the cell values are the drawn cells', pooled with the store's model and encoded
    values = explorer.cell_values(key, 0)
    assert values["label"].tolist() == [7, 9]
    tokens = embed_site(
        image,
        reload_model(store),
        store.block,
        labels=drawn,
        channel_tokens=True,
        precision=store.precision,  # re-embedded at the store's own precision
    )
    table = tokens.cell_table.assign(plate=key.plate, well=key.well, site=key.site)
    for column, value in (session.plate[key].metadata or {}).items():
        if column not in table.columns:
            table[column] = value
    # the dictionary reads the channel tokens side by side, as the store keeps them (float16)
    side_by_side = tokens.cell_channels.reshape(len(tokens.cell_tokens), -1)
    x = side_by_side.astype(np.float16).astype(np.float32)
    codes = session.dictionary.encode_table(x, table).toarray()
    np.testing.assert_allclose(values["value"], codes[:, 0], rtol=1e-5, atol=1e-6)
    _, coloured, cells = feature_layers(viewer)
    np.testing.assert_array_equal(cells.data, drawn)
    assert cells.features["label"].tolist() == [7, 9]
    assert np.isnan(coloured.data[drawn == 0]).all()  # only the drawn cells can be coloured
    # a click inside a drawn cell selects it
    assert painter.select_cell_at((100.0, 60.0)) == 9

    # back to the segmentation: the store's cells again
    embed.use_cells(None)
    painter = wait_painter(qtbot, viewer)
    _assert_painted(viewer, explorer, key, 0)


def test_the_first_dictionary_is_sized_to_the_store(make_napari_viewer, demo_folder, qtbot):
    """Steps for FIRST_EPOCHS passes over the store's tokens (50 to 1000), until the user types
    some."""
    from napari_concept_discovery.dictionary.settings import (
        FIRST_EPOCHS,
        first_atoms,
        first_steps,
    )

    assert (first_steps(4000, 1024), first_steps(10**6, 1024), first_steps(0, 1024)) == (
        -(-FIRST_EPOCHS * 4000 // 1024),
        1000,
        50,
    )
    viewer, opened = open_docked(make_napari_viewer, demo_folder, qtbot)
    widget = opened.dictionary
    steps = widget.fields["steps"]
    store = opened.embed.open_store(demo_folder / "store.zarr")
    n_cells = int(store.tokens("cell").shape[0])
    n_patches = int(store.tokens("patch").shape[0])
    assert steps.value() == first_steps(n_cells, widget.fields["batch_size"].value())
    widget.fields["batch_size"].set_value(8)
    assert steps.value() == first_steps(n_cells, 8) == max(50, -(-FIRST_EPOCHS * n_cells // 8))
    widget.fields["unit"].set_value("patch")
    assert steps.value() == first_steps(n_patches, 8)
    steps.widget.setValue(123)  # the user's number stays, whatever the store
    widget.fields["unit"].set_value("cell")
    opened.embed.open_store(demo_folder / "store.zarr")
    assert steps.value() == 123
    # atoms too: one per TOKENS_PER_ATOM tokens, until the user types a number
    atoms = widget.fields["atoms"]
    assert atoms.value() == first_atoms(n_cells)
    widget.fields["unit"].set_value("patch")
    assert atoms.value() == first_atoms(n_patches)
    atoms.widget.setValue(48)
    widget.fields["unit"].set_value("cell")
    assert atoms.value() == 48 and widget.settings().atoms == 48
    assert widget.settings().levels == "none"  # the nested levels field, plain by default
    # the views field: a check box per view, all three ticked by default; a user unticks any
    qtbot.waitUntil(lambda: widget.whiten_box.isChecked(), timeout=WAIT)  # controls guessed
    views = widget.fields["views"]
    assert list(views.boxes) == ["whitened", "within-type", "centred"]
    assert "cell type" in views.boxes["within-type"].toolTip()
    assert widget.settings().views == "whitened,within-type,centred"
    views.boxes["within-type"].click()
    assert widget.settings().views == "whitened,centred"
    views.boxes["whitened"].click()
    assert widget.settings().views == "centred"
    views.boxes["centred"].click()  # the last one stays
    assert views.boxes["centred"].isChecked() and widget.settings().views == "centred"
    views.set_value("whitened,within-type")
    assert widget.settings().views == "whitened,within-type"
    with pytest.raises(ValueError, match="give one or more of whitened, within-type, centred"):
        views.set_value("whitened,cell-cycle")
    views.set_value("whitened,within-type,centred")
    # the covariance pooled (empty, the default), or within the cell-type column where
    # controls mix types (auto)
    within = widget.whiten_fields["within"]
    assert within.label == "Covariance within" and "auto" in within.widget.toolTip()
    assert widget.settings().whiten.within is None  # empty: pooled, as the placeholder says
    assert within.widget.placeholderText() == "none (pooled)"
    within.set_value("auto")
    assert widget.settings().whiten.within == "auto"
    # views are whitenings: their boxes sit in the Whitening group, and without whitening
    # there is nothing to choose
    group = views.widget.parentWidget()
    while group is not None and not hasattr(group, "title"):
        group = group.parentWidget()
    assert group is not None and group.title() == "Whitening"
    assert views.widget.isEnabled()
    widget.whiten_box.setChecked(False)
    assert not views.widget.isEnabled() and widget.settings().whiten is None
    widget.whiten_box.setChecked(True)
    assert views.widget.isEnabled()


def test_a_diverged_dictionary_is_refused_by_the_dictionary_widget(
    make_napari_viewer, demo_folder, qtbot, tmp_path
):
    """A dictionary that `train --keep-diverged` kept is refused where a user loads it, naming
    the file and why, and the session keeps no dictionary (no explorer built on it)."""
    from napari.utils.notifications import notification_manager

    from napari_concept_discovery.cli import main

    diverged = tmp_path / "diverged.safetensors"
    args = ["train", str(demo_folder / "store.zarr"), "--method", "icfl", "--atoms", "16"]
    args += ["--sparsity", "4", "--steps", "20", "--batch-size", "64", "--lr", "1e30"]
    args += ["--whiten", "=".join(CONTROL), "--whiten-mode", "center"]
    assert main([*args, "--out", str(diverged), "--keep-diverged"]) == 2
    assert diverged.is_file()

    viewer, opened = open_docked(make_napari_viewer, demo_folder, qtbot)
    session = opened.embed.session
    assert opened.embed.open_store(demo_folder / "store.zarr") is not None
    n = len(notification_manager.records)
    assert opened.dictionary.load(diverged) is None
    assert session.dictionary is None and session.explorer is None
    text = opened.dictionary.status.text()
    assert "diverged" in text and "diverged.safetensors" in text, text
    assert notification_manager.records[n].message == text


def test_the_navigator_colours_wells_by_the_stores_segmentation_quality(
    make_napari_viewer, demo_folder, qtbot
):
    """Once a store is open, "Colour by" offers its segmentation quality per well; the colours
    follow the store's QC table (cells per site: the mean over the well's sites)."""
    from napari_concept_discovery.embed.store import ActivationStore

    viewer, opened = open_docked(make_napari_viewer, demo_folder, qtbot)
    nav = opened.navigator
    assert not any(c.startswith("segmentation:") for c in nav.colour_choices())
    assert opened.embed.open_store(demo_folder / "store.zarr") is not None
    title = "segmentation: cells per site"
    assert title in nav.colour_choices()
    nav.colour_combo.setCurrentIndex(nav.colour_choices().index(title))
    colouring = nav.map_view.colouring
    assert colouring is not None and colouring.numeric and colouring.title == title
    quality = ActivationStore.open(demo_folder / "store.zarr").quality()
    expected = quality.groupby(["plate", "well"])["cells"].mean()
    got = {k: v for k, v in colouring.values.items()}
    assert got and all(got[k] == expected[k] for k in got), (got, expected)
    assert "cells per site" in nav.legend.text()
    # the metadata columns stay one click away
    assert "cell_type" in nav.colour_choices()


def test_the_dictionary_widget_says_its_views_and_whitening_check(
    make_napari_viewer, demo_folder, qtbot
):
    """Trained with PCA whitening in the default views, the status names the three parts,
    how the within-type part estimated its covariance, and the whitening check that train
    prints, with the figure the dictionary's metrics keep."""
    viewer, opened = open_docked(make_napari_viewer, demo_folder, qtbot)
    session = opened.embed.session
    assert opened.embed.open_store(demo_folder / "store.zarr") is not None
    qtbot.waitUntil(lambda: bool(opened.dictionary.choices), timeout=WAIT)
    settings = dictionary_settings(steps=10)
    fill_dictionary_form(
        opened.dictionary, settings.replace(whiten=settings.whiten.replace(mode="pca"))
    )
    assert opened.dictionary.settings().views == "whitened,within-type,centred"
    click(qtbot, opened.dictionary.train_button)
    qtbot.waitUntil(lambda: session.explorer is not None, timeout=WAIT)
    qtbot.waitUntil(lambda: "Trained 10 steps" in opened.dictionary.status.text(), timeout=WAIT)
    text = opened.dictionary.status.text()
    d = session.dictionary
    assert d.view_names == ("whitened", "within-type", "centred")
    assert "per view (whitened + within-type + centred" in text
    assert "within-type view: covariance within cell_type" in text
    ratio = d.meta.metrics["whitened_norm_ratio"]
    assert f"Whitening check: other cells' whitened tokens {ratio:.2f}x as far out" in text
    assert ("Warning: the whitening overfits its controls" in text) == (ratio > 1.5)
