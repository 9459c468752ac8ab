"""`concept-discovery train` and `analyze` on a real activation store built from small_plates.

The store (``tiny_store_path`` in conftest) is written by the real embedding code with a tiny
randomly initialised channel-agnostic ViT, so the test does not depend on the bundled weights.
"""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from fault_helpers import run_cli
from helpers import fvu_by_hand
from napari_concept_discovery.cli import main
from napari_concept_discovery.dictionary import load_dictionary, save_dictionary
from napari_concept_discovery.dictionary.settings import WhitenSettings
from napari_concept_discovery.embed.store import ActivationStore


def assert_best_aurocs(concepts: pd.DataFrame, adata) -> None:
    """Each concept's AUROC is the best single-feature AUROC sklearn finds on the codes."""
    from sklearn.metrics import roc_auc_score

    codes = adata.X.toarray()
    for row in concepts.itertuples():
        column, _, value = row.concept.partition("=")
        member = np.asarray(adata.obs[column]).astype(str) == (value or "True")
        scores = [roc_auc_score(member, codes[:, j]) for j in range(codes.shape[1])]
        assert row.auroc == pytest.approx(max(scores), abs=1e-9), row.concept
        assert scores[row.best_feature] == pytest.approx(row.auroc, abs=1e-9), row.concept


