"""Bad input: every problem ends in a PlateError or a warning that names the file or well."""

from __future__ import annotations

import re

import imageio.v3 as iio
import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_concept_discovery.cli import main
from napari_concept_discovery.errors import PlateError
from napari_concept_discovery.plate import PlateWarning, open_plate
from plate_helpers import pixels, write_phenix, write_rxrx

PLATE1 = "images/EXP-01/Plate1"


def test_site_missing_a_channel_is_skipped_with_a_warning(tmp_path):
    write_rxrx(tmp_path)
    (tmp_path / PLATE1 / "C03_s2_w2.png").unlink()
    with pytest.warns(PlateWarning) as record:
        plate = open_plate(tmp_path)
    assert any("C03 site 2 lacks ER" in str(w.message) for w in record)
    assert ("EXP-01_1", "C03", 2) not in plate and ("EXP-01_1", "C03", 1) in plate
    assert any("C03 site 2 lacks ER" in w for w in plate.warnings)
    # its metadata row now has no images, and that is said too
    assert any("have no images" in w and "C03 site 2" in w for w in plate.warnings)


def test_unequal_shapes_within_a_site(tmp_path):
    write_rxrx(tmp_path)
    iio.imwrite(tmp_path / PLATE1 / "B02_s1_w3.png", pixels(5, shape=(20, 20)))
    with pytest.warns(PlateWarning, match=r"B02 site 1 have unequal shapes"):
        plate = open_plate(tmp_path)
    assert ("EXP-01_1", "B02", 1) not in plate and len(plate) == 3
    # without the header check, reading the site says which file differs
    lazy = open_plate(tmp_path, check=False)
    with pytest.raises(
        PlateError, match=r"B02 site 1 have unequal shapes.*B02_s1_w3\.png \(20, 20\)"
    ):
        lazy[("EXP-01_1", "B02", 1)].read()


def test_corrupt_image_names_the_file(tmp_path):
    folder = tmp_path / "plate"
    write_phenix(folder)
    bad = folder / "r01c02f02p01-ch2sk1fk1fl1.tiff"
    bad.write_bytes(b"II*\x00 this is not a tiff")
    with pytest.warns(PlateWarning, match=re.escape(str(bad))):
        plate = open_plate(folder)
    assert ("plate", "A02", 2) not in plate and len(plate) == 3
    lazy = open_plate(folder, check=False)
    with pytest.raises(PlateError, match=re.escape(f"cannot read image {bad}")):
        lazy[("plate", "A02", 2)].read()


def test_truncated_png_names_the_file(tmp_path):
    write_rxrx(tmp_path)
    bad = tmp_path / PLATE1 / "C03_s1_w1.png"
    bad.write_bytes(bad.read_bytes()[:40])
    lazy = open_plate(tmp_path, check=False)
    with pytest.raises(PlateError, match=re.escape(str(bad))):
        lazy[("EXP-01_1", "C03", 1)].read()


def test_non_image_files_are_named(tmp_path):
    write_rxrx(tmp_path)
    (tmp_path / PLATE1 / "notes.txt").write_text("ignore me")
    (tmp_path / PLATE1 / "B02_s1_w1.png.bak").write_bytes(b"x")
    with pytest.warns(
        PlateWarning, match=r"2 non-image file\(s\).*B02_s1_w1\.png\.bak.*notes\.txt"
    ):
        plate = open_plate(tmp_path)
    assert len(plate) == 4


def test_images_that_do_not_match_the_layout_are_named(tmp_path):
    write_rxrx(tmp_path)
    iio.imwrite(tmp_path / PLATE1 / "overview.png", pixels(1))
    with pytest.warns(PlateWarning, match=r"do not match.*Plate1/overview\.png"):
        open_plate(tmp_path)


def test_metadata_rows_without_images_and_images_without_rows(tmp_path):
    write_rxrx(tmp_path)
    table = pd.read_csv(tmp_path / "metadata.csv")
    extra = table.iloc[[0]].assign(well="H12", site_id="EXP-01_1_H12_1")
    table = pd.concat([table[table.well != "C03"], extra])
    table.to_csv(tmp_path / "metadata.csv", index=False)
    with pytest.warns(PlateWarning) as record:
        plate = open_plate(tmp_path)
    messages = " | ".join(str(w.message) for w in record)
    assert "1 row(s) of" in messages and "EXP-01_1 H12 site 1" in messages
    assert "2 site(s) have no row" in messages and "EXP-01_1 C03 site 1" in messages
    assert plate[("EXP-01_1", "C03", 1)].metadata == {}


def test_metadata_plates_that_match_nothing_are_explained(tmp_path):
    write_phenix(tmp_path / "BR0001")
    table = pd.DataFrame({"Metadata_Plate": ["BR9999"], "Metadata_Well": ["A02"], "x": [1]})
    with pytest.warns(PlateWarning) as record:
        open_plate(tmp_path / "BR0001", metadata=table)
    messages = [str(w.message) for w in record]
    assert any("table names plates BR9999; the images are on plates BR0001" in m for m in messages)
    assert any("4 site(s) have no row" in m and "BR0001 C11 site 2" in m for m in messages)


