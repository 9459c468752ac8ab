"""Metrics, selectivity, AUROC and feature tables on hand-computed and random examples."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from napari_concept_discovery.analysis.concepts import (
    feature_auroc,
    feature_table,
    selectivity,
    selectivity_report,
)
from napari_concept_discovery.analysis.truth import concept_auroc
from napari_concept_discovery.analysis.write import write_analysis
from napari_concept_discovery.dictionary import ICFL, Codes, ICFLConfig, codes_to_csr, evaluate
from napari_concept_discovery.dictionary.metrics import (
    activation_counts,
    dead_mask,
    fvu,
    l0,
    mean_cosine,
)
from napari_concept_discovery.errors import DictionaryError

LABELS = ["A", "A", "B", "B", "C", "C"]
# f0 active on tokens 0, 1 (A) and 2 (B); f1 on token 4 (C); f2 never
CODES = sp.csr_matrix(
    np.array([[1.0, 0, 0], [2.0, 0, 0], [0.5, 0, 0], [0, 0, 0], [0, 3.0, 0], [0, 0, 0]])
)


def test_selectivity_hand_computed():
    s = selectivity(CODES, LABELS, "cond")
    assert s.values == ["A", "B", "C"]
    np.testing.assert_allclose(s.p_active[:, :2], [[1, 0], [0.5, 0], [0, 0.5]])
    # avg = P(active | i) - P(active | not i)
    np.testing.assert_allclose(s.avg[:, 0], [1 - 1 / 4, 0.5 - 2 / 4, 0 - 3 / 4])
    np.testing.assert_allclose(s.avg[:, 1], [0 - 1 / 4, 0 - 1 / 4, 0.5 - 0])
    # max = P(active | i) - max_j!=i P(active | j)
    np.testing.assert_allclose(s.max[:, 0], [1 - 0.5, 0.5 - 1, 0 - 1])
    np.testing.assert_allclose(s.max[:, 1], [0 - 0.5, 0 - 0.5, 0.5 - 0])
    np.testing.assert_allclose(s.avg[:, 2], 0)
    assert s.counts() == {
        "n_avg_above_0.5": 1,
        "n_avg_above_0.2": 2,
        "n_max_above_0.5": 0,
        "n_max_above_0.2": 2,
    }
    best = s.best_per_value("avg")
    assert best["feature"].tolist() == [0, 0, 1]


def test_selectivity_report_and_feature_table():
    table = pd.DataFrame({"cond": LABELS, "plate": ["P1", "P2"] * 3})
    best, counts, _ = selectivity_report(CODES, table, ["cond", "plate"])
    assert set(best["column"]) == {"cond", "plate"}
    assert counts.set_index("column").loc["cond", "n_avg_above_0.2"] == 2
    ft = feature_table(CODES, table, ["cond", "plate"], top_n=2)
    assert ft["n_active"].tolist() == [3, 1, 0]
    np.testing.assert_allclose(ft["frequency"], [0.5, 1 / 6, 0])
    np.testing.assert_allclose(ft["mean_activation"], [3.5 / 3, 3.0, 0])
    assert ft.loc[0, "top_label"] == "A" and ft.loc[0, "top_column"] == "cond"
    assert ft.loc[0, "selectivity_avg"] == pytest.approx(0.75)
    assert ft.loc[0, "selectivity_max"] == pytest.approx(0.5)
    assert ft.loc[1, "top_label"] == "C"
    assert ft["top_tokens"].tolist() == [[1, 0], [4], []]
    with pytest.raises(DictionaryError, match="no column 'well'"):
        selectivity_report(CODES, table, ["well"])


def test_feature_auroc_matches_sklearn_with_ties_and_negative_codes():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    n, m = 300, 12
    dense = np.where(rng.random((n, m)) < 0.2, rng.integers(-2, 4, (n, m)).astype(float), 0.0)
    y = rng.random(n) < 0.3
    dense[y, 3] += 5  # one informative feature
    got = feature_auroc(sp.csr_matrix(dense), y)
    ref = [roc_auc_score(y, dense[:, j]) for j in range(m)]
    np.testing.assert_allclose(got, ref, atol=1e-12)
    truth = pd.DataFrame({"mitotic": y, "kind": np.where(y, "x", "y")})
    table = concept_auroc(sp.csr_matrix(dense), truth, ["mitotic", "kind"])
    row = table.set_index("concept").loc["mitotic"]
    assert row["best_feature"] == 3 and row["auroc"] == pytest.approx(max(ref))
    assert set(table["concept"]) == {"mitotic", "kind=x", "kind=y"}


def test_metrics_match_their_definitions():
    rng = np.random.default_rng(1)
    d, m = 8, 20
    model = ICFL(d, ICFLConfig(n_atoms=m, n_iter=2, n_pick=2))
    x = rng.standard_normal((500, d)).astype(np.float32)
    res, codes = evaluate(model, x, batch_size=64, return_codes=True)
    with torch.no_grad():
        c = model.encode(torch.from_numpy(x))
        x_hat = model.decode(c).numpy()
    direct = np.sum((x - x_hat) ** 2) / np.sum((x - x.mean(0)) ** 2)
    assert res["fvu"] == pytest.approx(direct, rel=1e-5)
    assert res["fvu"] == pytest.approx(fvu(x, x_hat), rel=1e-5)
    assert res["mean_cosine"] == pytest.approx(mean_cosine(x, x_hat), rel=1e-5)
    assert res["l0"] == pytest.approx(l0(codes_to_csr(c, m)))
    assert res["l0"] <= 4
    counts = np.bincount(codes.indices, minlength=m)
    assert res["n_dead"] == int(((counts == 0) | (counts < 1e-5 * 500)).sum())


def test_activation_counts_count_tokens_per_feature():
    m = sp.csr_matrix(np.array([[1.0, 0, 2.0, 0], [0, 0, 3.0, 0], [0, 0, 1.0, 0]]))
    m.data[0] = 0.0  # an explicit zero is not an activation
    assert activation_counts(m).tolist() == [0, 0, 3, 0]
    assert activation_counts(m.tocsc()).tolist() == [0, 0, 3, 0]


def test_dead_mask_threshold_and_repeated_indices():
    assert dead_mask(np.array([0, 1, 5]), 200_000).tolist() == [True, True, False]
    c = Codes(torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[3, 3, 1]]))
    csr = codes_to_csr(c, 5)
    assert csr.nnz == 1 and csr[0, 3] == 3.0  # repeats summed, the zero slot is not active
    assert l0(csr) == 1


def test_write_analysis_parquet_and_h5ad(tmp_path):
    import anndata as ad

    table = pd.DataFrame({"cond": LABELS, "plate": ["P1", "P2"] * 3, "mitotic": [True, False] * 3})
    paths = write_analysis(
        tmp_path, CODES, table, ["cond"], meta={"method": "icfl"}, truth_columns=["mitotic"]
    )
    feats = pd.read_parquet(paths["features"])
    assert len(feats) == 3 and feats.loc[0, "top_label"] == "A"
    long = pd.read_parquet(paths["codes"])
    back = sp.csr_matrix((long["code"], (long["token"], long["feature"])), shape=(6, 3))
    np.testing.assert_array_equal(back.toarray(), CODES.toarray())
    adata = ad.read_h5ad(paths["h5ad"])
    assert adata.shape == (6, 3) and sp.issparse(adata.X)
    np.testing.assert_array_equal(adata.X.toarray(), CODES.toarray())
    assert adata.obs["cond"].tolist() == LABELS
    assert pd.read_parquet(paths["concepts"])["concept"].tolist() == ["mitotic"]
