"""Helpers the test modules share (no tests here): small training settings, counting the tiles
a model embeds, comparing two stores, poisoning a store's tokens, FVU computed by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import zarr

from napari_concept_discovery.dictionary.settings import TrainSettings, WhitenSettings
from napari_concept_discovery.embed.store import UNITS, ActivationStore


def small_train(**changes) -> TrainSettings:
    """Training settings that train in seconds on the tiny store: 24 atoms, 4 non-zeros, 20
    steps, whitened per plate on the negative controls, one view (whitened; a dictionary in
    views is asked for with ``views=...``); ``changes`` override any of them."""
    base = dict(
        views="whitened",
        atoms=24,
        sparsity=4,
        n_pick=2,
        steps=20,
        batch_size=64,
        seed=3,
        whiten=WhitenSettings("well_type=negative_control", by="plate", n_components=8),
    )
    return TrainSettings(**{**base, **changes})


class TileCounter:
    """Counts tiles through a backend's real model with a forward hook on its first block (it
    observes, it replaces nothing): how tests see which sites were embedded again."""

    def __init__(self, backend):
        self.tiles = 0
        backend.model.blocks[0].register_forward_hook(self._hook)

    def _hook(self, module, inp, out):
        self.tiles += inp[0].shape[0]


def same_store(a: ActivationStore, b: ActivationStore) -> None:
    pd.testing.assert_frame_equal(a.sites(), b.sites())
    for unit in UNITS:
        pd.testing.assert_frame_equal(a.table(unit), b.table(unit))
        x, y = np.asarray(a.tokens(unit)), np.asarray(b.tokens(unit))
        assert x.dtype == y.dtype and x.shape == y.shape
        # the same model on the same tiles; torch's CPU kernels may round differently for
        # other batch compositions, so equal within float16 rounding, not bit for bit
        np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), rtol=2e-3, atol=2e-3)
    for key in a.sites()[["plate", "well", "site"]].itertuples(index=False):
        np.testing.assert_array_equal(a.site_labels(tuple(key)), b.site_labels(tuple(key)))


def poison(store_path, row: int, value: float, unit: str = "cell") -> None:
    """``value`` in one token of ``row``, in every form the store keeps (the mean token and,
    where kept, the per-channel tokens a "concat" dictionary reads)."""
    for name in ("tokens", "channels"):
        if not (store_path / unit / name).exists():
            continue
        array = zarr.open_array(str(store_path / unit / name), mode="r+")
        data = np.asarray(array[row])
        data.reshape(-1)[1] = value
        array[row] = data


def fvu_by_hand(d, tokens, table) -> float:
    """FVU of a dictionary on tokens, from its atoms and bias in numpy (not the metrics code)."""
    x = d.whitener.transform(np.asarray(tokens), d.groups_of(table)).astype(np.float64)
    codes = d.encode_table(tokens, table)
    atoms = d.model.atoms.detach().numpy().astype(np.float64)
    x_hat = codes @ atoms + d.model.bias.detach().numpy()
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