def test_duplicate_metadata_rows_are_an_error(tmp_path):
    write_phenix(tmp_path / "BR0001")
    table = pd.DataFrame({"well": ["A02", "a2"], "compound": ["DMSO", "taxol"]})
    with pytest.raises(PlateError, match=r"two rows for well A02 \(rows 1 and 2\)"):
        open_plate(tmp_path / "BR0001", metadata=table)


def test_metadata_without_a_well_column(tmp_path):
    write_phenix(tmp_path / "BR0001")
    with pytest.raises(PlateError, match=r"no well column.*columns are: compound"):
        open_plate(tmp_path / "BR0001", metadata=pd.DataFrame({"compound": ["DMSO"]}))


def test_unreadable_metadata_file(tmp_path):
    write_phenix(tmp_path / "BR0001")
    with pytest.raises(PlateError, match=r"metadata table not found: .*nope\.csv"):
        open_plate(tmp_path / "BR0001", metadata=tmp_path / "nope.csv")


def test_duplicate_keys_name_both_files(tmp_path):
    """B7 and B07 are the same well: two files for one channel of one site."""
    for name in ("B7_01_1_1_DAPI_001.tif", "B07_01_1_1_DAPI_001.tif"):
        tifffile.imwrite(tmp_path / name, pixels(1))
    with pytest.raises(
        PlateError, match=r"duplicate files for channel 1 of .* B07 site 1: .*B07_01.*B7_01"
    ):
        open_plate(tmp_path, pattern="{well}_01_{channel_index}_{site}_{channel}_001.tif")


def test_z_planes_are_refused_with_a_reason(tmp_path):
    for plane in (1, 2):
        tifffile.imwrite(tmp_path / f"r01c01f01p0{plane}-ch1sk1fk1fl1.tiff", pixels(plane))
    with pytest.raises(PlateError, match=r"A01 site 1 has 2 z-planes.*project them"):
        open_plate(tmp_path)


def test_unknown_layout_and_bad_patterns(tmp_path):
    write_rxrx(tmp_path)
    with pytest.raises(
        PlateError, match=r"unknown layout 'opera'; choose one of auto, rxrx, phenix"
    ):
        open_plate(tmp_path, layout="opera")
    with pytest.raises(PlateError, match=r"unknown field \{wel\}.*known fields"):
        open_plate(tmp_path, pattern="{wel}_s{site}_w{channel_index}.png")
    with pytest.raises(PlateError, match=r"needs \{well\} or both \{row\} and \{col\}"):
        open_plate(tmp_path, pattern="{plate}_s{site}.png")
    with pytest.raises(
        PlateError, match=r"channel_names has 2 names but the files have 3 channels"
    ):
        open_plate(tmp_path, channel_names=["DNA", "ER"])


def test_autodetect_failure_says_what_it_saw(tmp_path):
    for i in range(3):
        tifffile.imwrite(tmp_path / f"scan_{i}.tif", pixels(i))
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(PlateError) as info:
        open_plate(tmp_path)
    message = str(info.value)
    assert "could not tell the layout" in message
    assert "4 file(s) (3 .tif, 1 .txt)" in message and "scan_0.tif" in message
    assert "rxrx" in message and "phenix" in message and "pattern=" in message


def test_paths_that_are_not_plate_folders(tmp_path):
    with pytest.raises(PlateError, match="plate folder not found"):
        open_plate(tmp_path / "missing")
    (tmp_path / "a.tif").write_bytes(b"")
    with pytest.raises(PlateError, match="is a file"):
        open_plate(tmp_path / "a.tif")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PlateError, match="the folder is empty"):
        open_plate(empty)


def test_colour_png_where_one_channel_is_expected(tmp_path):
    write_rxrx(tmp_path)
    rgb = np.stack([pixels(1), pixels(2), pixels(3)], axis=-1)
    iio.imwrite(tmp_path / PLATE1 / "B02_s2_w1.png", rgb)
    plate = open_plate(tmp_path, check=False)
    with pytest.raises(PlateError, match=r"B02_s2_w1\.png is a colour image"):
        plate[("EXP-01_1", "B02", 2)].read()


def test_cli_info_prints_the_plate_and_its_warnings(tmp_path, capsys):
    write_rxrx(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "layout:   rxrx" in out and "sites:    4" in out
    assert "channels: 3 (DNA, ER, Actin)" in out and "shape:    (3, 24, 32)" in out
    assert "dtype:    uint8" in out and "well_type" in out
    assert "warnings: 1" in out and "notes.txt" in out


def test_cli_info_error_is_one_line(tmp_path, capsys):
    (tmp_path / "x.tif").write_bytes(b"")
    assert main(["info", str(tmp_path), "--layout", "phenix"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no images found") and "Traceback" not in err
