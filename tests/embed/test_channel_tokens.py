"""Tokens that keep their channels: the store's two token forms, and dictionaries that read one.

A channel-agnostic model gives one token per channel at each patch; the store keeps them side by
side (C x D, float16) besides their mean, and a dictionary records the form it was trained on and
refuses a store that lacks it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_concept_discovery.analysis.encode import encode_store
from napari_concept_discovery.cli.embed import size_line
from napari_concept_discovery.dictionary import (
    TrainSettings,
    WhitenSettings,
    load_dictionary,
    train_on_store,
)
from napari_concept_discovery.embed.plate import (
    EmbedSettings,
    embed_plate,
    keeps_channels,
    resolve_channel_tokens,
)
from napari_concept_discovery.embed.store import ActivationStore, layout_bytes
from napari_concept_discovery.errors import DictionaryError, StoreError
from napari_concept_discovery.models.backend import ChannelAgnosticBackend
from napari_concept_discovery.models.vit import ChannelAgnosticViT

SETTINGS = TrainSettings(atoms=16, sparsity=4, n_pick=2, steps=6, batch_size=64, seed=1)


@pytest.fixture(scope="module")
def store(tiny_store_path):
    return ActivationStore.open(tiny_store_path)


def tiny_backend() -> ChannelAgnosticBackend:
    torch.manual_seed(0)
    vit = ChannelAgnosticViT(embed_dim=32, depth=2, num_heads=2, max_channels=6)
    return ChannelAgnosticBackend(vit, model_id="tiny-random", weights_hash="0", default_block=1)


@pytest.fixture(scope="module")
def mean_only(small_plates, tmp_path_factory):
    """The same plates and model, embedded without channel tokens."""
    out = tmp_path_factory.mktemp("mean-only") / "store"
    return embed_plate(
        small_plates, EmbedSettings(channel_tokens=False), out, backend=tiny_backend()
    )


def test_channel_agnostic_models_keep_channels_by_default(store):
    backend = tiny_backend()
    assert keeps_channels(backend, 6) and not keeps_channels(backend, 1)
    assert resolve_channel_tokens(EmbedSettings(), backend, 6) is True
    assert resolve_channel_tokens(EmbedSettings(channel_tokens=False), backend, 6) is False
    # the tiny store was embedded with the default settings: it keeps them, and says so
    assert store.has_channel_tokens and store.token_groups == 6
    assert store.embed_settings["channel_tokens"] is True
    assert store.token_forms == ("mean", "concat") and store.default_token_form == "concat"


def test_concat_tokens_round_trip_and_average_to_the_mean(store):
    d = store.embed_dim
    for unit in ("cell", "patch", "crop"):
        concat = store.tokens(unit, form="concat")
        mean = store.tokens(unit, form="mean")
        assert concat.shape == (mean.shape[0], 6 * d) and concat.dtype == np.float16
        assert store.token_width("concat") == 6 * d and store.token_width("mean") == d
        blocks = np.asarray(concat[:], dtype=np.float32).reshape(-1, 6, d)
        # the mean form is the mean of the channel blocks (float16 rounding apart)
        np.testing.assert_allclose(blocks.mean(1), np.asarray(mean[:], np.float32), atol=2e-2)
        # row slices, and the orthogonal selection take_rows uses, read the same rows
        rows = np.array([0, 3, 5])
        np.testing.assert_array_equal(
            concat.get_orthogonal_selection((rows, slice(None))), concat[:][rows]
        )
        np.testing.assert_array_equal(concat[2:5], concat[:][2:5])
    key = tuple(store.sites().iloc[1][["plate", "well", "site"]])
    rows = store.site_rows("cell", key)
    np.testing.assert_array_equal(
        store.site_tokens("cell", key, form="concat"), store.tokens("cell", "concat")[rows]
    )
    site = store.sites().iloc[1]
    grid = store.patch_grid(key, form="concat")
    assert grid.shape == (site.rows, site.cols, 6 * d)
    np.testing.assert_allclose(
        grid.reshape(site.rows, site.cols, 6, d).astype(np.float32).mean(2),
        store.patch_grid(key).astype(np.float32),
        atol=2e-2,
    )


def test_store_size_is_reported_and_follows_the_layout(store):
    # the layout's arithmetic (used for the README's figure) gives the arrays' exact bytes
    expected = dict.fromkeys(("patch", "cell", "crop"), 0)
    for _, site in store.sites().iterrows():
        per = layout_bytes(int(site.height), int(site.width), 6, 32, int(site.cell_count))
        for unit in expected:
            expected[unit] += per[unit]
    for unit, n in expected.items():
        arrays = store.tokens(unit, "mean"), store.tokens(unit, "concat")
        assert sum(a.nbytes for a in arrays) == n
    sizes = store.nbytes()
    assert sizes["patch"] > sizes["cell"] > 0
    assert sizes["total"] >= sum(sizes[u] for u in ("cell", "patch", "crop", "labels"))
    assert store.size_per_site() == pytest.approx(sizes["total"] / len(store.sites()))
    # what `concept-discovery embed` prints at the end
    line = size_line(store)
    per_site = sizes["total"] / len(store.sites()) / 1e6
    assert f"{per_site:.2f} MB per site" in line
    assert "per-channel tokens kept (6 x 32, float16)" in line


def test_mean_only_store_refuses_concat_with_the_way_out(mean_only):
    assert not mean_only.has_channel_tokens and mean_only.token_forms == ("mean",)
    assert mean_only.default_token_form == "mean"
    with pytest.raises(StoreError, match=r"no per-channel tokens.*--channel-tokens"):
        mean_only.tokens("cell", form="concat")
    with pytest.raises(StoreError, match="unknown token form 'sum'"):
        mean_only.tokens("cell", form="sum")
    with pytest.raises(StoreError, match="no per-channel tokens"):
        train_on_store(mean_only, SETTINGS.replace(tokens="concat"))


def test_dictionary_records_its_form_and_refuses_a_store_without_it(store, mean_only, tmp_path):
    concat = train_on_store(store, SETTINGS, out=tmp_path / "c.safetensors")
    mean = train_on_store(store, SETTINGS.replace(tokens="mean"), out=tmp_path / "m.safetensors")
    dc, dm = load_dictionary(concat.path), load_dictionary(mean.path)
    assert dc.meta.tokens == "concat" and dc.token_groups == 6
    assert dc.input_width == 6 * store.embed_dim
    assert dm.meta.tokens == "mean" and dm.token_groups == 1 and dm.input_width == 32
    # the default form on a mean-only store is the mean
    assert train_on_store(mean_only, SETTINGS).dictionary.meta.tokens == "mean"

    codes, table = encode_store(store, dc)
    assert codes.shape == (len(table), 16)
    codes_m, _ = encode_store(mean_only, dm)  # a mean dictionary reads either store
    assert codes_m.shape == (len(table), 16)
    with pytest.raises(
        DictionaryError,
        match=r"concatenated per-channel tokens.*keeps only their mean; embed the plate again "
        r"with --channel-tokens, or use a dictionary trained with --tokens mean",
    ):
        encode_store(mean_only, dc)

    # concatenated blocks must come in the same channel order
    swapped = type(dc)(dc.model, dc.whitener, dc.meta.replace(channel_names=("ER", "DNA") * 3))
    with pytest.raises(DictionaryError, match=r"channel blocks are \['ER', 'DNA'.*same channel"):
        encode_store(store, swapped)


def test_concat_training_runs_with_per_plate_whitening_and_few_controls(store):
    # 6 x 32 = 192 dimensions, fewer control cells per plate than that: shrinkage makes the
    # covariance full rank, so the whitening keeps every dimension
    table = store.table("cell")
    per_plate = table[table.well_type == "negative_control"].groupby("plate").size()
    assert per_plate.max() < 192
    whiten = WhitenSettings("well_type=negative_control", by="plate")
    result = train_on_store(store, SETTINGS.replace(whiten=whiten))
    w = result.dictionary.whitener
    assert w.n_components_ == 192 and (w.shrinkage_ > 0).all()
    assert np.isfinite(result.metrics["fvu"]) and result.metrics["fvu"] < 1.5
    # without shrinkage the same controls cannot estimate 192 components, and it says so
    with pytest.raises(DictionaryError, match=r"at least 193 .*--whiten-shrinkage auto"):
        train_on_store(store, SETTINGS.replace(whiten=whiten.replace(shrinkage="none")))