@pytest.mark.parametrize(
    "method,extra", [("icfl", ["--J", "2", "--L", "2"]), ("topk", ["--sparsity", "4"])]
)
def test_train_and_analyze_from_the_command_line(
    tiny_store_path, small_plates, tmp_path, capsys, method, extra
):
    dict_path = tmp_path / f"{method}.safetensors"
    args = [
        "train",
        str(tiny_store_path),
        "--method",
        method,
        "--unit",
        "cell",
        "--whiten",
        "well_type=negative_control",
        "--whiten-by",
        "plate",
        "--atoms",
        "48",
        "--steps",
        "30",
        "--batch-size",
        "64",
        "--seed",
        "1",
        "--out",
        str(dict_path),
        *extra,
    ]
    assert main(args) == 0
    assert "FVU" in capsys.readouterr().out
    d = load_dictionary(dict_path)
    # by default a whitened, a within-type (the controls mix cell types) and a centred part of
    # 48 atoms each, in one file
    assert d.view_names == ("whitened", "within-type", "centred")
    assert d.model.method == method and [p.n_atoms for _, p in d.parts] == [48, 48, 48]
    assert d.part("within-type").meta.whitening.within == "cell_type"
    assert d.meta.model_id == "tiny-random" and d.meta.block == 1 and d.meta.unit == "cell"
    assert d.meta.whitening == WhitenSettings(
        "well_type=negative_control", by="plate", mode="pca", shrinkage="auto"
    )
    assert d.meta.tokens == "concat"  # the store keeps channel tokens: the default form
    assert d.whitener.groups_ == ("SYNTH_1", "SYNTH_2") and d.meta.steps == 30
    assert d.part("centred").meta.whitening.mode == "center"
    # each part's recorded FVU is the one the tokens give, and each explains something; the
    # whole's is their mean
    store = ActivationStore.open(tiny_store_path)
    fvus = []
    for view, part in d.parts:
        fvu = fvu_by_hand(part, store.tokens("cell", d.token_form), store.table("cell"))
        assert d.meta.metrics["views"][view]["fvu"] == pytest.approx(fvu, rel=1e-5) and fvu < 0.8
        fvus.append(fvu)
    assert d.meta.metrics["fvu"] == pytest.approx(np.mean(fvus), rel=1e-5)

    out = tmp_path / "analysis"
    rc = main(
        [
            "analyze",
            str(tiny_store_path),
            str(dict_path),
            "--labels",
            "well_type,perturbation",
            "--truth-file",
            str(small_plates / "truth.csv"),
            "--truth",
            "mitotic,cell_type",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    feats = pd.read_parquet(out / "features.parquet")
    assert len(feats) == 144 and {"frequency", "top_label", "selectivity_avg", "top_tokens"} <= set(
        feats.columns
    )
    assert feats["view"].tolist() == ["whitened"] * 48 + ["within-type"] * 48 + ["centred"] * 48
    adata = ad.read_h5ad(out / "codes.h5ad")
    assert sp.issparse(adata.X) and adata.shape[1] == 144
    assert {"plate", "well", "well_type", "mitotic"} <= set(adata.obs.columns)
    long = pd.read_parquet(out / "codes.parquet")
    assert len(long) == adata.X.nnz and long["token"].max() < adata.shape[0]
    concepts = pd.read_parquet(out / "concepts.parquet")
    assert set(concepts["concept"]) == {
        "mitotic",
        "cell_type=HEPG2",
        "cell_type=HUVEC",
        "cell_type=U2OS",
    }
    assert_best_aurocs(concepts, adata)
    counts = pd.read_parquet(out / "selectivity_counts.parquet")
    assert counts["column"].tolist() == ["well_type", "perturbation"]


def test_cli_refusals(tiny_store_path, tmp_path, capsys):
    base = [
        "train",
        str(tiny_store_path),
        "--atoms",
        "16",
        "--sparsity",
        "4",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "d.safetensors"),
    ]
    assert main(base) == 2
    assert "--whiten COLUMN=VALUE" in capsys.readouterr().err
    assert main([*base, "--whiten", "well_type=control"]) == 2
    err = capsys.readouterr().err
    assert "well_type == 'control'" in err and "'negative_control'" in err
    assert main([*base, "--no-whiten", "--batch-size", "32"]) == 0
    d = load_dictionary(tmp_path / "d.safetensors")
    assert d.whitener is None and d.meta.whitening is None
    # a dictionary from another block is refused with both sides named
    d.meta = d.meta.replace(block=5)
    other = save_dictionary(tmp_path / "other.safetensors", d.model, None, d.meta)
    assert main(["analyze", str(tiny_store_path), str(other), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "'tiny-random' block 5" in err and "block 1" in err and not (tmp_path / "a").exists()


def test_train_says_how_the_whitening_covariance_was_estimated(tiny_store_path, tmp_path):
    """A script's view (a fresh process): the store's controls hold three cell types, so auto
    estimates the covariance within cell_type and says so, with its reason, on stderr and in
    the JSON summary; the default pools, and says that auto would not; a column that is not
    there is refused."""
    base = [
        "train",
        str(tiny_store_path),
        "--atoms",
        "8",
        "--sparsity",
        "2",
        "--L",
        "2",
        "--steps",
        "2",
        "--batch-size",
        "64",
        "--views",
        "whitened",
        "--whiten",
        "well_type=negative_control",
    ]
    auto = run_cli(
        "--json", *base, "--whiten-within", "auto", "--out", str(tmp_path / "auto.safetensors")
    )
    assert auto.returncode == 0, auto.stderr
    summary = json.loads(auto.stdout)
    assert summary["whiten_within"] == "cell_type"
    assert summary["within_chosen"] == (
        "covariance within cell_type: the controls hold 3 values of it (HEPG2, HUVEC, U2OS), "
        "whose difference pooled whitening would scale away (--whiten-within none pools them)"
    )
    assert f"whitening: {summary['within_chosen']}" in auto.stderr
    pooled = run_cli("--json", *base, "--out", str(tmp_path / "p.safetensors"))
    assert pooled.returncode == 0, pooled.stderr
    assert json.loads(pooled.stdout)["whiten_within"] is None
    assert (
        "whitening: pooled (--whiten-within none); the controls mix cell_type: "
        "--whiten-within auto keeps it\n"
    ) in pooled.stderr
    assert load_dictionary(tmp_path / "p.safetensors").meta.whitening.within is None
    bad = run_cli(*base, "--whiten-within", "cell_line", "--out", str(tmp_path / "b.safetensors"))
    assert bad.returncode == 2
    assert "--whiten-within (within): no column 'cell_line'" in bad.stderr
    assert not (tmp_path / "b.safetensors").exists()
    # --views names a subset in any order (aliases too); an unknown view is refused by name
    i = base.index("--views") + 1
    either = [*base[:i], "centered, whitened", *base[i + 1 :]]
    both = run_cli("--json", *either, "--out", str(tmp_path / "v.safetensors"))
    assert both.returncode == 0, both.stderr
    assert load_dictionary(tmp_path / "v.safetensors").view_names == ("whitened", "centred")
    unknown = [*base[:i], "whitened,cell-cycle", *base[i + 1 :]]
    bad = run_cli(*unknown, "--out", str(tmp_path / "u.safetensors"))
    assert bad.returncode == 2
    assert "views: cell-cycle; give one or more of whitened,within-type,centred" in bad.stderr
    assert not (tmp_path / "u.safetensors").exists()
