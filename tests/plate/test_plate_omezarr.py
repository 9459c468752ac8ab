"""OME-Zarr HCS plates written with ome-zarr and read back through open_plate, the CLI and the
napari reader, pixel for pixel."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

pytest.importorskip("ome_zarr")
from ome_zarr.format import FormatV04, FormatV05  # noqa: E402
from ome_zarr.writer import (  # noqa: E402
    write_image,
    write_labels,
    write_plate_metadata,
    write_well_metadata,
)

from napari_concept_discovery._reader import napari_get_reader
from napari_concept_discovery.cli import main
from napari_concept_discovery.plate import SiteKey, open_plate
from napari_concept_discovery.plate.convert import omero_channels

CHANNELS = ["DNA", "ER", "Mito"]
WELLS = [("B", "3"), ("C", "11")]
FIELDS = 2


def write_plate(path, fmt, seed: int = 0, name: str | None = None):
    """A plate of two wells with two fields each, (c, y, x) uint16 pixels, and cell labels on
    the first field of the first well. Returns {(well, site): pixels} and the labels."""
    rng = np.random.default_rng(seed)
    store = zarr.open_group(str(path), mode="w", zarr_format=2 if fmt.version == "0.4" else 3)
    write_plate_metadata(
        store,
        ["B", "C"],
        ["3", "11"],
        [f"{r}/{c}" for r, c in WELLS],
        fmt=fmt,
        field_count=FIELDS,
        name=name,
    )
    pixels, labels = {}, None
    for r, c in WELLS:
        well = store.require_group(r).require_group(c)
        write_well_metadata(well, [str(i) for i in range(FIELDS)], fmt=fmt)
        for i in range(FIELDS):
            image = rng.integers(0, 4000, size=(3, 48, 40), dtype=np.uint16)
            field = well.require_group(str(i))
            write_image(
                image,
                field,
                axes="cyx",
                fmt=fmt,
                scale_factors=[2],
                omero=omero_channels(CHANNELS, image),
            )
            pixels[(f"{r}{int(c):02d}", i + 1)] = image
            if labels is None:
                labels = np.zeros((48, 40), np.int32)
                labels[5:20, 4:18] = 1
                labels[25:40, 20:36] = 2
                write_labels(
                    labels, field, "cells", axes="yx", fmt=fmt, scaler=None, scale_factors=[2]
                )
    return pixels, labels


@pytest.mark.parametrize("fmt", [FormatV04(), FormatV05()], ids=["ngff-0.4", "ngff-0.5"])
def test_ome_zarr_plate_round_trip(tmp_path, fmt):
    root = tmp_path / "screen1.zarr"
    pixels, labels = write_plate(root, fmt)
    plate = open_plate(root)
    assert plate.layout == "ome-zarr"
    assert plate.channel_names == tuple(CHANNELS)
    assert plate.plates == ["screen1"]
    assert plate.keys == [SiteKey("screen1", w, s) for w, s in sorted(pixels)]
    assert plate.image_shape == (3, 48, 40) and plate.dtype == np.uint16
    for (well, site), image in pixels.items():
        np.testing.assert_array_equal(plate[("screen1", well, site)].read(), image)
    first = plate[("screen1", "B03", 1)]
    np.testing.assert_array_equal(first.read_labels(), labels)
    assert plate[("screen1", "B03", 2)].read_labels() is None
    assert plate.warnings == []
    # opened again from its recorded options, as a store does
    again = open_plate(**plate.source)
    assert again.keys == plate.keys and again.layout == "ome-zarr"


def test_folder_of_ome_zarr_plates_and_metadata(tmp_path):
    screen = tmp_path / "screen"
    a, _ = write_plate(screen / "p1.zarr", FormatV05(), seed=1, name="Plate 1")
    b, _ = write_plate(screen / "p2.zarr", FormatV04(), seed=2)
    (screen / "metadata.csv").write_text(
        "plate,well,perturbation\nPlate 1,B03,drug\nPlate 1,C11,control\np2,B03,control\n"
    )
    plate = open_plate(screen, layout="ome-zarr")
    assert plate.plates == ["Plate 1", "p2"]
    assert len(plate) == 2 * len(WELLS) * FIELDS
    np.testing.assert_array_equal(plate[("p2", "C11", 2)].read(), b[("C11", 2)])
    np.testing.assert_array_equal(plate[("Plate 1", "B03", 1)].read(), a[("B03", 1)])
    assert plate[("Plate 1", "B03", 2)].metadata["perturbation"] == "drug"
    assert plate[("p2", "B03", 1)].metadata["perturbation"] == "control"


def test_ome_zarr_errors_name_the_place(tmp_path, capsys):
    from napari_concept_discovery.errors import PlateError

    with pytest.raises(PlateError, match="no OME-Zarr plate"):
        open_plate(tmp_path, layout="ome-zarr")
    root = tmp_path / "p.zarr"
    write_plate(root, FormatV05())
    with pytest.raises(PlateError, match="2 channel names given for the 3 channels"):
        open_plate(root, channel_names=["a", "b"])
    assert open_plate(root, channel_names=["n", "e", "m"]).channel_names == ("n", "e", "m")


def test_ome_zarr_cli_info_and_napari_reader(tmp_path, capsys):
    root = tmp_path / "plate.zarr"
    pixels, _ = write_plate(root, FormatV05())
    assert main(["info", str(root)]) == 0
    out = capsys.readouterr().out
    assert "layout:   ome-zarr" in out and "sites:    4" in out and "DNA, ER, Mito" in out
    reader = napari_get_reader(str(root))
    assert reader is not None
    layers = reader(str(root))
    images = [d for d, meta, kind in layers if kind == "image"]
    assert len(images) == 1  # one layer split by channel_axis into the stains
    np.testing.assert_array_equal(np.asarray(images[0]), pixels[("B03", 1)])
    assert any(kind == "labels" for _, _, kind in layers)


def _one_field_plate(path, image, axes="cyx"):
    store = zarr.open_group(str(path), mode="w", zarr_format=3)
    write_plate_metadata(store, ["B"], ["3"], ["B/3"], fmt=FormatV05(), field_count=1)
    well = store.require_group("B").require_group("3")
    write_well_metadata(well, ["0"], fmt=FormatV05())
    write_image(image, well.require_group("0"), axes=axes, fmt=FormatV05(), scale_factors=[])
    return path / "B" / "3" / "0"


def test_broken_wells_and_fields_say_why(tmp_path, caplog):
    """A well whose zarr.json is broken JSON was 'listed but missing'; a NGFF 0.4
    well without .zattrs gave only the ome-zarr library's version-mismatch lines; a complex
    field passed `info --check`; a 7x7 NaN field under 3 named axes gave a raw zip() error."""
    import json
    import logging
    import warnings

    from napari_concept_discovery.errors import PlateError

    caplog.set_level(logging.DEBUG)
    a = tmp_path / "a.zarr"
    write_plate(a, FormatV05())
    (a / "B" / "3" / "zarr.json").write_text("{broken")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        plate = open_plate(a)
    said = " | ".join(str(w.message) for w in seen)
    assert f"{a}: well B/3 has metadata {a}/B/3/zarr.json that is not valid JSON (" in said
    assert len(plate) == FIELDS  # the other well is read

    b = tmp_path / "b.zarr"
    write_plate(b, FormatV04())
    (b / "B" / "3" / ".zattrs").unlink()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        open_plate(b)
    said = " | ".join(str(w.message) for w in seen)
    assert f"{b}: well B/3 has no well metadata listing its fields (the 'well' attributes" in said
    assert not [r for r in caplog.records if "version mismatch" in r.getMessage()]

    c = tmp_path / "c.zarr"
    field = _one_field_plate(c, np.ones((2, 16, 16), np.complex128))
    with pytest.raises(PlateError, match=rf"{field} holds complex128 pixels; expected integers"):
        open_plate(c)

    d = tmp_path / "d.zarr"
    field = _one_field_plate(d, np.full((7, 7), np.nan), axes="yx")
    with pytest.raises(PlateError, match=rf"{field} holds 49 NaN or Inf pixels of 49"):
        open_plate(d)[("d", "B03", 1)].read()
    meta = json.loads((field / "zarr.json").read_text())
    ms = meta["attributes"]["ome"]["multiscales"][0]
    ms["axes"] = [{"name": "c", "type": "channel"}, *ms["axes"]]
    (field / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(PlateError, match=r"names 3 axes \(c, y, x\) but its array has 2 dim"):
        open_plate(d)
