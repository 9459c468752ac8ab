"""The explore API against what `analyze` writes for the same store and dictionary."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from napari_concept_discovery.analysis.analyze import analyze_store
from napari_concept_discovery.analysis.explore import Explorer
from napari_concept_discovery.dictionary.pipeline import train_on_store
from napari_concept_discovery.dictionary.settings import (
    AnalyzeSettings,
    WhitenSettings,
)
from napari_concept_discovery.embed.store import ActivationStore
from napari_concept_discovery.errors import DictionaryError, StoreError
from napari_concept_discovery.plate.model import SiteKey


@pytest.fixture(scope="module")
def explored(tiny_store_path, tmp_path_factory, small_train):
    """A per-plate whitened ICFL dictionary and `analyze`'s cell and patch codes for it."""
    store = ActivationStore.open(tiny_store_path)
    settings = small_train(
        atoms=32,
        steps=40,
        whiten=WhitenSettings(controls="well_type=negative_control", by="plate", mode="center"),
    )
    out = tmp_path_factory.mktemp("explore")
    trained = train_on_store(store, settings, out=out / "dict.safetensors")
    from napari_concept_discovery.dictionary import load_dictionary

    dictionary = load_dictionary(trained.path)
    analyses = {}
    for unit in ("cell", "patch"):
        a = analyze_store(store, dictionary, AnalyzeSettings(unit=unit), out / f"an-{unit}")
        codes = pd.read_parquet(a.paths["codes"])
        tokens = pd.read_parquet(a.paths["tokens"])
        n = len(tokens)
        csr = sp.csr_matrix(
            (codes["code"], (codes["token"], codes["feature"])), shape=(n, dictionary.n_atoms)
        )
        analyses[unit] = (csr, tokens)
    return store, dictionary, Explorer(store, dictionary, max_sites=2), analyses


def _site_rows(table: pd.DataFrame, key: SiteKey) -> np.ndarray:
    hit = (table.plate == key.plate) & (table.well == key.well) & (table.site == key.site)
    return np.flatnonzero(hit.to_numpy())


def _busy_feature(codes: sp.csr_matrix) -> int:
    counts = np.bincount(codes.indices, minlength=codes.shape[1])
    return int(np.argmax(counts))


def test_site_codes_equal_analyze(explored):
    store, _, ex, analyses = explored
    cell_codes, cell_table = analyses["cell"]
    patch_codes, patch_table = analyses["patch"]
    assert len(ex.keys()) == len(store.sites()) >= 2
    for key in ex.keys():
        sc = ex.site(key)
        rows = _site_rows(cell_table, key)
        np.testing.assert_array_equal(sc.cells["label"], cell_table.label.to_numpy()[rows])
        # equal to float32 precision: batches of another size go through another BLAS kernel
        # (another order of sums) in the whitening, and the least-squares fit of the codes
        # carries that rounding on; a changed support would differ by far more
        np.testing.assert_allclose(
            sc.cell_codes.toarray(), cell_codes[rows].toarray(), rtol=1e-4, atol=1e-6
        )
        prow = _site_rows(patch_table, key)
        assert sc.grid[0] * sc.grid[1] == len(prow)
        np.testing.assert_allclose(
            sc.patch_codes.toarray(), patch_codes[prow].toarray(), rtol=1e-4, atol=1e-6
        )
    # the LRU cache keeps at most max_sites sites
    assert len(ex._sites) == 2


