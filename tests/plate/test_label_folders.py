"""Label folders: segment once, then info and embed find the labels; the store keeps them."""

from __future__ import annotations

import functools
import json
import shutil

import numpy as np
import pytest
import tifffile
import torch

from napari_concept_discovery.cli import main
from napari_concept_discovery.embed import plate as plate_embedding
from napari_concept_discovery.embed.plate import EmbedSettings, embed_plate, site_inputs
from napari_concept_discovery.embed.store import ActivationStore
from napari_concept_discovery.errors import PlateError
from napari_concept_discovery.plate import (
    PlateWarning,
    SiteKey,
    label_paths,
    open_plate,
    segmentation,
)
from napari_concept_discovery.progress import Progress
from napari_concept_discovery.segment import site as segment_site

torch.set_num_threads(2)


class SegmentedAgain(AssertionError):
    """Raised by the stand-in segmenter: the step under test must not segment."""


def _refuse(*args, **kwargs):
    raise SegmentedAgain("a site was segmented")


def _no_segmenting(monkeypatch) -> None:
    """Every segmenter made during the test refuses; embedding's cache of segmenters is a
    fresh one for the test, so no refusing segmenter outlives it."""
    monkeypatch.setattr(segmentation, "make_segmenter", lambda *a, **k: _refuse)
    monkeypatch.setattr(segment_site, "make_segmenter", lambda *a, **k: _refuse)
    fresh = functools.lru_cache(maxsize=2)(plate_embedding._segmenter.__wrapped__)
    monkeypatch.setattr(plate_embedding, "_segmenter", fresh)
    monkeypatch.setattr(segment_site, "segment_site", _refuse)


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

    _no_segmenting(monkeypatch)
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

    _no_segmenting(monkeypatch)
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
    out = segmentation.segment_plate(
        plate, tmp_path / "seg", progress=seen.append, cancel=lambda: len(seen) > 3
    )
    assert out is None and [p.done for p in seen] == [0, 1, 2, 3]
    assert seen[1].stage == "segment" and seen[1].info["site"] == str(next(iter(plate)).key)
    marker = json.loads((tmp_path / "seg" / "segmentation.json").read_text())
    assert marker["complete"] is False
    with pytest.raises(PlateError, match="DAPI"):
        segmentation.segment_plate(plate, tmp_path / "seg2", nuclear="DAPI")
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


# --- labels a user brings: CellProfiler, Cellpose, a pattern ----------------------------------

SHAPE = (48, 64)


def _two_cells():
    """One binary mask holding two touching cells (one connected piece), their two nuclei,
    and the cells as labels: the split falls halfway between the nuclei (column 32)."""
    mask = np.zeros(SHAPE, np.uint8)
    mask[10:30, 6:58] = 255
    nuclei = np.zeros(SHAPE, np.uint8)
    nuclei[15:25, 10:20] = 255
    nuclei[15:25, 44:54] = 255
    cells = np.zeros(SHAPE, np.int32)
    cells[10:30, 6:32] = 1
    cells[10:30, 32:58] = 2
    return mask, nuclei, cells


def _plate_with(root, files: dict):
    """A two-well pattern plate whose label folder ``root/"labels"`` holds ``files``."""
    root.mkdir()
    pattern = _pattern_plate(root)
    labels = root.parent / f"{root.name}-labels"
    for name, data in files.items():
        path = labels / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".npy"):
            np.save(path, data, allow_pickle=True)
        elif name.endswith(".png"):
            import imageio.v3 as iio

            iio.imwrite(path, data)
        else:
            tifffile.imwrite(path, data)
    return pattern, labels


