"""Embedding: tiling and its edge rule, coverage-weighted cell pooling, batching, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_concept_discovery.embed.compute import Embedder, embed_site, tile_image
from napari_concept_discovery.errors import ModelError, PlateError
from napari_concept_discovery.models import ChannelAgnosticBackend, ChannelAgnosticViT

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def backend():
    torch.manual_seed(0)
    m = ChannelAgnosticViT(embed_dim=32, depth=2, num_heads=2, max_channels=4)
    with torch.no_grad():
        for blk in m.blocks:
            blk.ls.gamma.fill_(1.0)
    return ChannelAgnosticBackend(m, model_id="tiny", weights_hash="-")


def _image(c=3, h=300, w=520, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (c, h, w), dtype=np.uint8)


def test_tiling_edge_rule(backend):
    img = _image()
    tiles, layout = tile_image(img.astype(np.float32), 256)
    assert layout == (2, 3) and tiles.shape == (6, 3, 256, 256)
    # Padding reflects the image at the bottom/right edges.
    assert np.array_equal(tiles[3, :, 300 - 256 + 0, :], img[:, 298, :256].astype(np.float32))
    st = embed_site(img, backend, labels=None)
    assert st.patch_grid.shape == (19, 33, 32)  # ceil(300/16) x ceil(520/16): no padding patches
    assert st.crop_tokens.shape == (6, 32)
    assert st.crop_table.n_patches.tolist() == [256, 256, 16, 48, 48, 3]
    # The last crop is the mean of its 3 kept patches only.
    assert np.allclose(st.crop_tokens[5], st.patch_grid[16:19, 32].mean(0), atol=1e-6)


def test_full_tile_grid_matches_backend(backend):
    img = _image(h=256, w=256)
    st = embed_site(img, backend, block=0, channel_tokens=True)
    x = torch.from_numpy(backend.scale_to_unit(img))[None]
    with torch.inference_mode():
        tok = backend.tokens(x, 0)[0]  # (C, 256, D)
    assert np.allclose(
        st.patch_channels.reshape(256, 3, 32), tok.permute(1, 0, 2).numpy(), atol=1e-6
    )
    assert np.allclose(st.patch_grid.reshape(256, 32), tok.mean(0).numpy(), atol=1e-6)
    assert np.allclose(st.crop_tokens[0], tok.mean((0, 1)).numpy(), atol=1e-5)


def test_cell_tokens_are_coverage_weighted(backend):
    img = _image()
    lab = np.zeros((300, 520), np.int32)
    lab[280:300, 500:520] = 7  # straddles four patches with 96, 64, 144 and 96 pixels
    lab[0:16, 0:16] = 3  # exactly one patch
    st = embed_site(img, backend, labels=lab, channel_tokens=True)
    g = st.patch_grid
    assert st.cell_table.label.tolist() == [3, 7]
    assert st.cell_table.area.tolist() == [256, 400]
    assert np.allclose(st.cell_table[["centroid_y", "centroid_x"]].iloc[1], [289.5, 509.5])
    assert np.allclose(st.cell_tokens[0], g[0, 0], atol=1e-6)
    expect = (g[17, 31] * 96 + g[17, 32] * 64 + g[18, 31] * 144 + g[18, 32] * 96) / 400
    assert np.allclose(st.cell_tokens[1], expect, atol=1e-5)
    assert st.cell_channels.shape == (2, 3, 32)
    assert np.allclose(st.cell_channels.mean(1), st.cell_tokens, atol=1e-5)


def test_batches_across_sites_give_the_same_tokens(backend):
    imgs = [_image(h=200 + 40 * i, w=260, seed=i) for i in range(3)]
    alone = [embed_site(im, backend) for im in imgs]
    emb = Embedder(backend, batch_size=5)
    together = list(emb.iter_sites((i, im, None, {}) for i, im in enumerate(imgs)))
    assert [t.key for t in together] == [0, 1, 2]
    for a, b in zip(alone, together, strict=True):
        assert np.allclose(a.patch_grid, b.patch_grid, atol=1e-5)
    assert emb.tiles_done == sum(len(a.crop_tokens) for a in alone)


def test_clear_errors(backend):
    with pytest.raises(ModelError, match="at most 4 channels"):
        embed_site(_image(c=5, h=32, w=32), backend)
    with pytest.raises(PlateError, match="empty image"):
        embed_site(np.zeros((3, 0, 10), np.uint8), backend)
    bad = np.ones((2, 32, 32), np.float32)
    bad[1, 3, 4] = np.nan
    with pytest.raises(PlateError, match=r"NaN or infinite values in channel\(s\) \[1\]"):
        embed_site(bad, backend)
    with pytest.raises(PlateError, match="labels of shape"):
        embed_site(_image(h=32, w=32), backend, labels=np.zeros((16, 16), np.int32))


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _default_backend():
    from napari_concept_discovery.models import load_model

    return load_model("default", "cpu")


@pytest.mark.parametrize(
    "precision",
    [
        pytest.param(
            "bf16",
            marks=pytest.mark.skipif(
                not __import__(
                    "napari_concept_discovery.embed.compute"
                ).embed.compute.cpu_has_bf16(),
                reason="this CPU has no native bf16",
            ),
        ),
        "int8",
    ],
)
def test_reduced_precision_tokens_stay_at_cosine_099_to_fp32(precision):
    """The bundled (trained) model on a synthetic Cell Painting site: every patch, crop and
    cell token of the bf16 / int8 forward points where the fp32 one does."""
    from napari_concept_discovery.synth import generate_site

    backend = _default_backend()
    site = generate_site("HEPG2", size=256, seed=3)
    image, labels = site.image, site.cells
    ref = embed_site(image, backend, labels=labels)
    got = embed_site(image, backend, labels=labels, precision=precision)
    assert got.patch_grid.dtype == np.float32 and got.patch_grid.shape == ref.patch_grid.shape
    assert len(ref.cell_tokens) > 3
    bar = 0.999 if precision == "bf16" else 0.99
    for name in ("patch_grid", "crop_tokens", "cell_tokens"):
        cos = _cosines(getattr(got, name), getattr(ref, name))
        assert cos.min() >= bar, (name, float(cos.min()))
    assert not np.array_equal(got.patch_grid, ref.patch_grid)  # it did run at lower precision
    # the bf16 / int8 copy leaves the backend's own float weights alone
    assert all(p.dtype == torch.float32 for p in backend.model.parameters())
    again = embed_site(image, backend, labels=labels)
    np.testing.assert_array_equal(again.patch_grid, ref.patch_grid)


def test_auto_precision_is_bf16_only_where_it_is_native(backend):
    from napari_concept_discovery.embed.compute import Embedder, cpu_has_bf16

    emb = Embedder(backend, precision="auto")
    assert emb.precision == ("bf16" if cpu_has_bf16() else "fp32")
    dtype = torch.bfloat16 if cpu_has_bf16() else torch.float32
    assert next(emb.backend.model.parameters()).dtype == dtype
    assert Embedder(backend).precision == "fp32"  # the compute API stays exact unless asked


def test_precision_errors_name_the_problem(backend):
    from napari_concept_discovery.embed.compute import check_precision

    with pytest.raises(ModelError, match=r"precision 'fp16' is not one of fp32, bf16, int8"):
        embed_site(_image(h=32, w=32), backend, precision="fp16")
    with pytest.raises(ModelError, match="int8 .* runs on the CPU, not cuda"):
        check_precision("int8", torch.device("cuda"))
