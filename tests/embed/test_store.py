"""Activation store: per-site rows and labels, reuse/rebuild/resume, sources to embed again."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pandas as pd
import pytest
import torch
import zarr

from helpers import TileCounter
from napari_concept_discovery.embed.compute import embed_site, pool_cells
from napari_concept_discovery.embed.plate import (
    EmbedSettings,
    embed_plate,
    embed_store_site,
    reload_model,
    reopen_plate,
)
from napari_concept_discovery.embed.store import UNITS, ActivationStore
from napari_concept_discovery.errors import StoreError
from napari_concept_discovery.models import ChannelAgnosticBackend, ChannelAgnosticViT
from napari_concept_discovery.plate import SiteKey, open_plate
from napari_concept_discovery.progress import Progress

torch.set_num_threads(2)


def _backend(seed=0):
    torch.manual_seed(seed)
    m = ChannelAgnosticViT(embed_dim=32, depth=2, num_heads=2, max_channels=6)
    return ChannelAgnosticBackend(m, model_id="tiny", weights_hash=f"seed{seed}")


def _keys(sites: pd.DataFrame) -> list[SiteKey]:
    return [SiteKey(*k) for k in zip(sites.plate, sites.well, sites.site, strict=True)]


@pytest.fixture()
def plate_copy(small_plates, tmp_path):
    dst = tmp_path / "plate"
    shutil.copytree(small_plates, dst)
    return dst


@pytest.fixture(scope="module")
def built(small_plates, tmp_path_factory):
    """A store of small_plates with the plate's own labels, built once for the read tests."""
    plate = open_plate(small_plates)
    out = tmp_path_factory.mktemp("built") / "store"
    store = embed_plate(plate, EmbedSettings(batch_size=4), out, backend=_backend())
    return plate, store


def test_store_contents_and_read_api(built):
    plate, store = built
    again = ActivationStore.open(store.path)
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
    assert store.signature == again.signature
    assert again.embed_settings["batch_size"] == 4 and again.embed_settings["block"] == 1
    assert again.plate_source["path"] == str(plate.root.resolve())


def test_sites_and_site_rows_match_the_tables(built):
    plate, store = built
    sites = store.sites()
    assert _keys(sites) == list(plate.sites)
    assert (sites.height == 256).all() and (sites.width == 256).all()
    assert (sites.rows == 16).all() and (sites.cols == 16).all()
    assert (sites.cells == "file").all() and sites.labels.all()
    for unit in UNITS:
        table = store.table(unit)
        assert sites[f"{unit}_count"].sum() == len(table) == store.tokens(unit).shape[0]
        for key in plate.sites:
            rows = store.site_rows(unit, key)
            hit = np.flatnonzero(
                (table.plate == key.plate) & (table.well == key.well) & (table.site == key.site)
            )
            assert hit.tolist() == list(range(rows.start, rows.stop))
    key = list(plate.sites)[5]
    as_tuple = (key.plate, key.well.replace("0", "", 1), str(key.site))  # "B02" -> "B2"
    assert store.site_rows("cell", as_tuple) == store.site_rows("cell", key)
    assert key in store and ("NOPE", "A01", 1) not in store
    with pytest.raises(StoreError, match="not in the store"):
        store.site_rows("cell", ("NOPE", "A01", 1))
    with pytest.raises(StoreError, match="unknown token unit"):
        store.site_rows("nucleus", key)


def test_labels_kept_and_cell_tokens_recomputed_from_them(built):
    plate, store = built
    for key, site in plate.sites.items():
        labels = store.site_labels(key)
        assert labels.dtype == np.int32
        assert np.array_equal(labels, site.read_labels())
        # Every stored cell token maps back to its pixels: pooling the stored patch grid over
        # the stored labels gives the stored cell tokens (up to the grid's float16 rounding).
        grid = store.patch_grid(key).astype(np.float32)
        tokens, table, _ = pool_cells(labels, grid.reshape(-1, 32), 16, 16, 16)
        rows = store.site_rows("cell", key)
        stored = store.site_tokens("cell", key)
        assert table.label.tolist() == store.table("cell").label[rows].tolist()
        scale = np.abs(stored).max()
        assert np.abs(tokens - stored).max() <= 2e-3 * scale
    # Compressed on disk: far smaller than the raw int32 images.
    labels_dir = store.path / "labels"
    size = sum(f.stat().st_size for f in labels_dir.rglob("*") if f.is_file())
    assert size < 0.25 * len(plate) * 256 * 256 * 4


