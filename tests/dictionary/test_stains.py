"""Which stains drive each feature: shares of an atom's norm per channel block, and correlation.

The attribution is taken in raw token space, through the whitening's pseudo-inverse, so a
whitening that mixes channels does not smear a one-stain feature over every stain.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from napari_concept_discovery.analysis.analyze import analyze_store
from napari_concept_discovery.analysis.concepts import feature_auroc
from napari_concept_discovery.dictionary import (
    AnalyzeSettings,
    Dictionary,
    Whitener,
    WhitenSettings,
    build_model,
    train,
    train_on_store,
)
from napari_concept_discovery.dictionary.stains import channel_shares, stain_table
from napari_concept_discovery.embed.store import ActivationStore
from napari_concept_discovery.errors import DictionaryError

STAINS = ["DNA", "ER", "Actin", "Mito"]


def test_channel_shares_and_stain_table_are_exact():
    v = np.array([[3.0, 4.0, 0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]])
    shares = channel_shares(v, 3)
    np.testing.assert_allclose(shares, [[1.0, 0.0, 0.0], [0.25, 0.25, 0.5]])
    np.testing.assert_allclose(channel_shares(np.zeros((1, 6)), 3), [[1 / 3] * 3])
    table = stain_table(shares, ["DNA", "ER", "RNA"])
    assert list(table.columns) == ["stain_DNA", "stain_ER", "stain_RNA", "top_stain"]
    assert table["top_stain"].tolist() == ["DNA", "RNA"]
    with pytest.raises(DictionaryError, match="cannot split 6 columns into 4 channel blocks"):
        channel_shares(v, 4)


def test_inverse_directions_undo_the_whitening():
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((12, 12)) * np.linspace(0.2, 4, 12)
    controls = rng.standard_normal((400, 12)) @ mix
    groups = np.array(["A", "B"] * 200)
    w = Whitener(unit_norm=False, shrinkage="auto", group_by="plate").fit(controls, groups)
    v = rng.standard_normal((5, 12))
    raw = w.inverse_directions(v)
    assert raw.shape == (2, 5, 12)
    for g, name in enumerate(("A", "B")):
        # whitening the raw change gives the direction back (the transform has no offset for a
        # change: T (mu + dx) - T mu = T dx)
        back = w.transform(w.mean_[g] + raw[g], [name] * 5) - w.transform(w.mean_[g][None], [name])
        np.testing.assert_allclose(back, v, atol=1e-3)


def planted_channels(seed: int = 0, g: int = 4, d: int = 8):
    """Tokens of G channel blocks whose controls vary along directions that mix channels, and
    four perturbations that each shift a fraction of cells inside one channel block only."""
    rng = np.random.default_rng(seed)
    width = g * d
    mix = rng.standard_normal((10, width)) * 1.5  # nuisance shared by all blocks
    n_ctrl, n_each = 3000, 600

    def cells(n):
        return rng.standard_normal((n, 10)) @ mix + 0.5 * rng.standard_normal((n, width))

    parts, labels = [cells(n_ctrl)], ["control"] * n_ctrl
    for k, name in enumerate(STAINS):
        shift = np.zeros(width)
        shift[k * d : (k + 1) * d] = rng.standard_normal(d)
        shift *= 3.0 / np.linalg.norm(shift)
        x = cells(n_each)
        x[: n_each * 2 // 3] += shift  # two thirds respond
        parts.append(x)
        labels += [f"{name}_hit"] * (n_each * 2 // 3) + [f"{name}_miss"] * (n_each // 3)
    return np.vstack(parts).astype(np.float32), np.array(labels)


def test_most_selective_feature_of_a_one_stain_perturbation_is_attributed_to_that_stain():
    x, labels = planted_channels()
    control = labels == "control"
    w = Whitener(shrinkage="auto").fit(x[control])
    y = w.transform(x)
    model = build_model("icfl", y.shape[1], {"n_atoms": 32, "n_iter": 2, "n_pick": 2}, seed=0)
    train(model, y, steps=600, batch_size=256, seed=0)
    meta = {"tokens": "concat", "token_groups": 4, "channel_names": STAINS}
    dictionary = Dictionary(model, w, meta)
    shares = dictionary.stain_attribution()
    assert shares.shape == (32, 4)
    np.testing.assert_allclose(shares.sum(1), 1.0, atol=1e-9)
    codes = dictionary.encode(x)
    for k, name in enumerate(STAINS):
        rows = np.flatnonzero(control | (labels == f"{name}_hit"))
        auc = feature_auroc(codes[rows], labels[rows] == f"{name}_hit")
        best = int(np.nanargmax(auc))
        assert auc[best] > 0.8, (name, auc[best])
        assert shares[best].argmax() == k, (name, shares[best])
        assert shares[best, k] > 0.4  # of 4 stains; 0.25 would be no preference
    table = dictionary.stain_table()
    assert table.columns.tolist() == [f"stain_{s}" for s in STAINS] + ["top_stain"]


def test_attribution_reads_channels_through_the_whitening():
    # controls whose DNA block varies 600 times more than the ER block, mixed by a rotation: the
    # atom that is the whitened image of a change in ER alone is attributed to ER alone
    rng = np.random.default_rng(3)
    scale = np.r_[np.full(4, 5.0), np.full(4, 0.2)]
    rot = np.linalg.qr(rng.standard_normal((8, 8)))[0]
    controls = (rng.standard_normal((2000, 8)) * scale) @ rot.T @ np.diag(scale)
    w = Whitener(unit_norm=False).fit(controls)
    er = np.r_[np.zeros(4), rng.standard_normal(4)]
    dna = np.r_[rng.standard_normal(4), np.zeros(4)]
    atoms = np.stack([w.transform(w.mean_[0] + v[None])[0] for v in (er, dna)])
    atoms -= w.transform(w.mean_[0][None])
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    model = build_model("icfl", 8, {"n_atoms": 2, "n_iter": 1, "n_pick": 1}, seed=0)
    model.W.data = torch.from_numpy(atoms.astype(np.float32))
    meta = {"tokens": "concat", "token_groups": 2, "channel_names": ["DNA", "ER"]}
    shares = Dictionary(model, w, meta).stain_attribution()
    np.testing.assert_allclose(shares, [[0.0, 1.0], [1.0, 0.0]], atol=1e-4)
    # without whitening the share is the plain share of squared norm per block
    plain = Dictionary(model, None, meta).stain_attribution()
    np.testing.assert_allclose(plain, channel_shares(atoms, 2), atol=1e-6)


def test_mean_dictionaries_have_no_block_attribution():
    x, _ = planted_channels()
    w = Whitener(mode="center").fit(x[:, :8])
    model = build_model("icfl", 8, {"n_atoms": 4, "n_iter": 1, "n_pick": 1}, seed=0)
    assert Dictionary(model, w, {"tokens": "mean"}).stain_attribution() is None


def test_analysis_writes_stains_into_features_and_anndata(tiny_store_path, tmp_path, small_train):
    store = ActivationStore.open(tiny_store_path)
    settings = small_train(
        atoms=12, steps=6, seed=0, whiten=WhitenSettings("well_type=negative_control")
    )
    dictionary = train_on_store(store, settings).dictionary
    analysis = analyze_store(
        store, dictionary, AnalyzeSettings(labels="perturbation"), tmp_path / "a"
    )
    names = list(store.channel_names)
    features = pd.read_parquet(analysis.paths["features"])
    cols = [f"stain_{n}" for n in names]
    assert set(cols) <= set(features.columns)
    np.testing.assert_allclose(features[cols].sum(1), 1.0, atol=1e-9)
    expected = np.asarray(names)[features[cols].to_numpy().argmax(1)]
    assert features["top_stain"].tolist() == expected.tolist()
    adata = ad.read_h5ad(analysis.paths["h5ad"])
    np.testing.assert_allclose(adata.varm["stain_attribution"], features[cols].to_numpy())
    assert list(adata.uns["stain_names"]) == names
    assert adata.var["top_stain"].tolist() == expected.tolist()
