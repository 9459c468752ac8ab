"""codes.h5ad the scverse way: names that concatenate, centroids where squidpy looks, and
scanpy's neighbours and UMAP run on the codes as written."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from helpers import small_train
from napari_concept_discovery.analysis.analyze import encode_for_analysis
from napari_concept_discovery.analysis.write import feature_names, token_names, write_analysis
from napari_concept_discovery.dictionary.pipeline import train_on_store
from napari_concept_discovery.dictionary.settings import (
    AnalyzeSettings,
    WhitenSettings,
)
from napari_concept_discovery.embed.store import ActivationStore


@pytest.fixture(scope="module")
def encoded(tiny_store_path, tmp_path_factory):
    """The tiny store's cells encoded by a small ICFL dictionary: (codes, table, atoms)."""
    from napari_concept_discovery.dictionary import load_dictionary

    store = ActivationStore.open(tiny_store_path)
    centred = WhitenSettings(controls="well_type=negative_control", mode="center")
    settings = small_train(unit="cell", n_pick=None, steps=30, seed=5, whiten=centred)
    out = tmp_path_factory.mktemp("scverse")
    dictionary = load_dictionary(train_on_store(store, settings, out=out / "d.safetensors").path)
    codes, table = encode_for_analysis(store, dictionary, AnalyzeSettings())
    return codes.tocsr(), table, dictionary.n_atoms


def test_names_follow_plate_well_site_label_and_feature_width():
    table = pd.DataFrame(
        {"plate": ["P1", "P1"], "well": ["B02", "B02"], "site": [1, 2], "label": [7, 7]}
    )
    assert list(token_names(table)) == ["P1_B02_1_7", "P1_B02_2_7"]
    patches = pd.DataFrame({"plate": ["P1"], "well": ["C03"], "site": [2], "row": [4], "col": [9]})
    assert list(token_names(patches)) == ["P1_C03_2_r4_c9"]
    assert list(token_names(pd.DataFrame({"x": [0.5, 0.1]}))) == ["t0", "t1"]
    repeated = pd.concat([table, table], ignore_index=True)
    assert token_names(repeated).is_unique
    assert feature_names(3) == ["f0000", "f0001", "f0002"]
    assert feature_names(16384)[-1] == "f16383" and feature_names(10001)[-1] == "f10000"


def test_two_analyses_concatenate_and_scanpy_runs_on_the_codes(encoded, tmp_path):
    sc = pytest.importorskip("scanpy")
    codes, table, m = encoded
    plates = sorted(table["plate"].unique())
    assert len(plates) == 2
    parts = []
    for plate in plates:  # one analysis per plate, as two screens would be analysed
        rows = np.flatnonzero(table["plate"].to_numpy() == plate)
        part = table.iloc[rows].reset_index(drop=True)
        paths = write_analysis(tmp_path / plate, codes[rows], part, ["well_type"])
        adata = ad.read_h5ad(paths["h5ad"])
        assert adata.obs_names[0] == (
            f"{part.plate[0]}_{part.well[0]}_{part.site[0]}_{part.label[0]}"
        )
        assert list(adata.var_names) == [f"f{f:04d}" for f in range(m)]
        assert adata.var["feature"].tolist() == list(range(m))
        np.testing.assert_array_equal(
            adata.obsm["spatial"], part[["centroid_x", "centroid_y"]].to_numpy()
        )
        parts.append(adata)
    both = ad.concat(parts, label="analysis", keys=plates)  # no index_unique needed
    assert both.obs_names.is_unique and both.n_obs == len(table) == codes.shape[0]
    assert list(both.var_names) == list(parts[0].var_names)
    assert both.obsm["spatial"].shape == (len(table), 2)
    np.testing.assert_array_equal(both.X.toarray(), sp.vstack([p.X for p in parts]).toarray())
    sc.pp.neighbors(both, n_neighbors=10, use_rep="X", random_state=0)
    sc.tl.umap(both, random_state=0)
    assert both.obsm["X_umap"].shape == (both.n_obs, 2)
    assert np.isfinite(both.obsm["X_umap"]).all()
    # neighbours of a cell come from cells whose codes are close: the nearest by the graph is
    # nearer in code space than the median cell
    x = both.X.toarray()
    dist = both.obsp["distances"].tocsr()
    i = int(np.argmax(np.diff(dist.indptr) > 0))
    nearest = dist.indices[dist.indptr[i] : dist.indptr[i + 1]][np.argmin(dist[i].data)]
    to_all = np.linalg.norm(x - x[i], axis=1)
    assert to_all[nearest] <= np.median(to_all)