def test_cellprofiler_binary_masks_are_split_by_the_nuclei(tmp_path):
    mask, nuclei, _ = _two_cells()
    files = {
        "B02_s1_ER_MaskCells.tiff": mask,
        "B02_s1_DNA_MaskNuclei.tiff": nuclei,
        "B02_s1_ER_MaskCytoplasm.tiff": mask,  # not whole objects: never read as cells
        "C03_s1_ER_MaskCells.tiff": mask,  # no nuclei file: split by our own nuclei
    }
    pattern, folder = _plate_with(tmp_path / "P1", files)
    tifffile.imwrite(tmp_path / "P1" / "C03_s1_DNA.tif", _dna_of(nuclei))
    plate = open_plate(tmp_path / "P1", pattern=pattern, labels=folder)
    assert plate.warnings == []
    site = plate[("P1", "B02", 1)]
    assert site.labels_path.name == "B02_s1_ER_MaskCells.tiff" and site.user_labels
    assert site.nuclei_path.name == "B02_s1_DNA_MaskNuclei.tiff"
    cells, nuc = site.read_labels(), site.read_nuclei()
    assert cells.dtype == np.int32 and set(np.unique(cells)) == {0, 1, 2}
    assert np.array_equal(cells > 0, mask > 0)  # every mask pixel in a cell, nothing else
    left, right = cells[15, 10], cells[15, 50]
    assert left != right
    assert (cells[10:30, 6:31] == left).all() and (cells[10:30, 34:58] == right).all()
    # nucleus i lies in cell i
    assert (nuc[15:25, 10:20] == left).all() and (nuc[15:25, 44:54] == right).all()
    assert np.array_equal(nuc > 0, nuclei > 0)
    # without a nuclei file the touching cells are split by the nuclei of the DNA channel
    own = plate[("P1", "C03", 1)].read_labels()
    assert set(np.unique(own)) == {0, 1, 2} and np.array_equal(own > 0, mask > 0)
    assert own[15, 10] != own[15, 50]
    assert (own[10:30, 6:29] == own[15, 10]).all() and (own[10:30, 36:58] == own[15, 50]).all()
    assert plate[("P1", "C03", 1)].read_nuclei() is None  # no nuclei file


def _dna_of(nuclei: np.ndarray) -> np.ndarray:
    """A nuclear stain showing ``nuclei``: dim noisy background, bright nuclei."""
    rng = np.random.default_rng(1)
    dna = rng.integers(5, 25, nuclei.shape).astype(np.uint8)
    dna[nuclei > 0] = rng.integers(180, 230, int((nuclei > 0).sum()))
    return dna


def test_binary_mask_without_nuclei_is_split_by_our_nuclei(tmp_path):
    """A binary mask of two touching cells and no nuclei file becomes two
    cells, split by the nuclei found in the plate's nuclear stain, when embedding too (the
    stain named by ``nuclear``); with no nuclear stain to find, its connected pieces."""
    from napari_concept_discovery.plate.label_images import (
        nuclear_index,
        own_nuclei,
        read_user_labels,
    )

    mask, nuclei, _ = _two_cells()
    pattern, folder = _plate_with(tmp_path / "P1", {"B02_s1_ER_MaskCells.tiff": mask})
    tifffile.imwrite(tmp_path / "P1" / "B02_s1_DNA.tif", _dna_of(nuclei))
    with pytest.warns(PlateWarning, match="no cell labels"):
        plate = open_plate(tmp_path / "P1", pattern=pattern, labels=folder)
    site = plate[("P1", "B02", 1)]
    assert site.nuclei_path is None
    inputs = site_inputs(site, nuclear="DNA")
    assert inputs.nuclear == "DNA" and "DNA" in inputs.token  # the split depends on the stain
    for cells in (site.read_labels(), inputs.read_labels(site.read(), site.channel_names)):
        assert set(np.unique(cells)) == {0, 1, 2} and np.array_equal(cells > 0, mask > 0)
        left, right = cells[15, 10], cells[15, 50]
        assert left != right and (cells[10:30, 6:29] == left).all()
        assert (cells[10:30, 36:58] == right).all()
    # the nuclei come back with the cells' ids when asked for directly
    dna = _dna_of(nuclei)
    cells, own = read_user_labels(
        site.labels_path, nuclei_from=own_nuclei(lambda: dna[None], ["DNA"])
    )
    assert set(np.unique(own)) == {0, 1, 2} and own[20, 15] == cells[20, 15]
    # channels that name no nuclear stain: nothing to split by, the mask's connected pieces
    assert nuclear_index(["ch1", "ch2"]) is None and nuclear_index(["ch1", "ch5"], "ch5") == 1
    assert nuclear_index(["GFP", "DAPI"]) == 1 and nuclear_index(["a", "b"], "1") == 1
    pieces, none = read_user_labels(
        site.labels_path, nuclei_from=own_nuclei(lambda: dna[None], ["ch1"])
    )
    assert set(np.unique(pieces)) == {0, 1} and none is None


