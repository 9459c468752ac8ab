"""Label folders: segment once, then info and embed find the labels; the store keeps them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tifffile
import torch

from napari_concept_discovery import segment
from napari_concept_discovery.cli import main
from napari_concept_discovery.errors import PlateError
from napari_concept_discovery.plate import PlateWarning, SiteKey, label_paths, open_plate
from napari_concept_discovery.plate_embedding import EmbedSettings, embed_plate
from napari_concept_discovery.progress import Progress
from napari_concept_discovery.store import ActivationStore

torch.set_num_threads(2)


class SegmentedAgain(AssertionError):
    """Raised by the stand-in for segment_site: the step under test must not segment."""


def _refuse(*args, **kwargs):
    raise SegmentedAgain("segment_site was called")


@pytest.fixture()
def bare_plate(small_plates, tmp_path):
    """small_plates without their own label images: cells must come from segmentation."""
    dst = tmp_path / "plate"
    shutil.copytree(small_plates, dst)
    shutil.rmtree(dst / "labels")
    return dst


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny channel-agnostic ViT saved as a file, so the CLI can load it by path."""
    from safetensors.torch import save_file

    from napari_concept_discovery.models import ChannelAgnosticViT

    torch.manual_seed(0)
    m = ChannelAgnosticViT(embed_dim=32, depth=2, num_heads=2, max_channels=6)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, path)
    return path


def test_segment_then_embed_segments_once(bare_plate, weights, tmp_path, capsys, monkeypatch):
    assert main(["segment", str(bare_plate)]) == 0
    folder = bare_plate / "segmentation"
    marker = json.loads((folder / "segmentation.json").read_text())
    assert marker["complete"] and marker["sites"] == 12 and marker["nuclear"] == "DNA"

    capsys.readouterr()
    assert main(["info", str(bare_plate)]) == 0
    info = capsys.readouterr().out
    assert f"12 of 12 sites carry cell labels (label folder {folder})" in info
    assert "warnings: 0" in info  # the label files are not taken for stray images

    monkeypatch.setattr(segment, "segment_site", _refuse)
    out = tmp_path / "store"
    rc = main(["embed", str(bare_plate), "--model", str(weights), "--out", str(out)])
    assert rc == 0
    store = ActivationStore.open(out)
    assert (store.sites().cells == "file").all()
    for key in open_plate(bare_plate).sites:
        written = tifffile.imread(label_paths(folder, key)[0])
        assert np.array_equal(store.site_labels(key), written)
    assert store.tokens("cell").shape[0] > 12

    # Without the label folder the same embedding does segment (the stand-in is reached).
    (folder / "segmentation.json").unlink()
    with pytest.raises(SegmentedAgain):
        embed_plate(bare_plate, EmbedSettings(model=str(weights)), tmp_path / "again")


def test_label_folder_outside_the_plate(bare_plate, weights, tmp_path, capsys, monkeypatch):
    labels = tmp_path / "my-labels"
    assert main(["segment", str(bare_plate), "--out", str(labels)]) == 0
    assert not (bare_plate / "segmentation").exists()
    capsys.readouterr()
    assert main(["info", str(bare_plate), "--labels", str(labels)]) == 0
    assert f"12 of 12 sites carry cell labels (label folder {labels})" in capsys.readouterr().out

    monkeypatch.setattr(segment, "segment_site", _refuse)
    plate = open_plate(bare_plate)  # opened without labels: the settings' folder is applied
    assert all(s.labels_path is None for s in plate)
    settings = EmbedSettings(model=str(weights), labels=str(labels), cells="file")
    store = embed_plate(plate, settings, tmp_path / "store")
    key = SiteKey("SYNTH_2", "B03", 1)
    assert np.array_equal(store.site_labels(key), tifffile.imread(label_paths(labels, key)[0]))
    assert store.plate_source["labels"] == str(labels.resolve())
    assert all(s.labels_path is None for s in plate)  # the caller's plate is left as it was
    # The store's plate source opens the plate with the same labels.
    again = open_plate(**store.plate_source)
    assert again.label_folder == labels.resolve()
    assert all(s.labels_path.parent.parent == labels.resolve() for s in again)


