"""`convert`: any plate layout written as OME-Zarr HCS plates reads back as the same plate."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ome_zarr")

from fault_helpers import snapshot  # noqa: E402
from napari_concept_discovery.cli import main
from napari_concept_discovery.plate import open_plate
from napari_concept_discovery.plate.convert import convert_plate
from napari_concept_discovery.synth import write_synthetic_plates


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
    names = sorted(p.name for p in out.iterdir())
    assert names == ["SYNTH_1.zarr", "SYNTH_2.zarr", "metadata.csv", "truth.csv"]
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
    # one resolution level per field and per label image (ome-zarr's default Scaler would add
    # four), and channel windows that NGFF viewers take from the pixels
    from ome_zarr.io import ZarrLocation

    field = back[source.keys[0]].paths[0]
    for where in (field, field / "labels" / "cells"):
        attrs = ZarrLocation(str(where)).root_attrs
        assert len(attrs["multiscales"][0]["datasets"]) == 1, where
    window = ZarrLocation(str(field)).root_attrs["omero"]["channels"][0]["window"]
    dna = source[source.keys[0]].read()[0]
    assert (window["start"], window["end"]) == (float(dna.min()), float(dna.max()))


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


@pytest.fixture(scope="module")
def tiny_backend():
    import torch

    from napari_concept_discovery.models.backend import ChannelAgnosticBackend
    from napari_concept_discovery.models.vit import ChannelAgnosticViT

    torch.manual_seed(0)
    vit = ChannelAgnosticViT(embed_dim=32, depth=2, num_heads=2, max_channels=6)
    return ChannelAgnosticBackend(vit, model_id="tiny-random", weights_hash="0", default_block=1)


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_converted_plate_embeds_to_the_same_tokens(synth, tmp_path, tiny_backend, ngff):
    """An OME-Zarr plate embeds (its fields are folders, signed by every file under them), and
    its tokens are those of the same plate in its original layout."""
    from napari_concept_discovery.embed.plate import EmbedSettings, embed_plate

    out = tmp_path / "zarr"
    convert_plate(synth, out, ngff=ngff)
    original = embed_plate(synth, EmbedSettings(), tmp_path / "a", backend=tiny_backend)
    converted = embed_plate(out, EmbedSettings(), tmp_path / "b", backend=tiny_backend)
    for unit in ("cell", "patch", "crop"):
        a, b = original.table(unit), converted.table(unit)
        assert len(a) == len(b) > 0
        for col in ("plate", "well", "site"):
            assert list(a[col]) == list(b[col])
        np.testing.assert_allclose(
            np.asarray(converted.tokens(unit)), np.asarray(original.tokens(unit)), atol=1e-5
        )
    # signed by content: embedding again reuses the store; a changed pixel file rebuilds it
    again = embed_plate(out, EmbedSettings(), tmp_path / "b", backend=tiny_backend)
    assert again.reused
    import zarr

    level = sorted((out / "SYNTH_1.zarr").glob("*/*/0/s0"))[0]  # first field, full resolution
    pixels = zarr.open_array(str(level), mode="r+")
    pixels[0, 0, 0] = pixels[0, 0, 0] + 1
    assert not embed_plate(out, EmbedSettings(), tmp_path / "b", backend=tiny_backend).reused


def test_convert_never_replaces_its_own_input(synth, tmp_path, capsys):
    """--overwrite never lets convert replace the plate it reads, a folder inside it
    or one that holds it; the refusal names both; the current folder is refused by name."""
    import shutil

    plate = tmp_path / "plate"
    shutil.copytree(synth, plate)
    before = snapshot(tmp_path)
    cases = {
        str(plate): f"OME-Zarr output folder {plate} is the plate folder {plate} being converted",
        str(plate / "images"): f"OME-Zarr output folder {plate / 'images'} is inside the plate "
        f"folder {plate} being converted",
        str(tmp_path): f"OME-Zarr output folder {tmp_path} holds the plate folder {plate}",
    }
    for out, message in cases.items():
        assert main(["convert", str(plate), "--out", out, "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert snapshot(tmp_path) == before


def test_convert_current_folder_is_named(synth, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    assert main(["convert", str(synth), "--out", ".", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: OME-Zarr output folder {work} is the current folder, which convert cannot "
        "replace whole; give a new folder\n"
    )
    assert (work / "notes.txt").read_text() == "mine"


def test_convert_carries_the_truth_table(synth, tmp_path):
    import pandas as pd

    out = tmp_path / "zarr"
    convert_plate(synth, out)
    pd.testing.assert_frame_equal(pd.read_csv(out / "truth.csv"), pd.read_csv(synth / "truth.csv"))
