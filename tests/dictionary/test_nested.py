"""Nested (Matryoshka) dictionaries: the levels setting, the nested loss on a known example, and
levels through the dictionary file (and files written before levels existed)."""

from __future__ import annotations

import json

import anndata
import numpy as np
import pandas as pd
import pytest
import torch

from helpers import small_train
from napari_concept_discovery.analysis.analyze import analyze_store
from napari_concept_discovery.dictionary import (
    AnalyzeSettings,
    TrainSettings,
    build_model,
    load_dictionary,
    save_dictionary,
    train,
    train_on_store,
)
from napari_concept_discovery.dictionary.base import sparse_decode
from napari_concept_discovery.dictionary.nested import feature_levels, parse_levels
from napari_concept_discovery.embed.store import ActivationStore
from napari_concept_discovery.errors import DictionaryError
from napari_concept_discovery.settings import SettingsError


def test_levels_setting_parses_drops_sizes_too_large_and_refuses_nonsense():
    assert parse_levels("16,64,256,M", 1024) == [16, 64, 256, 1024]
    assert parse_levels("16,64,256,M", 100) == [16, 64, 100]  # 256 >= M is dropped
    assert parse_levels("none", 64) is None and parse_levels("", 64) is None
    assert parse_levels("64,M", 64) is None  # only M left: a plain dictionary
    for bad in ("16,8,M", "0,M", "a,M"):
        with pytest.raises(DictionaryError, match="levels"):
            parse_levels(bad, 64)
    cfg = TrainSettings(atoms=100, levels="16,64,256,M").method_config()
    assert cfg["levels"] == [16, 64, 100]
    assert "levels" not in TrainSettings(atoms=100).method_config()
    with pytest.raises(SettingsError, match="levels"):
        TrainSettings(levels="64,16")
    np.testing.assert_array_equal(feature_levels([2, 5, 8], 8), [2, 2, 5, 5, 5, 8, 8, 8])
    np.testing.assert_array_equal(feature_levels(None, 3), [3, 3, 3])


def _hierarchy(seed=0, n=3000, d=32, parents=4, children=6):
    """Tokens each made of one of 4 broad directions (weight 1-1.5) plus one of its 6 finer
    children (weight 0.25-0.5) and noise: 4 atoms can explain the broad part alone."""
    rng = np.random.default_rng(seed)
    broad = rng.normal(size=(parents, d))
    broad /= np.linalg.norm(broad, axis=1, keepdims=True)
    fine = rng.normal(size=(parents, children, d))
    fine /= np.linalg.norm(fine, axis=2, keepdims=True)
    p, c = rng.integers(parents, size=n), rng.integers(children, size=n)
    x = broad[p] * rng.uniform(1.0, 1.5, (n, 1)) + 0.5 * fine[p, c] * rng.uniform(0.5, 1, (n, 1))
    x += 0.05 * rng.normal(size=(n, d))
    return x.astype(np.float32), broad


def _prefix_fvu(model, x: torch.Tensor, width: int) -> float:
    codes = model.encode_prefix(x, width)
    x_hat = sparse_decode(codes, model.atoms.detach()) + model.bias.detach()
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


@pytest.mark.parametrize(
    "method,cfg", [("icfl", dict(n_iter=1, n_pick=2, lr=3e-3)), ("topk", dict(k=2))]
)
def test_nested_training_makes_the_first_atoms_reconstruct_alone(method, cfg):
    x, _ = _hierarchy(n=1500)
    xt = torch.from_numpy(x)
    fvu = {}
    for levels in (None, [4, 32]):
        model = build_model(method, 32, {"n_atoms": 32, "levels": levels, **cfg}, seed=0)
        train(model, x, steps=150, batch_size=256, seed=0)
        fvu[bool(levels)] = (_prefix_fvu(model, xt, 4), _prefix_fvu(model, xt, 32))
    (plain4, plain_all), (nested4, nested_all) = fvu[False], fvu[True]
    # the first 4 atoms of the plain dictionary are any 4; the nested ones carry the broad part
    assert nested4 < 0.5 and nested4 < 0.6 * plain4, fvu
    assert nested_all < plain_all + 0.05, fvu  # the whole dictionary gives up little for it


def test_levels_round_trip_and_old_files_load_plain(tmp_path):
    x, _ = _hierarchy(n=500)
    model = build_model("topk", 32, {"n_atoms": 32, "k": 2, "levels": [4, 16, 32]}, seed=0)
    train(model, x, steps=3, batch_size=128)
    path = save_dictionary(tmp_path / "d.safetensors", model, None, {"unit": "cell"})
    loaded = load_dictionary(path)
    assert loaded.levels == [4, 16, 32] and loaded.model.config == model.config
    assert np.bincount(loaded.feature_levels()).nonzero()[0].tolist() == [4, 16, 32]
    # a file written before levels existed: its config has no "levels" key
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as fh:
        header = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    config = json.loads(header["config"])
    config.pop("levels")
    header["config"] = json.dumps(config)
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=header)
    plain = load_dictionary(old)
    assert plain.levels is None and set(plain.feature_levels()) == {32}


def test_levels_and_families_reach_the_analysis_tables(tiny_store_path, small_plates, tmp_path):
    store = ActivationStore.open(tiny_store_path)
    settings = small_train(levels="4,8,M")
    result = train_on_store(store, settings, out=tmp_path / "d.safetensors")
    loaded = load_dictionary(result.path)
    assert loaded.levels == [4, 8, 24]
    assert loaded.meta.train.levels == "4,8,M"
    analyze = AnalyzeSettings(
        labels="perturbation", truth="cell_type", truth_file=small_plates / "truth.csv"
    )
    analysis = analyze_store(store, loaded, analyze, tmp_path / "a")
    features = pd.read_parquet(analysis.paths["features"])
    assert features["level"].tolist() == [4] * 4 + [8] * 4 + [24] * 16
    families = pd.read_parquet(analysis.paths["families"])
    in_family = features.loc[features["family"] >= 0, ["feature", "family"]]
    for fam in families.itertuples(index=False):  # members listed = features marked
        listed = sorted(int(f) for f in fam.members.split())
        assert listed == sorted(in_family.loc[in_family["family"] == fam.family, "feature"])
    concepts = pd.read_parquet(analysis.paths["concepts"])
    assert {"best_family", "family_auroc"} <= set(concepts.columns)
    profiles = pd.read_parquet(analysis.paths["profiles"])
    assert {"p_value", "q_value", "significant"} <= set(profiles.columns)
    assert profiles.loc[profiles["value"] != "control", "p_value"].between(0, 1).all()
    adata = anndata.read_h5ad(analysis.paths["h5ad"])
    assert adata.var["level"].astype(int).tolist() == features["level"].tolist()