def test_reuse_rebuild_resume(plate_copy, tmp_path):
    out = tmp_path / "store"
    backend = _backend()
    count = TileCounter(backend)
    plate = open_plate(plate_copy)
    n = len(plate)
    # fp32: the Counter's hook sits on this module; bf16 would run a converted copy of it
    settings = EmbedSettings(batch_size=4, precision="fp32")
    seen: list[Progress] = []
    first = embed_plate(plate, settings, out, backend=backend, progress=seen.append)
    assert count.tiles == n and not first.reused
    assert seen[0] == Progress("embed", 0, n, {}) and seen[-1].done == n
    assert [p.info["site"] for p in seen[1:]] == [str(k) for k in plate.sites]
    ref = np.asarray(first.tokens("cell"))

    # Reuse: same data, model, block, settings -> nothing is embedded.
    seen.clear()
    second = embed_plate(
        open_plate(plate_copy), settings, out, backend=backend, progress=seen.append
    )
    assert count.tiles == n and second.reused and seen == [Progress("embed", n, n, {})]
    assert np.array_equal(np.asarray(second.tokens("cell")), ref)

    # Another block -> another store: refused, unless overwrite, then replaced whole.
    block0 = settings.replace(block=0)
    with pytest.raises(StoreError, match="block differ.*--overwrite"):
        embed_plate(open_plate(plate_copy), block0, out, backend=backend)
    assert count.tiles == n and ActivationStore.open(out).block == 1
    third = embed_plate(open_plate(plate_copy), block0, out, backend=backend, overwrite=True)
    assert count.tiles == 2 * n and not third.reused and third.block == 0

    # Changed image bytes (same name, same size) -> stale -> rebuilt, never trusted.
    site = next(iter(open_plate(plate_copy)))
    path = site.paths[0]
    import imageio.v3 as iio

    img = iio.imread(path)
    img[:32, :32] = 255 - img[:32, :32]
    iio.imwrite(path, img)
    fourth = embed_plate(open_plate(plate_copy), block0, out, backend=backend)
    assert count.tiles == 3 * n and not fourth.reused
    assert fourth.signature["data"] != third.signature["data"]

    # Resume: cancel (a threading.Event) after 5 sites; the store is unfinished, the next run
    # embeds only the rest and gives the same store.
    out2 = tmp_path / "store2"
    stop = threading.Event()

    def progress(p: Progress) -> None:
        if p.done >= 5:
            stop.set()

    one = block0.replace(batch_size=1)
    stopped = embed_plate(
        open_plate(plate_copy), one, out2, backend=backend, progress=progress, cancel=stop
    )
    assert stopped is None
    with pytest.raises(StoreError, match="unfinished"):
        ActivationStore.open(out2)
    before = count.tiles
    resumed = embed_plate(open_plate(plate_copy), one, out2, backend=backend)
    assert count.tiles - before == n - 5
    assert np.allclose(
        np.asarray(resumed.tokens("cell")), np.asarray(fourth.tokens("cell")), atol=1e-6
    )
    assert resumed.table("cell").equals(fourth.table("cell"))
    pd.testing.assert_frame_equal(resumed.sites(), fourth.sites())
    for key in list(plate.sites)[:6]:
        assert np.array_equal(resumed.site_labels(key), fourth.site_labels(key))


def test_settings_are_required_and_progress_has_one_shape(plate_copy, tmp_path):
    backend = _backend()
    seen = []
    store = embed_plate(
        plate_copy,
        EmbedSettings(block=0, batch_size=4),
        tmp_path / "s",
        backend=backend,
        progress=seen.append,
    )
    n = len(store.sites())
    assert [p.done for p in seen] == list(range(n + 1)) and {p.total for p in seen} == {n}
    assert {p.stage for p in seen} == {"embed"}
    with pytest.raises(TypeError, match="EmbedSettings"):
        embed_plate(plate_copy, backend, tmp_path / "x")


def test_without_cells_no_labels_are_kept(plate_copy, tmp_path):
    store = embed_plate(
        plate_copy, EmbedSettings(cells="none"), tmp_path / "store", backend=_backend()
    )
    sites = store.sites()
    assert (sites.cells == "none").all() and not sites.labels.any()
    assert store.tokens("cell").shape[0] == 0 and (sites.cell_count == 0).all()
    key = SiteKey(*sites.iloc[0][["plate", "well", "site"]])
    assert not store.has_site_labels(key)
    with pytest.raises(StoreError, match="no cell labels"):
        store.site_labels(key)