def test_segment_plate_progress_cancel_and_marker(bare_plate, tmp_path):
    plate = open_plate(bare_plate)
    seen: list[Progress] = []
    out = segment.segment_plate(
        plate, tmp_path / "seg", progress=seen.append, cancel=lambda: len(seen) > 3
    )
    assert out is None and [p.done for p in seen] == [0, 1, 2, 3]
    assert seen[1].stage == "segment" and seen[1].info["site"] == str(next(iter(plate)).key)
    marker = json.loads((tmp_path / "seg" / "segmentation.json").read_text())
    assert marker["complete"] is False
    with pytest.raises(PlateError, match="DAPI"):
        segment.segment_plate(plate, tmp_path / "seg2", nuclear="DAPI")
    assert not (tmp_path / "seg2").exists()  # nothing written for a channel the plate lacks


def _pattern_plate(root):
    """Two wells, channels DNA and ER, named so that a label file would match the pattern too."""
    rng = np.random.default_rng(0)
    for well in ("B02", "C03"):
        for ch in ("DNA", "ER"):
            tifffile.imwrite(root / f"{well}_s1_{ch}.tif", rng.integers(0, 255, (48, 64), np.uint8))
    return "{well}_s{site}_{channel}.tif"


def test_open_plate_uses_only_finished_label_folders(tmp_path):
    root = tmp_path / "P1"
    root.mkdir()
    pattern = _pattern_plate(root)
    folder = root / "segmentation"
    labels = {}
    for i, well in enumerate(("B02", "C03")):
        lab = np.zeros((48, 64), np.int32)
        lab[4 + i : 20, 8:30] = 1
        lab[25:40, 30 + i : 60] = 2
        labels[well] = lab
        cells, nuclei = label_paths(folder, SiteKey("P1", well, 1))
        cells.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(cells, lab)
        tifffile.imwrite(nuclei, lab)
    (folder / "segmentation.json").write_text(json.dumps({"complete": False}))

    unfinished = open_plate(root, pattern=pattern)
    assert unfinished.channel_names == ("DNA", "ER")  # "cells"/"nuclei" are not channels
    assert unfinished.label_folder is None and all(s.labels_path is None for s in unfinished)
    assert unfinished.warnings == []

    (folder / "segmentation.json").write_text(json.dumps({"complete": True}))
    plate = open_plate(root, pattern=pattern)
    assert plate.channel_names == ("DNA", "ER") and plate.label_folder == folder
    for key, site in plate.sites.items():
        assert np.array_equal(site.read_labels(), labels[key.well])
        assert site.nuclei_path == label_paths(folder, key)[1]
    # The recorded options open the same plate again.
    again = open_plate(**plate.source)
    assert list(again.sites) == list(plate.sites) and again.label_folder == folder


def test_label_folder_errors_and_partial_coverage(tmp_path):
    root = tmp_path / "P1"
    root.mkdir()
    pattern = _pattern_plate(root)
    with pytest.raises(PlateError, match="label folder not found"):
        open_plate(root, pattern=pattern, labels=tmp_path / "missing")
    wrong = tmp_path / "wrong"
    (wrong / "OTHER").mkdir(parents=True)
    with pytest.raises(PlateError, match=r"no cell labels for any site .*P1/B02_s1_cells\.tif"):
        open_plate(root, pattern=pattern, labels=wrong)
    partial = tmp_path / "partial"
    cells, _ = label_paths(partial, SiteKey("P1", "C03", 1))
    cells.parent.mkdir(parents=True)
    tifffile.imwrite(cells, np.ones((48, 64), np.int32))
    with pytest.warns(PlateWarning, match=r"no cell labels for 1 of 2 site\(s\): P1 B02 site 1"):
        plate = open_plate(root, pattern=pattern, labels=partial)
    assert plate[("P1", "B02", 1)].labels_path is None
    assert plate[("P1", "C03", 1)].labels_path == cells.resolve()
    with pytest.raises(PlateError, match=r"P1 B02 site 1: no label image .*cells='file'"):
        embed_plate(plate, EmbedSettings(cells="file"), tmp_path / "store")
