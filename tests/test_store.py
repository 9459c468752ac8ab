"""Activation store: reuse on a matching signature, rebuild when stale, resume when interrupted."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from napari_concept_discovery.embed import embed_plate
from napari_concept_discovery.errors import StoreError
from napari_concept_discovery.models import ChannelAgnosticBackend, ChannelAgnosticViT
from napari_concept_discovery.plate import open_plate
from napari_concept_discovery.store import ActivationStore

torch.set_num_threads(2)


class Counter:
    """Counts tiles through the real model with a forward hook (observes, replaces nothing)."""

    def __init__(self, backend):
        self.tiles = 0
        backend.model.blocks[0].register_forward_hook(self._hook)

    def _hook(self, module, inp, out):
        self.tiles += inp[0].shape[0]


def _backend(seed=0):
    torch.manual_seed(seed)
    m = ChannelAgnosticViT(embed_dim=32, depth=2, num_heads=2, max_channels=6)
    return ChannelAgnosticBackend(m, model_id="tiny", weights_hash=f"seed{seed}")


@pytest.fixture()
def plate_copy(small_plates, tmp_path):
    dst = tmp_path / "plate"
    shutil.copytree(small_plates, dst)
    return dst


def test_store_contents_and_read_api(plate_copy, tmp_path):
    plate = open_plate(plate_copy)
    store = embed_plate(plate, _backend(), tmp_path / "store", batch_size=4)
    again = ActivationStore.open(tmp_path / "store")
    assert (again.model_id, again.block, again.embed_dim) == ("tiny", 1, 32)
    assert again.channel_names == plate.channel_names
    cells, table = again.tokens("cell"), again.table("cell")
    assert cells.shape[0] == len(table) > 0 and cells.shape[1] == 32
    for col in (
        "plate",
        "well",
        "site",
        "label",
        "centroid_y",
        "centroid_x",
        "area",
        "cell_type",
        "perturbation",
        "well_type",
    ):
        assert col in table.columns
    assert table.cell_type.notna().all()
    patches, ptable = again.tokens("patch"), again.table("patch")
    assert patches.dtype == np.float16 and len(ptable) == patches.shape[0] == 16 * 16 * len(plate)
    crops = again.table("crop")
    assert {"row", "col"} <= set(crops.columns) and len(crops) == len(plate)
    key = list(plate.sites)[3]
    grid = again.patch_grid(key)
    assert grid.shape == (16, 16, 32) and grid.dtype == np.float16
    rows = ptable[
        (ptable.plate == key.plate) & (ptable.well == key.well) & (ptable.site == key.site)
    ]
    assert np.array_equal(np.asarray(patches[rows.index.to_numpy()]).reshape(16, 16, 32), grid)
    # A cell token is a weighted mean of its site's patch tokens: within their range.
    first = table[(table.well == key.well) & (table.plate == key.plate)].index[0]
    assert np.all(np.asarray(cells[first]) <= grid.astype(np.float32).max((0, 1)) + 1e-2)
    assert store.signature == again.signature


def test_reuse_rebuild_resume(plate_copy, tmp_path):
    out = tmp_path / "store"
    backend = _backend()
    count = Counter(backend)
    plate = open_plate(plate_copy)
    n = len(plate)
    first = embed_plate(plate, backend, out, batch_size=4)
    assert count.tiles == n and not first.reused
    ref = np.asarray(first.tokens("cell"))

    # Reuse: same data, model, block, settings -> nothing is embedded.
    second = embed_plate(open_plate(plate_copy), backend, out, batch_size=4)
    assert count.tiles == n and second.reused
    assert np.array_equal(np.asarray(second.tokens("cell")), ref)

    # Another block or other weights -> stale -> rebuilt.
    third = embed_plate(open_plate(plate_copy), backend, out, block=0, batch_size=4)
    assert count.tiles == 2 * n and not third.reused and third.block == 0

    # Changed image bytes (same name, same size) -> stale -> rebuilt, never trusted.
    site = next(iter(open_plate(plate_copy)))
    path = site.paths[0]
    import imageio.v3 as iio

    img = iio.imread(path)
    img[:32, :32] = 255 - img[:32, :32]
    iio.imwrite(path, img)
    fourth = embed_plate(open_plate(plate_copy), backend, out, block=0, batch_size=4)
    assert count.tiles == 3 * n and not fourth.reused
    assert fourth.signature["data"] != third.signature["data"]

    # Resume: interrupt after 5 sites, the store is unfinished, the next run does the rest.
    out2 = tmp_path / "store2"
    done = []
    stopped = embed_plate(
        open_plate(plate_copy),
        backend,
        out2,
        block=0,
        batch_size=1,
        progress=done.append,
        cancel=lambda: len(done) >= 5,
    )
    assert stopped is None and sum(done) == 5
    with pytest.raises(StoreError, match="unfinished"):
        ActivationStore.open(out2)
    before = count.tiles
    resumed = embed_plate(open_plate(plate_copy), backend, out2, block=0, batch_size=1)
    assert count.tiles - before == n - 5
    assert np.allclose(
        np.asarray(resumed.tokens("cell")), np.asarray(fourth.tokens("cell")), atol=1e-6
    )
    assert resumed.table("cell").equals(fourth.table("cell"))


def test_foreign_folder_is_refused(plate_copy, tmp_path):
    out = tmp_path / "not_a_store"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not an activation store"):
        embed_plate(open_plate(plate_copy), _backend(), out)
    assert (out / "precious.txt").read_text() == "keep me"