def test_sources_reopen_the_plate_and_reload_the_model(plate_copy, tmp_path):
    from safetensors.torch import save_file

    from napari_concept_discovery.models import load_model

    weights = tmp_path / "tiny.safetensors"
    state = _backend(seed=3).model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, weights)
    backend = load_model(weights, "cpu")
    store = embed_plate(
        plate_copy, EmbedSettings(batch_size=4), tmp_path / "store", backend=backend
    )
    assert store.model_source == str(weights)

    again = ActivationStore.open(store.path)
    plate = reopen_plate(again)
    assert list(plate.sites) == _keys(again.sites())
    model = reload_model(again)
    assert model.weights_hash == again.weights_hash and model.source == str(weights)

    # A site of the store, embedded again on demand, gives its stored tokens.
    key = list(plate.sites)[2]
    st = embed_store_site(again, key, backend=model)
    assert np.array_equal(st.labels, again.site_labels(key))
    assert np.allclose(
        st.patch_grid,
        again.patch_grid(key).astype(np.float32),
        atol=2e-3 * np.abs(st.patch_grid).max(),
    )
    assert np.allclose(st.cell_tokens, again.site_tokens("cell", key), atol=1e-5)

    # A site the store does not hold: a new well appears in the plate folder.
    src = plate[key]
    new_key = SiteKey(key.plate, "H12", 1)
    for p in src.paths:
        shutil.copy(p, p.with_name(p.name.replace(f"{key.well}_s{key.site}", "H12_s1")))
    lab = src.labels_path
    shutil.copy(lab, lab.with_name(lab.name.replace(f"{key.well}_s{key.site}", "H12_s1")))
    assert new_key not in again
    fresh = embed_store_site(again, new_key)
    direct = embed_site(
        src.read(), backend, again.block, src.read_labels(), precision=again.precision
    )
    assert np.array_equal(fresh.patch_grid, direct.patch_grid)
    assert np.array_equal(fresh.cell_tokens, direct.cell_tokens)

    # Another model is refused by name.
    with pytest.raises(StoreError, match="is not the model of the store"):
        embed_store_site(again, key, backend=_backend(seed=9))


def test_old_format_and_foreign_folders_are_refused(built, plate_copy, tmp_path):
    _, store = built
    old = tmp_path / "old"
    shutil.copytree(store.path, old)
    root = zarr.open_group(str(old), mode="a")
    root.attrs.update({"store_format": 1})
    with pytest.raises(StoreError, match="format 1"):
        ActivationStore.open(old)

    out = tmp_path / "not_a_store"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not an activation store"):
        embed_plate(open_plate(plate_copy), EmbedSettings(), out, backend=_backend())
    assert (out / "precious.txt").read_text() == "keep me"


def test_precision_is_signed_and_never_mixed(plate_copy, tmp_path):
    """A store records its forward pass's precision; tokens of another precision are refused
    (naming it) instead of joining or replacing it, and auto resolves as documented."""
    from napari_concept_discovery.embed.compute import cpu_has_bf16, resolve_precision

    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_has_bf16() else "fp32")
    assert resolve_precision("fp32", "cpu") == "fp32"
    backend = _backend()
    out = tmp_path / "store"
    first = embed_plate(
        open_plate(plate_copy), EmbedSettings(precision="fp32"), out, backend=backend
    )
    assert first.precision == "fp32" and first.embed_settings["precision"] == "fp32"
    # fp32 stores sign as before precision was recorded: those stay reusable
    assert "precision" not in first.signature
    with pytest.raises(StoreError, match=r"precision differ.*--precision fp32.*makes int8"):
        embed_plate(open_plate(plate_copy), EmbedSettings(precision="int8"), out, backend=backend)
    assert ActivationStore.open(out).precision == "fp32"
    again = embed_plate(
        open_plate(plate_copy), EmbedSettings(precision="fp32"), out, backend=backend
    )
    assert again.reused

    other = embed_plate(
        open_plate(plate_copy), EmbedSettings(precision="int8"), tmp_path / "s8", backend=backend
    )
    assert other.precision == "int8" and other.signature["precision"] == "int8"
    assert not np.array_equal(np.asarray(other.tokens("cell")), np.asarray(first.tokens("cell")))