def test_cellprofiler_label_exports_keep_their_ids(tmp_path):
    _, _, cells = _two_cells()
    cells = (cells * 7).astype(np.uint16)  # ids 7 and 14, as CellProfiler numbered them
    nuclei = np.zeros(SHAPE, np.uint16)
    nuclei[15:25, 10:20] = 2  # nuclei numbered otherwise: they take their cell's id
    nuclei[15:25, 44:54] = 1
    files = {"B02_s1_ER_Cells.png": cells, "B02_s1_DNA_Nuclei.png": nuclei}
    pattern, folder = _plate_with(tmp_path / "P1", files)
    with pytest.warns(PlateWarning, match=r"no cell labels for 1 of 2 site\(s\): P1 C03 site 1"):
        plate = open_plate(tmp_path / "P1", pattern=pattern, labels=folder)
    site = plate[("P1", "B02", 1)]
    assert np.array_equal(site.read_labels(), cells.astype(np.int32))
    expected = np.where(nuclei > 0, cells, 0)
    assert np.array_equal(site.read_nuclei(), expected)
    assert plate[("P1", "C03", 1)].labels_path is None


def test_cellpose_seg_npy_and_masks(tmp_path):
    _, _, cells = _two_cells()
    masks = cells.astype(np.uint16)
    nuclei = np.zeros(SHAPE, np.uint16)
    nuclei[15:25, 44:54] = 1  # Cellpose numbers each run from 1
    seg = {"masks": masks, "outlines": np.zeros_like(masks), "filename": "B02_s1_ER.tif"}
    flows = np.full(SHAPE, 3, np.uint8)
    files = {
        "B02_s1_ER_seg.npy": seg,  # the GUI's file: a pickled dict
        "B02_s1_DNA_seg.npy": {"masks": nuclei},  # Cellpose run on the DNA image: nuclei
        "C03_s1_ER_cp_masks.png": masks,  # the command line's --save_png
        "C03_s1_ER_flows.tif": flows,  # not labels
    }
    pattern, folder = _plate_with(tmp_path / "P1", files)
    plate = open_plate(tmp_path / "P1", pattern=pattern, labels=folder)
    assert plate.warnings == []
    b02, c03 = plate[("P1", "B02", 1)], plate[("P1", "C03", 1)]
    assert b02.labels_path.name == "B02_s1_ER_seg.npy"
    assert b02.nuclei_path.name == "B02_s1_DNA_seg.npy"
    assert np.array_equal(b02.read_labels(), cells)
    assert np.array_equal(b02.read_nuclei(), np.where(nuclei > 0, 2, 0))
    assert c03.labels_path.name == "C03_s1_ER_cp_masks.png" and c03.nuclei_path is None
    assert np.array_equal(c03.read_labels(), cells)


