"""Beside the plugins a napari user already has: a plate written by ``convert`` opens with
napari-ome-zarr's reader, with ours, and with our widgets docked, all in one viewer.

CI installs the ``[test]`` extra, which pins napari-ome-zarr and napari-clusters-plotter beside
this plugin (constraints.txt); ``tests/test_packaging.py`` runs ``pip check`` on the set.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari_ome_zarr")
pytest.importorskip("ome_zarr")

from napari_concept_discovery.plate import open_plate  # noqa: E402
from napari_concept_discovery.plate.convert import convert_plate  # noqa: E402
from napari_concept_discovery.synth import write_synthetic_plates  # noqa: E402

PLUGIN = "napari-concept-discovery"
WIDGETS = ("Plate navigator", "Embed", "Dictionary", "Concept explorer")


@pytest.fixture(scope="module", params=["0.5", "0.4"], ids=["ngff-0.5", "ngff-0.4"])
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"coinstall-{request.param}")
    plates = write_synthetic_plates(root / "plates", 1, 3, 2, 96, seed=2)
    (zarr_plate,) = convert_plate(plates, root / "zarr", ngff=request.param)
    return plates, zarr_plate


def test_both_readers_are_registered_for_a_converted_plate(converted):
    import npe2

    _, zarr_plate = converted
    pm = npe2.PluginManager.instance()
    pm.discover()
    names = {m.name for m in pm.iter_manifests()}
    assert {PLUGIN, "napari-ome-zarr", "napari-clusters-plotter"} <= names
    readers = {r.plugin_name for r in pm.iter_compatible_readers([str(zarr_plate)])}
    assert {PLUGIN, "napari-ome-zarr"} <= readers


@pytest.mark.gui
def test_napari_ome_zarr_and_our_reader_and_widgets_share_a_viewer(make_napari_viewer, converted):
    plates, zarr_plate = converted
    source = open_plate(plates)
    viewer = make_napari_viewer()
    theirs = viewer.open(str(zarr_plate), plugin="napari-ome-zarr")
    # napari-ome-zarr shows the plate as a mosaic of wells (first field of each), channels
    # named by our omero labels; the first well's tile is our site, pixel for pixel
    images = [layer for layer in theirs if layer._type_string == "image"]
    # "image: DNA": the field's multiscale name, then our channel label
    assert [layer.name.split(": ")[-1] for layer in images] == list(source.channel_names)
    first = source[sorted(source.keys)[0]].read()
    h, w = first.shape[1:]
    for c, layer in enumerate(images):
        data = np.asarray(layer.data[0] if layer.multiscale else layer.data)
        assert data.shape == (h, w * 3)  # one row of three wells
        np.testing.assert_array_equal(data[:h, :w], first[c])
    their_labels = [layer for layer in theirs if layer._type_string == "labels"]
    assert their_labels, "napari-ome-zarr showed no label image of the plate"

    ours = viewer.open(str(zarr_plate), plugin=PLUGIN)
    assert [layer.name for layer in ours if layer._type_string == "image"] == list(
        source.channel_names
    ), [layer.name for layer in viewer.layers]
    assert ours[-1]._type_string == "labels"
    np.testing.assert_array_equal(ours[-1].data, source[sorted(source.keys)[0]].read_labels())
    for name in WIDGETS:
        viewer.window.add_plugin_dock_widget(PLUGIN, name)
    # every layer is still there, theirs untouched, and the widgets are docked
    assert len(viewer.layers) == len(theirs) + len(ours)
    for layer in images:
        assert layer in viewer.layers
    assert {f"{name} ({PLUGIN})" for name in WIDGETS} <= set(viewer.window.dock_widgets)
