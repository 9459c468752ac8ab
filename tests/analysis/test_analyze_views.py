"""A dictionary in views read by analyze and the explorer: every feature carries its view,
families stay within a view, and each concept names the view that found it."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from helpers import small_train
from napari_concept_discovery.analysis.analyze import analyze_store
from napari_concept_discovery.analysis.explore import Explorer
from napari_concept_discovery.dictionary import AnalyzeSettings, train_on_store
from napari_concept_discovery.embed.store import ActivationStore
from napari_concept_discovery.views.feature_card import card_data


@pytest.fixture(scope="module")
def analysed(tiny_store_path, small_plates, tmp_path_factory):
    store = ActivationStore.open(tiny_store_path)
    out = tmp_path_factory.mktemp("views")
    trained = train_on_store(
        store, small_train(views="whitened,centred"), out=out / "d.safetensors"
    )
    settings = AnalyzeSettings(
        labels="well_type,perturbation",
        truth="mitotic,cell_type",
        truth_file=small_plates / "truth.csv",
        describe=False,
    )
    paths = analyze_store(store, trained.dictionary, settings, out / "a").paths
    return store, trained.dictionary, paths


def test_features_families_profiles_and_anndata_carry_the_view(analysed):
    _, d, paths = analysed
    views = ["whitened"] * 24 + ["centred"] * 24
    features = pd.read_parquet(paths["features"])
    assert features["feature"].tolist() == list(range(48))
    assert features["view"].tolist() == views
    view_of = dict(zip(features["feature"], features["view"], strict=True))
    families = pd.read_parquet(paths["families"])
    assert len(families) > 0
    for row in families.itertuples():
        members = [int(f) for f in row.members.split()]
        assert {view_of[f] for f in members} == {row.view}  # never across views
    fam = features.set_index("feature")["family"]
    assert set(fam[fam >= 0].index) == {int(f) for m in families["members"] for f in m.split()}
    profiles = pd.read_parquet(paths["profiles"])
    assert (profiles["view"] == profiles["feature"].map(view_of)).all()
    adata = ad.read_h5ad(paths["h5ad"])
    assert adata.var["view"].tolist() == views


def test_each_concept_names_the_view_of_its_best_feature_and_each_views_best(analysed):
    _, d, paths = analysed
    concepts = pd.read_parquet(paths["concepts"])
    assert {"view", "auroc_whitened", "auroc_centred"} <= set(concepts.columns)
    for row in concepts.itertuples():
        assert row.view == d.feature_views()[row.best_feature]
        assert row.auroc == pytest.approx(max(row.auroc_whitened, row.auroc_centred))
        assert row.auroc == pytest.approx(getattr(row, f"auroc_{row.view}"))
        assert 0 <= row.best_feature_whitened < 24 <= row.best_feature_centred < 48


def test_the_explorer_table_shows_the_view(analysed):
    store, d, paths = analysed
    explorer = Explorer(store, d)
    table = explorer.feature_table(["perturbation"])
    assert table.columns[:2].tolist() == ["feature", "view"]
    assert table["view"].tolist() == ["whitened"] * 24 + ["centred"] * 24
    written = pd.read_parquet(paths["features"])
    np.testing.assert_array_equal(table["family"], written["family"])
    # the feature card says it too
    assert card_data(explorer, 30).title == "Feature 30 (centred view)"
    assert card_data(explorer, 3, name="x").title == "Feature 3 \u201cx\u201d (whitened view)"