def test_two_files_for_one_role_take_the_image_and_say_so(tmp_path):
    _, _, cells = _two_cells()
    files = {
        "B02_s1_ER_seg.npy": {"masks": cells.astype(np.uint16)},
        "B02_s1_ER_cp_masks.tif": cells.astype(np.uint16),
        "C03_s1_ER_cp_masks.tif": cells.astype(np.uint16),
    }
    pattern, folder = _plate_with(tmp_path / "P1", files)
    with pytest.warns(PlateWarning, match=r"P1 B02 site 1: 2 files hold cells; using "):
        plate = open_plate(tmp_path / "P1", pattern=pattern, labels=folder)
    assert plate[("P1", "B02", 1)].labels_path.name == "B02_s1_ER_cp_masks.tif"


def test_label_images_by_a_pattern_round_trip(tmp_path, weights, capsys):
    _, _, cells = _two_cells()
    other = np.where(cells == 2, 5, 0).astype(np.uint16)
    nuclei = np.zeros(SHAPE, np.uint16)
    nuclei[15:25, 10:20] = 9
    files = {
        "B02-1-objects.png": cells.astype(np.uint16),
        "B02-1-nuclei.png": nuclei,
        "C03-1-objects.png": other,
        "notes-1-objects.png": other,  # not a well: not matched
    }
    pattern, folder = _plate_with(tmp_path / "P1", files)
    spec = f"{folder}/{{well}}-{{site}}-*.png"
    plate = open_plate(tmp_path / "P1", pattern=pattern, labels=spec)
    assert plate.warnings == [] and plate.source["labels"] == spec
    assert np.array_equal(plate[("P1", "B02", 1)].read_labels(), cells)
    assert np.array_equal(plate[("P1", "B02", 1)].read_nuclei(), np.where(nuclei > 0, 1, 0))
    assert np.array_equal(plate[("P1", "C03", 1)].read_labels(), other)
    capsys.readouterr()
    assert main(["info", str(tmp_path / "P1"), "--pattern", pattern, "--labels", spec]) == 0
    assert f"2 of 2 sites carry cell labels (label folder {folder})" in capsys.readouterr().out
    again = open_plate(**plate.source)  # the recorded options find the same files
    assert {k: s.labels_path for k, s in again.sites.items()} == {
        k: s.labels_path for k, s in plate.sites.items()
    }
    # Embedding pools over exactly these labels (given as the settings' label folder).
    bare = open_plate(tmp_path / "P1", pattern=pattern)
    store = embed_plate(
        bare, EmbedSettings(model=str(weights), labels=spec, cells="file"), tmp_path / "store"
    )
    assert np.array_equal(store.site_labels(SiteKey("P1", "B02", 1)), cells)
    assert np.array_equal(store.site_labels(SiteKey("P1", "C03", 1)), other)
    assert store.tokens("cell").shape[0] == 3


def test_user_label_errors_name_the_file(tmp_path):
    _, _, cells = _two_cells()
    files = {
        "B02_s1_ER_cp_masks.tif": cells[:40].astype(np.uint16),  # not the site's shape
        "C03_s1_ER_cp_masks.tif": cells.astype(np.float32) + 0.5,  # not labels
    }
    pattern, folder = _plate_with(tmp_path / "P1", files)
    plate = open_plate(tmp_path / "P1", pattern=pattern, labels=folder)
    with pytest.raises(PlateError, match=r"B02_s1_ER_cp_masks\.tif has shape \(40, 64\) but the"):
        embed_plate(plate, EmbedSettings(cells="file"), tmp_path / "store")
    with pytest.raises(PlateError, match=r"C03_s1_ER_cp_masks\.tif holds non-integer values"):
        plate[("P1", "C03", 1)].read_labels()
    (folder / "B02_s1_ER_seg.npy").write_bytes(b"not an array")
    with pytest.raises(PlateError, match=r"cannot read label image .*B02_s1_ER_seg\.npy"):
        from napari_concept_discovery.plate.label_images import read_label_image

        read_label_image(folder / "B02_s1_ER_seg.npy")
    # A folder with labels for no site says which names it looked for.
    with pytest.raises(PlateError, match=r"no cell labels for any site .*_MaskCells.tiff"):
        empty = tmp_path / "elsewhere"
        empty.mkdir()
        tifffile.imwrite(empty / "B02_s1_DNA.tif", cells.astype(np.uint16))  # an image, no suffix
        open_plate(tmp_path / "P1", pattern=pattern, labels=empty)
    # A site without labels, when only files may give cells, is named.
    (folder / "C03_s1_ER_cp_masks.tif").unlink()
    with pytest.warns(PlateWarning, match=r"no cell labels for 1 of 2 site\(s\): P1 C03 site 1"):
        plate = open_plate(tmp_path / "P1", pattern=pattern, labels=folder)
    with pytest.raises(PlateError, match=r"P1 C03 site 1: no label image"):
        site_inputs(plate[("P1", "C03", 1)], cells="file")