def test_activation_map_geometry_and_values(explored):
    _, _, ex, analyses = explored
    patch_codes, patch_table = analyses["patch"]
    f = _busy_feature(patch_codes)
    key = ex.keys()[0]
    amap = ex.activation_map(key, f)
    rows = _site_rows(patch_table, key)
    grid = (int(patch_table.row.iloc[rows].max()) + 1, int(patch_table.col.iloc[rows].max()) + 1)
    assert amap.data.shape == grid
    np.testing.assert_allclose(
        amap.data.ravel(), patch_codes[rows][:, f].toarray().ravel(), atol=1e-6
    )
    p = ex.patch_size
    assert amap.scale == (p, p)
    assert amap.translate == ((p - 1) / 2, (p - 1) / 2)
    # pixel (y, x) lies in patch (y // p, x // p): its centre is that patch's centre in layer space
    r, c = 1, 2
    centre = np.array(amap.translate) + np.array(amap.scale) * (r, c)
    assert (centre // p == (r, c)).all()
    up = amap.upsampled((grid[0] * p - 3, grid[1] * p - 5))
    assert up.shape == (grid[0] * p - 3, grid[1] * p - 5)
    assert up[r * p + 7, c * p] == amap.data[r, c]
    lo, hi = ex.feature_limits(f)
    assert lo == 0.0 and hi > 0
    assert ex.feature_limits(f) == (lo, hi)  # fixed: the same on every call and site


def test_cells_values_lookup_and_reverse_lookup(explored):
    store, _, ex, analyses = explored
    cell_codes, cell_table = analyses["cell"]
    f = _busy_feature(cell_codes)
    key = ex.keys()[1]
    values = ex.cell_values(key, f)
    rows = _site_rows(cell_table, key)
    np.testing.assert_array_equal(values["label"], cell_table.label.to_numpy()[rows])
    np.testing.assert_allclose(values["value"], cell_codes[rows][:, f].toarray().ravel(), atol=1e-6)
    assert (values["active"] == (values["value"] != 0)).all()

    labels = ex.labels(key)
    assert labels.shape == tuple(store.sites().iloc[1][["height", "width"]].astype(int))
    label = int(values["label"].iloc[0])
    ys, xs = np.nonzero(labels == label)
    assert ex.cell_at(key, ys[0], xs[0]) == label
    bg = np.argwhere(labels == 0)
    assert ex.cell_at(key, *bg[0]) is None
    assert ex.cell_at(key, -5, 3) is None and ex.cell_at(key, 3, labels.shape[1] + 2) is None

    top = ex.cell_features(key, label, n=3)
    row = cell_codes[rows[0]]
    expected = sorted(zip(row.data, row.indices, strict=True), key=lambda t: (-t[0], t[1]))[:3]
    assert top["feature"].tolist() == [int(i) for _, i in expected]
    np.testing.assert_allclose(top["value"], [v for v, _ in expected], atol=1e-6)
    with pytest.raises(KeyError, match="no cell with label"):
        ex.cell_features(key, 10_000)


def test_top_cells_and_well_means(explored):
    _, _, ex, analyses = explored
    cell_codes, cell_table = analyses["cell"]
    f = _busy_feature(cell_codes)
    column = cell_codes[:, f].toarray().ravel()
    top = ex.top_cells(f, n=5)
    expected = np.sort(column[column > 0])[::-1][:5]
    np.testing.assert_allclose(top["value"], expected, atol=1e-6)
    for _, r in top.iterrows():
        lab = ex.labels((r.plate, r.well, r.site))
        box = lab[r.y0 : r.y1, r.x0 : r.x1]
        assert (box == r.label).any()
        assert (lab == r.label).sum() == (box == r.label).sum()  # the box holds the whole cell
        assert r.y0 <= r.centroid_y < r.y1 and r.x0 <= r.centroid_x < r.x1

    means = ex.well_means(f)
    want = (
        pd.DataFrame({"plate": cell_table.plate, "well": cell_table.well, "v": column})
        .groupby(["plate", "well"])["v"]
        .mean()
    )
    got = means.set_index(["plate", "well"])["value"]
    np.testing.assert_allclose(got.loc[want.index].to_numpy(), want.to_numpy(), atol=1e-6)
    plate = str(means.plate.iloc[0])
    grid, rows, cols = ex.plate_grid(f, plate)
    one = means[means.plate == plate].iloc[0]
    r, c = rows.index(one.well[0]), cols.index(int(one.well[1:]))
    assert grid[r, c] == pytest.approx(one.value)
    assert np.isnan(grid).sum() == grid.size - (means.plate == plate).sum()


def test_feature_table_matches_analyze(explored):
    _, _, ex, analyses = explored
    cell_codes, _ = analyses["cell"]
    table = ex.feature_table(["well_type"])
    assert len(table) == ex.n_features
    counts = np.bincount(cell_codes.indices, minlength=ex.n_features)
    np.testing.assert_array_equal(table["n_active"], counts)
    assert {"top_label", "selectivity_avg"} <= set(table.columns)


def test_site_embedded_on_demand_encodes_like_the_store(explored):
    import torch

    from napari_concept_discovery.embed.compute import embed_site
    from napari_concept_discovery.embed.plate import reopen_plate
    from napari_concept_discovery.models.backend import ChannelAgnosticBackend
    from napari_concept_discovery.models.vit import ChannelAgnosticViT

    store, dictionary, _, _ = explored
    ex = Explorer(store, dictionary)
    key = ex.keys()[0]
    plate = reopen_plate(store)
    torch.manual_seed(0)  # the conftest's tiny model, built again from the same seed
    vit = ChannelAgnosticViT(embed_dim=32, depth=2, num_heads=2, max_channels=6)
    backend = ChannelAgnosticBackend(vit, model_id="tiny-random", weights_hash="0", default_block=1)
    site = plate[key]
    mean_only = embed_site(site.read(), backend, store.block, labels=store.site_labels(key))
    mean_only.key = SiteKey(key.plate, key.well, 99)
    with pytest.raises(StoreError, match="per-channel tokens"):
        ex.add_site(mean_only, dict(site.metadata or {}))  # the dictionary reads channel tokens
    st = embed_site(
        site.read(), backend, store.block, labels=store.site_labels(key), channel_tokens=True
    )
    st.key = SiteKey(key.plate, key.well, 99)  # a site the store does not hold
    fresh = ex.add_site(st, dict(site.metadata or {}))
    stored = ex.site(key)
    # the store keeps patch tokens in float16, so codes agree to float16 precision
    for a, b in ((fresh.patch_codes, stored.patch_codes), (fresh.cell_codes, stored.cell_codes)):
        assert ((a != 0) != (b != 0)).nnz == 0  # the same atoms fire
        np.testing.assert_allclose(a.toarray(), b.toarray(), rtol=2e-2, atol=2e-3)


def test_refusals(explored, tmp_path):
    store, dictionary, ex, _ = explored
    with pytest.raises(IndexError, match="out of range"):
        ex.activation_map(ex.keys()[0], ex.n_features)
    with pytest.raises(StoreError, match="not in the activation store"):
        ex.site(("NOPE", "A01", 1))
    other = type(dictionary)(
        dictionary.model, dictionary.whitener, dictionary.meta.replace(block=0)
    )
    with pytest.raises(DictionaryError, match="block"):
        Explorer(store, other)


def test_ready_cached_and_forget(explored):
    store, dictionary, _, _ = explored
    from napari_concept_discovery.views.overlay import FeatureSource

    explorer = Explorer(store, dictionary, max_sites=2)
    source = FeatureSource(explorer)
    key = explorer.keys()[0]
    assert not explorer.ready(key) and not source.ready(key) and explorer.cached(key) is None
    first = source.paint(key, 0)  # encodes the site, the store's cells and the limits
    assert explorer.ready(key) and source.ready(key)
    assert explorer.cached(key) is explorer.site(key)
    assert source.labels(key) is source.labels(key)  # decoded once per site
    np.testing.assert_array_equal(source.labels(key), store.site_labels(key))
    explorer.forget(key)
    assert explorer.cached(key) is None and not source.ready(key)
    again = source.paint(key, 0)
    np.testing.assert_array_equal(again.image.data, first.image.data)
    pd.testing.assert_frame_equal(again.cells, first.cells)


def test_contrast_limits_are_sampled_once_and_equal_the_percentile(explored):
    """Fixed per feature: the 99.5th percentile of its positive codes over a seeded sample of
    the store's patches, encoded once however many threads ask at the same time."""
    import threading

    from napari_concept_discovery.analysis.explore import LIMIT_PERCENTILE, LIMIT_SAMPLE

    store, dictionary, _, analyses = explored
    patch_codes, patch_table = analyses["patch"]
    ex = Explorer(store, dictionary)
    encoded = []
    encode = ex._encode

    def counting(tokens, table, *args):
        encoded.append(len(tokens))
        return encode(tokens, table, *args)

    ex._encode = counting  # the real encoder, counted
    got = []
    threads = [threading.Thread(target=lambda: got.append(ex.limits())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    n = len(patch_table)
    assert encoded == [min(n, LIMIT_SAMPLE)] and all(g is got[0] for g in got)
    rows = np.sort(np.random.default_rng(0).choice(n, min(n, LIMIT_SAMPLE), replace=False))
    sample = patch_codes[rows].tocsc()
    fired = 0
    for f in range(dictionary.n_atoms):
        column = sample[:, f].data
        positive = column[column > 0]
        expected = float(np.percentile(positive, LIMIT_PERCENTILE)) if positive.size else 0.0
        assert got[0][f] == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert ex.feature_limits(f) == pytest.approx((0.0, expected if expected > 0 else 1.0))
        fired += positive.size > 0
    assert fired > 0


def test_patch_coverage_is_the_share_of_each_patch_in_cells():
    from napari_concept_discovery.views.overlay import patch_coverage

    labels = np.zeros((10, 9), np.int32)  # a 3 x 3 grid of 4-px patches overhangs it
    labels[0, 0] = 1  # one pixel of patch (0, 0)
    labels[4:8, 8] = 2  # patch (1, 2): its only column inside the image
    labels[8:10, 0:4] = 3  # patch (2, 0) is rows 8-11: rows 8-9 are inside the image
    got = patch_coverage(labels, (3, 3), 4)
    want = np.zeros((3, 3))
    want[0, 0], want[1, 2], want[2, 0] = 1 / 16, 4 / 16, 8 / 16
    np.testing.assert_allclose(got, want)


def test_a_cell_dictionary_paints_no_patch_outside_the_cells(explored):
    from napari_concept_discovery.views.overlay import CELL_COVERAGE, FeatureSource, patch_coverage

    store, dictionary, _, analyses = explored
    assert dictionary.meta.unit == "cell"
    patch_codes, patch_table = analyses["patch"]
    ex = Explorer(store, dictionary)
    key = ex.keys()[0]
    rows = _site_rows(patch_table, key)
    f = int(np.argmax(np.asarray((patch_codes[rows] != 0).sum(0)).ravel()))
    painted = FeatureSource(ex).paint(key, f).image
    full = ex.activation_map(key, f)
    share = patch_coverage(store.site_labels(key), full.data.shape, ex.patch_size)
    inside = share >= CELL_COVERAGE
    assert inside.any() and ((share > 0) & ~inside).any()  # cells, edges and background
    assert np.isnan(painted.data[~inside]).all()
    np.testing.assert_array_equal(painted.data[inside], full.data[inside])
    assert (full.data[~inside] != 0).any()  # there was something to hide
    assert painted.scale == full.scale and painted.translate == full.translate
