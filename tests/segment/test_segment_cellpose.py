"""Cellpose end to end with a model that cellpose itself builds, without pretrained weights.

No network here, so no Cellpose weights: the model is Cellpose's own network (``CPSAM``) as
cellpose initialises it, saved to a file and given as ``--cellpose-model FILE``, the path a
user with their own model takes. Its masks are noise, so these tests check the plumbing (the
file loads, masks come back as int32 labels of the image's shape, cell and nucleus ids are
matched, progress is reported, the choice reaches embedding and the Embed widget), not the
quality, which is only measured where weights exist. Under CI the package must be installed
(it comes with the ``test`` extra); elsewhere these tests skip without it.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import tifffile

from napari_concept_discovery.cli import main
from napari_concept_discovery.embed.plate import store_settings
from napari_concept_discovery.plate.labels import label_paths
from napari_concept_discovery.settings import SEGMENT_ALGORITHM, SegmentSettings
from napari_concept_discovery.synth import write_synthetic_plates

if importlib.util.find_spec("cellpose") is None:
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(
            "cellpose is not installed but CI is set: install the test extra "
            "(pip install -e '.[test]'), which brings cellpose",
            pytrace=False,
        )
    pytest.skip("cellpose is not installed", allow_module_level=True)

#: Cellpose's thresholds at which its untrained network's noise still makes masks.
NOISE = ["--cellpose-cellprob", "-6", "--cellpose-flow", "0"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """Cellpose's network as cellpose builds it (seeded), saved as a model file (1.2 GB)."""
    import torch
    from cellpose.vit import CPSAM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cellpose") / "untrained_cpsam.pt"
    CPSAM(dtype=torch.float32).save_model(str(path))
    yield path
    path.unlink(missing_ok=True)  # pytest keeps its temporary folders; not this file


@pytest.fixture(scope="module")
def plate(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp_plate")
    write_synthetic_plates(out, n_plates=1, n_wells=1, n_sites=2, size=160, seed=3)
    return next(p for p in out.iterdir() if p.is_dir())


def _matched(nuclei: np.ndarray, cells: np.ndarray) -> None:
    """Nucleus k lies in cell k, and every cell has its nucleus."""
    assert nuclei.dtype == cells.dtype == np.int32
    assert set(np.unique(nuclei)) == set(np.unique(cells))
    inside = nuclei > 0
    assert np.array_equal(nuclei[inside], cells[inside])


def test_segment_cli_runs_a_cellpose_model_file(model_file, plate, tmp_path, capsys):
    from napari_concept_discovery.plate import open_plate

    out = tmp_path / "labels"
    argv = ["segment", str(plate), "--out", str(out), "--segmenter", "cellpose"]
    argv += ["--cellpose-model", str(model_file), "--cellpose-nuclei", str(model_file), *NOISE]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "2/2" in err  # progress per site, on stderr
    opened = open_plate(plate)
    total = 0
    for site in opened:
        cells_path, nuclei_path = label_paths(out, site.key)
        cells, nuclei = tifffile.imread(cells_path), tifffile.imread(nuclei_path)
        assert cells.shape == nuclei.shape == site.read().shape[-2:]
        _matched(nuclei.astype(np.int32), cells.astype(np.int32))
        total += int(cells.max())
    assert total > 0  # the untrained network's noise does give masks at these thresholds


def test_a_missing_model_file_is_one_line_naming_it(plate, tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    argv = ["segment", str(plate), "--out", str(tmp_path / "l"), "--segmenter", "cellpose"]
    assert main([*argv, "--cellpose-model", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"Cellpose model file not found: {missing}" in err[0]


def test_embedding_segments_with_cellpose_and_loads_the_model_once(model_file, plate):
    """EmbedSettings(segmenter="cellpose"): the sites' labels come from the model file, loaded
    once for the plate; the site signature says how they were made."""
    from napari_concept_discovery.embed import plate as pe
    from napari_concept_discovery.plate import open_plate

    opened = open_plate(plate)
    settings = pe.EmbedSettings(
        cells="segment",
        segment=SegmentSettings(segmenter="cellpose", cellpose_model=str(model_file)),
    )
    inputs = pe.plate_inputs(opened, settings)
    pe._segmenter.cache_clear()
    try:
        for key, site in opened.sites.items():
            how = inputs[key]
            assert how.token == f"segment:DNA:cellpose:{model_file}"
            labels = how.read_labels(site.read(), site.channel_names)
            assert labels.dtype == np.int32 and labels.shape == site.read().shape[-2:]
        info = pe._segmenter.cache_info()
        assert (info.misses, info.hits) == (1, len(opened) - 1)
    finally:
        pe._segmenter.cache_clear()  # let the 1.2 GB model go
    classical = pe.plate_inputs(opened, pe.EmbedSettings(cells="segment"))
    assert all(h.token == f"segment:DNA:{SEGMENT_ALGORITHM}" for h in classical.values())


def test_embed_widget_offers_cellpose_and_embeds_with_it(
    make_napari_viewer, model_file, plate, tmp_path, qtbot
):
    """The Embed widget's segmenter choice, driven as a user would: Cellpose's model field is
    usable only with Cellpose; embedding the site in view segments it with the model file."""
    import torch
    from qtpy.QtCore import Qt
    from safetensors.torch import save_file

    from napari_concept_discovery.models.vit import ChannelAgnosticViT
    from napari_concept_discovery.widgets import open_viewer

    torch.manual_seed(0)
    vit = ChannelAgnosticViT(embed_dim=32, depth=2, num_heads=2, max_channels=6)
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(weights))
    viewer = make_napari_viewer()
    embed = open_viewer(plate, viewer=viewer).embed
    fields = embed.fields
    assert not fields["cellpose_model"].widget.isEnabled()  # classical by default
    fields["segmenter"].widget.setCurrentText("cellpose")
    assert fields["cellpose_model"].widget.isEnabled()
    fields["cellpose_model"].widget.setText(str(model_file))
    fields["cells"].widget.setCurrentText("segment")
    embed.set_model(str(weights))
    embed.site_in_view.setChecked(True)
    embed.out_edit.setText(str(tmp_path / "store.zarr"))
    settings = embed.settings()
    assert (settings.segment.segmenter, settings.segment.cellpose_model) == (
        "cellpose",
        str(model_file),
    )
    assert settings.cells == "segment"
    qtbot.mouseClick(embed.run_button, Qt.MouseButton.LeftButton)
    session = embed.session
    qtbot.waitUntil(lambda: session.store is not None and not embed.jobs.busy, timeout=120000)
    assert session.store.embed_settings["segment"]["segmenter"] == "cellpose"
    recorded = store_settings(session.store).segment
    assert (recorded.segmenter, recorded.cellpose_model) == ("cellpose", str(model_file))
    assert "Done:" in embed.status.text(), embed.status.text()
    from napari_concept_discovery.embed.plate import _segmenter

    _segmenter.cache_clear()  # let the 1.2 GB model go