def test_cellpose_masks_beside_the_images(tmp_path):
    """Cellpose writes its files next to the images: the plate folder is its own label
    folder, and the masks are neither channels nor stray images."""
    root = tmp_path / "P1"
    root.mkdir()
    pattern = _pattern_plate(root)
    _, _, cells = _two_cells()
    tifffile.imwrite(root / "B02_s1_ER_cp_masks.tif", cells.astype(np.uint16))
    tifffile.imwrite(root / "C03_s1_ER_cp_masks.tif", cells.astype(np.uint16))
    plate = open_plate(root, pattern=pattern, labels=root)
    assert plate.channel_names == ("DNA", "ER") and plate.warnings == []
    assert all(np.array_equal(s.read_labels(), cells) for s in plate)


def test_nf1_cellprofiler_masks_as_the_cells(real_data):
    """The NF1 plate with CellProfiler's binary masks as its label folder: each site's cells
    cover MaskCells exactly, one cell per nucleus inside it (touching cells are one piece of
    the mask, so only the nuclei can split them)."""
    from skimage import measure

    nf1 = real_data / "nf1_plate2"
    plate = open_plate(
        nf1 / "images",
        pattern="{well}_01_{channel_index}_{site}_{channel}_001.tif",
        labels=nf1 / "masks",
    )
    assert plate.warnings == []
    for site in plate:
        assert site.labels_path.name.endswith("_MaskCells.tiff")
        assert site.nuclei_path.name.endswith("_MaskNuclei.tiff")
        mask = tifffile.imread(site.labels_path) > 0
        nuclei = measure.label(tifffile.imread(site.nuclei_path) > 0)
        inside = np.unique(nuclei[mask])
        cells, nuc = site.read_labels(), site.read_nuclei()
        assert np.array_equal(cells > 0, mask)
        assert np.unique(cells[cells > 0]).size == inside[inside > 0].size
        assert measure.label(mask).max() < inside[inside > 0].size  # the mask alone merges
        assert np.array_equal(np.unique(nuc[nuc > 0]), np.unique(cells[cells > 0]))


def test_an_image_name_shared_by_sites_names_none(tmp_path):
    """OME-Zarr fields are all called "0": a file named after "0" belongs to no one site."""
    from types import SimpleNamespace

    from napari_concept_discovery.plate.label_files import find_user_labels

    sites = {
        SiteKey("P", well, 1): SimpleNamespace(
            paths=(tmp_path / well / "0",), channel_names=("DNA",)
        )
        for well in ("B02", "C03")
    }
    sites[SiteKey("P", "D04", 1)] = SimpleNamespace(
        paths=(tmp_path / "D04" / "d4",), channel_names=("DNA",)
    )
    for name in ("0_cp_masks.tif", "d4_cp_masks.tif"):
        tifffile.imwrite(tmp_path / name, np.ones((4, 4), np.uint16))
    found, notes = find_user_labels(tmp_path, sites)
    assert found == {SiteKey("P", "D04", 1): {"nuclei": tmp_path / "d4_cp_masks.tif"}}
    assert notes == []
