"""Every folder of real images in tests/data/real opens, with the keys its README gives."""

from __future__ import annotations

import numpy as np
import pytest

from napari_concept_discovery.errors import PlateError
from napari_concept_discovery.plate import PlateWarning, SiteKey, open_plate

NF1_PATTERN = "{well}_01_{channel_index}_{site}_{channel}_001.tif"


def test_pediatric_cancer_atlas_phenix(real_data):
    plate = open_plate(real_data / "pediatric_cancer_atlas_BR00143976")
    assert plate.layout == "phenix" and plate.warnings == []
    assert plate.keys == [SiteKey("pediatric_cancer_atlas_BR00143976", "C03", 3)]
    assert plate.channel_names == ("ch1", "ch2", "ch3", "ch4", "ch5", "ch6")
    image = plate[plate.keys[0]].read()  # LZW-compressed: needs imagecodecs
    assert image.shape == (6, 1080, 1080) and image.dtype == np.uint16
    assert all(image[c].std() > 0 for c in range(6))


def test_jump_phenix_with_three_of_five_stains(real_data):
    plate = open_plate(real_data / "jump_BR00117006", channel_names={2: "AGP", 3: "RNA", 5: "DNA"})
    assert plate.layout == "phenix" and plate.warnings == []
    assert plate.keys == [SiteKey("jump_BR00117006", "A01", 1)]
    assert plate.channel_names == ("AGP", "RNA", "DNA")
    assert plate.image_shape == (3, 1080, 1080)
    assert next(iter(plate)).read().shape == (3, 1080, 1080)


def test_nf1_through_a_pattern(real_data):
    plate = open_plate(real_data / "nf1_plate2" / "images", pattern=NF1_PATTERN)
    assert plate.layout == "pattern" and plate.warnings == []
    assert plate.plates == ["nf1_plate2"]
    assert [(k.well, k.site) for k in plate.keys] == [
        ("B07", 3),
        ("D06", 2),
        ("D07", 1),
        ("F07", 2),
        ("H12", 1),
    ]
    assert plate.channel_names == ("DAPI", "GFP", "RFP")
    image = plate[("nf1_plate2", "B7", 3)].read()
    assert image.shape == (3, 904, 1224) and image.dtype == np.uint16


def test_nf1_parent_folder_needs_a_pattern_and_says_so(real_data):
    with pytest.raises(PlateError, match=r"could not tell the layout.*15 \.tif, 15 \.tiff"):
        open_plate(real_data / "nf1_plate2")
    # with the pattern, the masks beside the images are named as ignored, not read as channels
    with pytest.warns(PlateWarning, match="do not match"):
        plate = open_plate(real_data / "nf1_plate2", pattern=NF1_PATTERN, check=False)
    assert len(plate) == 5
    assert any(
        "15 image file(s) that do not match" in w and "MaskNuclei" in w for w in plate.warnings
    )
