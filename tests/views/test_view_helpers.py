"""The Qt-free helpers behind the widgets: paths, form choices, training curves, thumbnails,
the feature table as shown and a cell framed for the camera."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_concept_discovery.dictionary.settings import TrainSettings, WhitenSettings
from napari_concept_discovery.errors import ConceptDiscoveryError, PlateError
from napari_concept_discovery.plate import SiteKey, open_plate
from napari_concept_discovery.progress import Progress
from napari_concept_discovery.views.feature_views import (
    camera_for_cell,
    display_table,
    headers,
    selectivity_columns,
    with_names,
)
from napari_concept_discovery.views.forms import (
    TrainingCurves,
    form_fields,
    group_choices,
    guess_control,
    metadata_choices,
)
from napari_concept_discovery.views.thumbnails import (
    cell_thumbnail,
    composite,
    outline,
    resize_nearest,
    square_box,
)
from napari_concept_discovery.views.workspace import (
    default_store_path,
    find_view_inputs,
    one_site_plate,
)

# --- workspace -----------------------------------------------------------------------------


def test_default_store_path_sits_beside_the_plate_and_names_model_block_site(tmp_path):
    plate = tmp_path / "plates" / "run1"
    plate.mkdir(parents=True)
    assert default_store_path(plate, "default") == tmp_path / "plates" / "run1-default.zarr"
    assert default_store_path(plate, "hf-hub:recursionpharma/OpenPhenom", block=-1).name == (
        "run1-hf-hub-recursionpharma-OpenPhenom-b-1.zarr"
    )
    weights = tmp_path / "my model.safetensors"
    weights.write_bytes(b"x")  # an existing file is named by its file name, not its path
    site = SiteKey("P1", "B02", 3)
    assert default_store_path(plate, str(weights), 4, site).name == (
        "run1-my-model.safetensors-b4-P1_B02_s3.zarr"
    )


def test_one_site_plate_keeps_the_whole_plates_source(small_plates):
    plate = open_plate(small_plates)
    key = plate.keys[2]
    one = one_site_plate(plate, key)
    assert one.keys == [key] and one.source == plate.source
    assert one.channel_names == plate.channel_names and one.root == plate.root
    np.testing.assert_array_equal(one[key].read(), plate[key].read())
    with pytest.raises(KeyError, match="no site"):
        one_site_plate(plate, ("nope", "A01", 1))


def _fake_store(path):
    path.mkdir(parents=True)
    (path / "zarr.json").write_text("{}")
    return path


def test_find_view_inputs_in_a_demo_folder_and_beside_a_plate(tmp_path):
    demo = tmp_path / "demo-out"
    (demo / "plates").mkdir(parents=True)
    store = _fake_store(demo / "store.zarr")
    # the demo's names; "crops" sorts first by name, "controls" is the analysed one
    for name in ("dictionary-aaa-crops", "dictionary-per-cell-type", "dictionary-controls"):
        (demo / f"{name}.safetensors").write_bytes(b"x")
    found = find_view_inputs(demo)
    assert found.plate == demo / "plates" and found.store == store
    assert found.dictionary == demo / "dictionary-controls.safetensors"
    (demo / "dictionary-controls.safetensors").unlink()
    assert find_view_inputs(demo).dictionary == demo / "dictionary-aaa-crops.safetensors"
    pca = demo / "dictionary-per-cell-type.safetensors"
    assert find_view_inputs(demo, dictionary=pca).dictionary == pca  # given paths win

    plate = tmp_path / "plateA"
    plate.mkdir()
    assert find_view_inputs(plate).store is None
    beside = _fake_store(tmp_path / "plateA-default.zarr")
    assert find_view_inputs(plate).store == beside.resolve()
    _fake_store(tmp_path / "plateA-openphenom.zarr")  # two candidates: none is guessed
    assert find_view_inputs(plate).store is None

    with pytest.raises(PlateError, match="not found"):
        find_view_inputs(tmp_path / "missing")
    with pytest.raises(ConceptDiscoveryError, match="dictionary file not found: .*nope"):
        find_view_inputs(plate, dictionary=tmp_path / "nope.safetensors")


# --- forms ---------------------------------------------------------------------------------


def test_metadata_choices_leave_out_identifiers_and_measurements():
    table = pd.DataFrame(
        {
            "plate": ["P1"] * 4,
            "well": ["B02", "B10", "B03", "B02"],
            "label": [1, 2, 3, 4],
            "centroid_y": [1.0, 2.0, 3.0, 4.0],
            "well_type": ["treated", "negative_control", "treated", None],
            "dose": [0.1, 0.2, 0.3, 0.4],
            "cell_id": [f"c{i}" for i in range(4)],
        }
    )
    choices = metadata_choices(table, max_values=3)
    assert choices == {
        "plate": ["P1"],
        "well": ["B02", "B03", "B10"],  # natural order
        "well_type": ["negative_control", "treated"],
    }
    assert group_choices(choices) == ["well", "well_type"]
    assert guess_control(choices) == ("well_type", "negative_control")
    assert guess_control({"treatment": ["drug", "DMSO"], "type": ["x"]}) == ("treatment", "DMSO")
    assert guess_control({"cell_type": ["HeLa", "U2OS"]}) is None


def test_form_fields_follow_the_settings_and_refuse_unknown_names():
    fields = form_fields(TrainSettings, ["atoms", "method"])
    assert [f["name"] for f in fields] == ["atoms", "method"]
    assert fields[0]["label"] == "atoms (M)" and fields[1]["choices"] == ("icfl", "topk")
    assert form_fields(WhitenSettings, ["mode"])[0]["choices"] == ("pca", "center")
    with pytest.raises(ValueError, match="no field.*size"):
        form_fields(TrainSettings, ["size"])


def test_training_curves_keep_train_reports_and_restart():
    curves = TrainingCurves()
    assert not curves.add(Progress("whiten", 0, 1))
    for step in (10, 20):
        info = {"loss": 1.0 / step, "fvu": 0.5, "dead_fraction": 0.25, "samples": step}
        assert curves.add(Progress("train", step, 100, info))
    assert curves.steps == [10, 20] and curves.loss == [0.1, 0.05] and curves.total == 100
    assert curves.summary() == "step 20/100: loss 0.05, FVU 0.500, dead 25%"
    curves.add(Progress("train", 5, 50, {"loss": 2.0, "fvu": 0.9, "dead_fraction": 0.0}))
    assert curves.steps == [5] and curves.total == 50 and len(curves) == 1


# --- thumbnails ----------------------------------------------------------------------------


def test_composite_adds_tinted_channels_within_their_limits():
    image = np.zeros((2, 2, 2), np.uint16)
    image[0, 0, 0] = 100  # channel 0 at its top: full blue
    image[1, 0, 0] = 50  # channel 1 half way: half green
    image[1, 1, 1] = 500  # above its limit: clipped to full green
    rgb = composite(image, [(0, 0, 1), (0, 1, 0)], [(0, 100), (0, 100)])
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert rgb[0, 0].tolist() == [0, 128, 255] and rgb[1, 1].tolist() == [0, 255, 0]
    assert rgb[0, 1].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="2 channels need as many colours"):
        composite(image, [(1, 1, 1)], [(0, 1)])


def test_outline_square_box_and_a_thumbnail():
    mask = np.zeros((7, 7), bool)
    mask[1:6, 2:5] = True
    edge = outline(mask)
    assert edge.sum() == mask.sum() - 3  # the 3 x 1 inside is not on the outline
    assert not edge[3, 3] and edge[1, 2] and edge[5, 4]

    assert square_box((10, 20, 20, 40), (100, 100), pad=0.25) == (0, 15, 30, 45)
    assert square_box((90, 90, 100, 100), (100, 100), pad=0.0, min_size=24) == (76, 76, 100, 100)
    assert resize_nearest(np.arange(4).reshape(2, 2), 4).tolist() == [
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [2, 2, 3, 3],
        [2, 2, 3, 3],
    ]

    labels = np.zeros((64, 64), np.int32)
    labels[20:40, 24:44] = 7
    image = np.full((1, 64, 64), 50, np.uint8)
    thumb = cell_thumbnail(image, labels, 7, (20, 24, 40, 44), [(1, 0, 0)], [(0, 100)], size=40)
    assert thumb.shape == (40, 40, 3)
    white = (thumb == 255).all(axis=-1)
    assert white.any() and white.sum() < 40 * 40 / 4  # an outline, not a filled cell
    assert (thumb[~white] == [128, 0, 0]).all()  # the rest: the red channel at half


# --- feature views -------------------------------------------------------------------------


def test_display_table_joins_the_top_label_and_keeps_attribution_columns():
    features = pd.DataFrame(
        {
            "feature": [0, 1],
            "n_active": [3, 0],
            "frequency": [0.3, 0.0],
            "mean_activation": [1.5, 0.0],
            "top_column": ["cell_type", "cell_type"],
            "top_label": ["HeLa", "U2OS"],
            "selectivity_avg": [0.8, -np.inf],
            "selectivity_max": [0.6, np.nan],
            "top_tokens": [[1, 2], []],
            "stain_DNA": [0.7, 0.1],
        }
    )
    shown = display_table(features)
    assert list(shown.columns) == [
        "feature",
        "frequency",
        "mean_activation",
        "top",
        "selectivity_avg",
        "selectivity_max",
        "n_active",
        "stain_DNA",
    ]
    assert shown["top"].tolist() == ["cell_type=HeLa", ""]  # a feature that never fires: none
    assert headers(shown)[3][0] == "Top label" and headers(shown)[-1][0] == "Stain dna"
    # a nested dictionary's level and the feature's family come right after its number
    features.insert(1, "family", [0, -1])
    features.insert(1, "level", [16, 64])
    shown = display_table(features)
    assert list(shown.columns)[:3] == ["feature", "level", "family"]
    assert [h for h, _ in headers(shown)[:3]] == ["Feature", "Level", "Family"]
    # names, then descriptions: a feature no measurement follows says so instead of a blank
    described = pd.DataFrame({"feature": [0, 1], "description": ["DNA: area up (0.61)", ""]})
    named = with_names(shown, None, described)
    assert list(named.columns)[:3] == ["feature", "name", "description"]
    assert named["description"].tolist() == [
        "DNA: area up (0.61)",
        "no measurement follows it closely (all |Spearman| < 0.2)",
    ]
    assert named["name"].tolist() == ["", ""] and "description" not in with_names(shown, None)


def test_selectivity_columns_prefer_known_labels():
    table = pd.DataFrame(
        {
            "plate": ["P1", "P2"] * 3,
            "well": ["A01", "A02", "A03"] * 2,
            "label": range(6),
            "batch": ["x", "y"] * 3,
            "perturbation": ["a", "b", "c"] * 2,
            "constant": ["k"] * 6,
            "site_id": ["s1", "s2", "s3"] * 2,
        }
    )
    assert selectivity_columns(table) == ["perturbation", "batch"]
    assert selectivity_columns(table, max_values=2) == ["batch"]


def test_camera_frames_a_cell():
    center, zoom = camera_for_cell((10, 20, 30, 60), canvas=(400, 800), fraction=0.5)
    assert center == (19.5, 39.5) and zoom == pytest.approx(0.5 * 400 / 40)
    _, zoom_small = camera_for_cell((0, 0, 4, 4), canvas=(400, 400), min_side=32)
    assert zoom_small == pytest.approx(0.25 * 400 / 32)
