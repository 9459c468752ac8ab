"""The napari reader and sample data: layer data without Qt, then through a real viewer.

GUI tests need a display: ``xvfb-run -a -s "-screen 0 1280x1024x24" python -m pytest ...``.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from napari_concept_discovery._reader import napari_get_reader, site_layer_data
from napari_concept_discovery.plate import open_plate
from napari_concept_discovery.views.channels import channel_colormaps, contrast_limits

PLUGIN = "napari-concept-discovery"
PEDIATRIC = "pediatric_cancer_atlas_BR00143976"


@pytest.fixture(scope="session")
def sample_cache(tmp_path_factory):
    """Point the sample-data cache at a session folder, so tests never touch ~/.cache."""
    folder = tmp_path_factory.mktemp("cache")
    old = os.environ.get("NAPARI_CONCEPT_DISCOVERY_CACHE")
    os.environ["NAPARI_CONCEPT_DISCOVERY_CACHE"] = str(folder)
    yield folder
    if old is None:
        del os.environ["NAPARI_CONCEPT_DISCOVERY_CACHE"]
    else:
        os.environ["NAPARI_CONCEPT_DISCOVERY_CACHE"] = old


def test_reader_declines_what_is_not_a_plate(tmp_path, real_data):
    assert napari_get_reader(str(real_data / PEDIATRIC / "r03c03f03p01-ch1sk1fk1fl1.tiff")) is None
    assert napari_get_reader(str(tmp_path)) is None  # empty folder
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "photo.png").write_bytes(b"not a plate")
    assert napari_get_reader(str(tmp_path)) is None
    assert napari_get_reader([str(real_data / PEDIATRIC), str(tmp_path)]) is None


def test_reader_warns_when_reading_not_when_asked(tmp_path):
    from napari_concept_discovery.plate import PlateWarning
    from plate_helpers import write_phenix

    write_phenix(tmp_path / "BR1")
    (tmp_path / "BR1" / "notes.txt").write_text("x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # napari asks every reader: asking must stay silent
        reader = napari_get_reader(str(tmp_path / "BR1"))
    with pytest.warns(PlateWarning, match=r"BR1: ignored 1 non-image file\(s\): notes\.txt"):
        layers = reader(str(tmp_path / "BR1"))
    assert layers[0][1]["metadata"][0]["site_key"] == ("BR1", "A02", 1)


def test_reader_layer_data_for_a_real_phenix_site(real_data):
    reader = napari_get_reader(str(real_data / PEDIATRIC))
    assert callable(reader)
    (image, kwargs, kind), *rest = reader(str(real_data / PEDIATRIC))
    assert kind == "image" and rest == []  # no labels on this plate
    assert image.shape == (6, 1080, 1080) and kwargs["channel_axis"] == 0
    assert kwargs["name"] == ["ch1", "ch2", "ch3", "ch4", "ch5", "ch6"]
    # ch1 is brightfield: grey and hidden, so it does not wash out the five stains; ch5 is the
    # DNA stain (README) and is drawn blue; with unnamed stains three start shown, not five
    assert kwargs["colormap"] == ["gray", "green", "red", "magenta", "blue", "yellow"]
    assert kwargs["visible"] == [False, True, True, False, True, False]
    for plane, (lo, hi) in zip(image, kwargs["contrast_limits"], strict=True):
        assert plane.min() <= lo < hi <= plane.max()
        assert (plane > hi).mean() < 0.01  # a few bright pixels saturate, not the cells
    # one metadata dict per channel, naming the plate, the site and the channel it shows
    for name, meta in zip(kwargs["name"], kwargs["metadata"], strict=True):
        assert meta == {
            "plate_path": str(real_data / PEDIATRIC),
            "site_key": (PEDIATRIC, "C03", 3),
            "channel_names": kwargs["name"],
            "layout": "phenix",
            "role": "channel",
            "channel": name,
        }


def test_cell_painting_colours_follow_the_stain_names():
    assert channel_colormaps(["DNA", "ER", "RNA", "AGP", "Mito"]) == [
        "blue",
        "green",
        "cyan",
        "red",
        "magenta",
    ]
    rxrx = channel_colormaps(["DNA", "ER", "Actin", "RNA", "Mito", "Membrane"])
    assert rxrx == ["blue", "green", "red", "cyan", "magenta", "yellow"]
    assert channel_colormaps(["Hoechst 33342", "MitoTracker Deep Red", "WGA"]) == [
        "blue",
        "magenta",
        "yellow",
    ]
    assert channel_colormaps(["DAPI", "GFP", "RFP"]) == ["blue", "green", "red"]
    # unknown names get distinct colours that avoid the ones already taken
    assert channel_colormaps(["DNA", "x", "y"]) == ["blue", "green", "red"]


def test_contrast_limits_black_at_background_white_below_hot_pixels():
    rng = np.random.default_rng(0)
    plane = rng.normal(200, 5, (128, 128)).astype(np.uint16)  # camera offset + noise
    plane[40:80, 40:80] += 2000  # a cell
    plane[0, :5] = 65535  # hot pixels
    lo, hi = contrast_limits(plane)
    assert 195 <= lo <= 205  # the background peak, not its lowest noise
    assert 2150 <= hi <= 2250  # the cell's bright end, not the hot pixels
    confluent = rng.normal(1000, 50, (128, 128)).astype(np.uint16)
    confluent[:10] = 100  # a little background; the mode would be the cytoplasm
    assert contrast_limits(confluent)[0] <= np.median(confluent)


def test_unnamed_jump_stains_get_a_blue_nucleus(real_data):
    layers = site_layer_data(open_plate(real_data / "jump_BR00117006"))
    kwargs = layers[0][1]
    assert kwargs["name"] == ["ch2", "ch3", "ch5"]
    assert kwargs["colormap"][2] == "blue"  # ch5 = DNA in the README
    assert all(kwargs["visible"])


def test_synthetic_site_has_cell_labels(small_plates):
    plate = open_plate(small_plates)
    key = plate.keys[1]
    layers = site_layer_data(plate, key)
    assert [kind for *_, kind in layers] == ["image", "labels"]
    (image, kwargs, _), (labels, lkw, _) = layers
    assert kwargs["colormap"] == ["blue", "green", "red", "cyan", "magenta", "yellow"]
    assert [m["site_key"] for m in kwargs["metadata"]] == [tuple(key)] * 6
    assert [m["channel"] for m in kwargs["metadata"]] == kwargs["name"]
    assert labels.shape == image.shape[1:] and labels.max() > 0 and labels.dtype == np.int32
    assert lkw["name"] == "cells" and lkw["metadata"]["site_key"] == tuple(key)
    assert lkw["metadata"]["role"] == "cells"
    # DNA, ER and Actin start shown; RNA, Mito and Membrane are one click away
    assert kwargs["visible"] == [True, True, True, False, False, False]
    assert lkw["visible"] is False


def test_read_site_and_new_layers_agree(small_plates):
    from napari_concept_discovery._reader import layer_tuples, opened_plate, read_site

    plate = open_plate(small_plates)
    key = plate.keys[2]
    data = read_site(plate, key)
    image = plate[key].read()
    np.testing.assert_array_equal(data.image, image)
    np.testing.assert_array_equal(data.labels, plate[key].read_labels())
    assert data.key == key and data.channel_names == plate.channel_names
    assert data.contrast_limits == tuple(contrast_limits(p) for p in image)
    (_, kwargs, _), _ = layer_tuples(data)
    metas = kwargs["metadata"]
    assert len({id(m) for m in metas}) == len(metas)  # one dict per channel, never shared
    # a widget that finds the reader's layers gets the very plate it opened, not a rescan
    site_layer_data(plate, key)
    assert opened_plate(str(plate.root)) is plate
    assert opened_plate(small_plates).root == plate.root


def test_sample_plate_is_cached(sample_cache):
    from napari_concept_discovery._sample_data import sample_plate_path, synthetic_plate_sample

    layers = synthetic_plate_sample()
    folder = sample_plate_path()
    assert folder.parent == sample_cache and folder.is_dir()
    assert [p.name for p in sample_cache.iterdir()] == [folder.name]  # no temp folder left
    stamp = (folder / "metadata.csv").stat().st_mtime_ns
    again = synthetic_plate_sample()
    assert (folder / "metadata.csv").stat().st_mtime_ns == stamp
    assert [kind for *_, kind in layers] == ["image", "labels"]
    np.testing.assert_array_equal(layers[0][0], again[0][0])
    assert layers[0][0].shape[0] == 6 and layers[0][1]["metadata"][0]["layout"] == "rxrx"


# --- through a real viewer -----------------------------------------------------------------


@pytest.mark.gui
def test_viewer_opens_a_real_plate(make_napari_viewer, real_data):
    viewer = make_napari_viewer()
    layers = viewer.open(str(real_data / PEDIATRIC), plugin=PLUGIN)
    assert [layer.name for layer in layers] == ["ch1", "ch2", "ch3", "ch4", "ch5", "ch6"]
    assert [layer.colormap.name for layer in layers] == [
        "gray",
        "green",
        "red",
        "magenta",
        "blue",
        "yellow",
    ]
    assert [layer.visible for layer in layers] == [False, True, True, False, True, False]
    assert all(layer.blending == "additive" for layer in layers)
    lo, hi = layers[4].contrast_limits
    assert layers[4].data.min() <= lo < hi <= layers[4].data.max()
    assert layers[4].metadata["site_key"] == (PEDIATRIC, "C03", 3)
    assert layers[4].data.shape == (1080, 1080)


@pytest.mark.gui
def test_viewer_opens_a_synthetic_plate_with_labels(make_napari_viewer, small_plates):
    viewer = make_napari_viewer()
    viewer.open(str(small_plates), plugin=PLUGIN)
    names = [layer.name for layer in viewer.layers]
    assert names == ["DNA", "ER", "Actin", "RNA", "Mito", "Membrane", "cells"]
    assert viewer.layers["DNA"].colormap.name == "blue"
    assert viewer.layers["cells"].data.max() > 0
    assert viewer.layers["cells"].metadata["plate_path"] == str(small_plates)


@pytest.mark.gui
def test_viewer_sample_data_and_screenshot(make_napari_viewer, sample_cache):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample(PLUGIN, "synthetic_plate")
    assert [layer.name for layer in viewer.layers][-1] == "cells"
    shot = viewer.screenshot(canvas_only=True, flash=False)
    rgb = shot[..., :3].astype(int)
    # a real picture: coloured cells on a dark background, not a black or flat canvas
    assert rgb.mean() > 5 and rgb.std() > 10
    assert (rgb.max(axis=-1) - rgb.min(axis=-1)).mean() > 5  # colour, not grey
