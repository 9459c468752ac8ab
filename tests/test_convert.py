"""`convert`: any plate layout written as OME-Zarr HCS plates reads back as the same plate."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ome_zarr")

from fault_helpers import snapshot  # noqa: E402
from napari_concept_discovery.cli import main  # noqa: E402
from napari_concept_discovery.convert import convert_plate  # noqa: E402
from napari_concept_discovery.plate import open_plate  # noqa: E402
from napari_concept_discovery.synth import write_synthetic_plates  # noqa: E402


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_synthetic_plates(tmp_path_factory.mktemp("convert"), 2, 3, 2, 96, seed=4)


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_convert_round_trip(synth, tmp_path, capsys, ngff):
    out = tmp_path / "zarr"
    assert main(["convert", str(synth), "--out", str(out), "--ngff", ngff]) == 0
    printed = capsys.readouterr().out
    source = open_plate(synth)
    assert f"wrote {len(source)} sites as 2 OME-Zarr plate(s)" in printed
    back = open_plate(out)
    assert back.layout == "ome-zarr"
    assert back.channel_names == source.channel_names
    assert back.keys == source.keys
    assert sorted(p.name for p in out.iterdir()) == ["SYNTH_1.zarr", "SYNTH_2.zarr", "metadata.csv"]
    for key in source.keys:
        a, b = source[key], back[key]
        image = b.read()
        assert image.dtype == a.read().dtype
        np.testing.assert_array_equal(image, a.read())
        np.testing.assert_array_equal(b.read_labels(), a.read_labels())
        np.testing.assert_array_equal(b.read_nuclei(), a.read_nuclei())
        # the key columns are the site's key; every other metadata column travels as it is
        keep = set(a.metadata) - {"plate", "well", "site"}
        assert {k: b.metadata.get(k) for k in keep} == {k: a.metadata[k] for k in keep}
        assert "perturbation" in keep
    assert back.warnings == []


def test_convert_refuses_a_full_folder_and_is_atomic(synth, tmp_path, capsys):
    out = tmp_path / "zarr"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    assert main(["convert", str(synth), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out} exists and is not empty" in err and "--overwrite" in err
    assert snapshot(out) == before
    # cancelled half-way: the folder is as it was, no temporary folder left beside it
    seen = []
    result = convert_plate(
        synth,
        out,
        overwrite=True,
        progress=lambda p: seen.append(p.done),
        cancel=lambda: len(seen) > 3,
    )
    assert result is None and 0 < seen[-1] < len(open_plate(synth))
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zarr"]
    assert main(["convert", str(synth), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "notes.txt").exists()
    assert open_plate(out).keys == open_plate(synth).keys
