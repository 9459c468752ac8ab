"""Round trips: folders written here in each layout open to the same keys, pixels and rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_concept_discovery.plate import FilenamePattern, SiteKey, normalize_well, open_plate
from plate_helpers import pixels, write_phenix, write_rxrx


def test_rxrx_round_trip_with_metadata(tmp_path):
    truth = write_rxrx(tmp_path, plates=(1, 2))
    plate = open_plate(tmp_path)
    assert plate.layout == "rxrx"
    assert plate.channel_names == ("DNA", "ER", "Actin")
    assert plate.plates == ["EXP-01_1", "EXP-01_2"]
    assert set(plate.sites) == {SiteKey(*k) for k in truth}
    assert plate.warnings == []
    for key, expected in truth.items():
        site = plate[key]
        np.testing.assert_array_equal(site.read(), expected)
        assert site.metadata["site_id"] == f"{key[0]}_{key[1]}_{key[2]}"
    assert plate.image_shape == (3, 24, 32) and plate.dtype == np.uint8
    table = plate.site_table()
    assert list(table.columns[:3]) == ["plate", "well", "site"]
    assert table["plate"].tolist() == [k.plate for k in plate.sites]
    assert "well_type" in table and "experiment" in table
    # keys are normalised on lookup, and the images/ folder opens the same plate
    assert plate[("EXP-01_1", "b2", "1")].key == SiteKey("EXP-01_1", "B02", 1)
    same = open_plate(tmp_path / "images")
    assert set(same.sites) == set(plate.sites) and same.metadata is not None


def test_phenix_round_trip_and_channel_names(tmp_path):
    folder = tmp_path / "BR0001"
    truth = write_phenix(folder)
    plate = open_plate(folder)
    assert plate.layout == "phenix"
    assert plate.channel_names == ("ch1", "ch2", "ch5")
    assert set(plate.sites) == {SiteKey(*k) for k in truth}
    assert SiteKey("BR0001", "C11", 2) in plate
    for key, expected in truth.items():
        np.testing.assert_array_equal(plate[key].read(), expected)
    named = open_plate(folder, layout="jump", channel_names=["Mito", "AGP", "DNA"])
    assert named.channel_names == ("Mito", "AGP", "DNA")
    by_index = open_plate(folder, channel_names={5: "DNA", 1: "Mito", 2: "AGP"})
    assert by_index.channel_names == ("Mito", "AGP", "DNA")


def test_phenix_metadata_joined_by_cellprofiler_columns(tmp_path):
    folder = tmp_path / "BR0001"
    write_phenix(folder)
    table = pd.DataFrame(
        {
            "Metadata_Plate": ["BR0001", "BR0001"],
            "Metadata_Well": ["A2", "C11"],
            "compound": ["DMSO", "taxol"],
        }
    )
    plate = open_plate(folder, metadata=table)
    assert plate.warnings == []
    assert plate[("BR0001", "A02", 2)].metadata["compound"] == "DMSO"
    assert plate[("BR0001", "C11", 1)].metadata["compound"] == "taxol"
    assert plate.site_table()["compound"].tolist() == ["DMSO", "DMSO", "taxol", "taxol"]


def test_multichannel_tiff_with_csv(tmp_path):
    truth = {}
    rows = []
    for i, (well, site) in enumerate([("A01", 1), ("A01", 2), ("B12", 1)]):
        image = np.stack([pixels(10 * i + c, dtype=np.uint16) for c in range(4)])
        name = f"site_{i}.ome.tif"
        tifffile.imwrite(
            tmp_path / name,
            image,
            ome=True,
            metadata={"axes": "CYX", "Channel": {"Name": ["DNA", "ER", "AGP", "Mito"]}},
        )
        truth[("exp7", well, site)] = image
        rows.append({"file": name, "plate": "exp7", "well": well, "site": site, "dose": i})
    pd.DataFrame(rows).to_csv(tmp_path / "files.csv", index=False)
    plate = open_plate(tmp_path)
    assert plate.layout == "tiff-csv"
    assert plate.channel_names == ("DNA", "ER", "AGP", "Mito")
    assert plate.warnings == []
    for key, expected in truth.items():
        site = plate[key]
        np.testing.assert_array_equal(site.read(), expected)
        assert site.metadata["dose"] == rows[list(truth).index(key)]["dose"]


def test_pattern_multichannel_file_per_site(tmp_path):
    """A pattern without a channel field means one multi-channel file per site."""
    image = np.stack([pixels(c) for c in range(3)])
    tifffile.imwrite(tmp_path / "D04_f3.tif", image, photometric="minisblack")
    tifffile.imwrite(tmp_path / "D05_f1.tif", image[::-1], photometric="minisblack")
    plate = open_plate(tmp_path, pattern="{well}_f{field}.tif", channel_names=["a", "b", "c"])
    assert plate.layout == "pattern"
    assert plate.keys == [SiteKey(tmp_path.name, "D04", 3), SiteKey(tmp_path.name, "D05", 1)]
    np.testing.assert_array_equal(plate[plate.keys[1]].read(), image[::-1])


def test_pattern_with_folders_row_col_and_named_channels(tmp_path):
    truth = {}
    for plate_name in ("P1", "P2"):
        folder = tmp_path / plate_name / "images"
        folder.mkdir(parents=True)
        planes = {ch: pixels(hash((plate_name, ch)) % 1000) for ch in ("Hoechst", "Tubulin")}
        for ch, plane in planes.items():
            tifffile.imwrite(folder / f"R2-C14-{ch}.tif", plane)
        truth[(plate_name, "B14", 1)] = np.stack([planes["Hoechst"], planes["Tubulin"]])
    plate = open_plate(
        tmp_path,
        pattern="{plate}/images/R{row}-C{col}-{channel}.tif",
        channel_names=["Hoechst", "Tubulin"],
    )
    assert plate.channel_names == ("Hoechst", "Tubulin")
    for key, expected in truth.items():
        np.testing.assert_array_equal(plate[key].read(), expected)


def test_synthetic_plates_carry_labels(small_plates):
    plate = open_plate(small_plates)
    assert plate.layout == "rxrx"
    assert plate.channel_names == ("DNA", "ER", "Actin", "RNA", "Mito", "Membrane")
    assert len(plate.plates) == 2 and all(p.startswith("SYNTH_") for p in plate.plates)
    assert not [w for w in plate.warnings if "labels" in w or "metadata" in w]
    site = next(iter(plate))
    image, labels, nuclei = site.read(), site.read_labels(), site.read_nuclei()
    assert image.shape[0] == 6 and image.dtype == np.uint8
    assert labels.shape == image.shape[1:] and labels.dtype == np.int32 and labels.max() > 0
    assert set(np.unique(nuclei)) <= set(np.unique(labels))
    assert "cell_type" in site.metadata and "perturbation" in plate.site_table()


@pytest.mark.parametrize(
    ("raw", "expected"), [("B7", "B07"), ("b07", "B07"), ("H12", "H12"), ("AF048", "AF48")]
)
def test_well_names_normalise(raw, expected):
    assert normalize_well(raw) == expected


def test_pattern_matches_tail_of_path():
    pat = FilenamePattern("{well}_01_{channel_index}_{site}_{channel}_001.tif")
    assert pat.match(("x", "B7_01_2_3_GFP_001.tif")) == {
        "well": "B7",
        "channel_index": "2",
        "site": "3",
        "channel": "GFP",
    }
    assert pat.match(("B7_01_2_3_GFP_001_MaskNuclei.tiff",)) is None
