"""The demo runs every step end to end on a tiny plate set and reuses its plates on a rerun."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from napari_concept_discovery.cli import main
from napari_concept_discovery.demo import DemoSettings, format_report, run_demo
from napari_concept_discovery.dictionary import load_dictionary
from napari_concept_discovery.dictionary.overfit import OVERFIT_RATIO


def test_demo_end_to_end_and_rerun(tmp_path):
    settings = DemoSettings(
        plates=2, wells=6, sites=1, size=512, atoms=64, levels="16,M", steps=30, seed=0
    )
    result = run_demo(tmp_path / "demo", settings, log=lambda s: None)

    assert result.dictionary.is_file()
    assert result.n_cells > 50
    m = result.metrics
    assert 0.0 <= m["fvu"] < 1.0  # the dictionary explains some of the variance
    # the default: a whitened, a within-type and a centred part of 64 atoms each
    assert m["n_atoms"] == 192
    assert set(m["views"]) == {"whitened", "within-type", "centred"}
    # every true concept gets a best feature, an AUROC in [0, 1] and the stain that carries it
    concepts = result.concepts
    assert {"HUVEC", "HEPG2", "U2OS", "mitotic"} <= set(concepts["concept"])
    perts = concepts[concepts["kind"] == "perturbation"]
    assert len(perts) >= 1 and "control" not in set(concepts["concept"])
    assert concepts["auroc"].between(0, 1).all()
    names = {"DNA", "ER", "Actin", "RNA", "Mito", "Membrane"}
    assert set(concepts["top_stain"]) <= names and concepts["stain_share"].between(0, 1).all()
    # what each perturbation really changes comes from the generator's declaration
    touched = dict(zip(perts["concept"], perts["stains touched"], strict=True))
    assert touched.get("nuclear_enlargement", "DNA") == "DNA"
    assert all(t in names for t in touched.values())
    # codes land in AnnData with the cell table as obs, one row per cell token
    adata = ad.read_h5ad(result.analysis / "codes.h5ad")
    assert adata.shape == (result.n_cells, 192)
    assert adata.var["view"].tolist() == ["whitened"] * 64 + ["within-type"] * 64 + ["centred"] * 64
    assert {"plate", "well", "cell_type", "perturbation", "mitotic"} <= set(adata.obs.columns)
    truth = pd.read_csv(result.plates / "truth.csv")
    assert adata.obs["mitotic"].astype(str).isin(["True", "False"]).all()
    assert len(truth) >= result.n_cells * 0.8

    # the controls mix cell types: three whitenings are compared, the first (train's
    # default) is analysed
    cells = result.comparison[result.comparison["unit"] == "cell"]
    assert cells["whitening"].tolist() == ["controls", "per cell type", "within cell type"]
    # auto resolves to cell_type on these controls; "controls" pools them
    assert cells["covariance within"].tolist() == ["-", "-", "cell_type"]
    # the pooled whitening gets the within-type view beside it; whitened per cell type or
    # within cell type already, that view would be the same whitening and is left out
    pooled = load_dictionary(result.out / "dictionary-controls.safetensors")
    assert pooled.view_names == ("whitened", "within-type", "centred")
    assert pooled.part("within-type").whitener.within == "cell_type"
    for other in ("per-cell-type", "within-cell-type"):
        d = load_dictionary(result.out / f"dictionary-{other}.safetensors")
        assert d.view_names == ("whitened", "centred"), other
    # and a dictionary on crop tokens (no segmentation), judged at the well level
    crops = result.comparison[result.comparison["unit"] == "crop"]
    assert len(crops) == 1 and crops["mitotic"].isna().all()
    assert crops["perturbations"].between(0, 1).all()
    assert (result.out / "dictionary-crops.safetensors").is_file()
    assert load_dictionary(result.out / "dictionary-crops.safetensors").meta.unit == "crop"
    assert result.preparation == "controls"
    assert result.comparison["cell types"].between(0, 1).all()
    assert result.comparison["perturbations"].between(0, 1).all()
    d = load_dictionary(result.dictionary)
    assert d.meta.tokens == "concat" and d.meta.whitening.by == "plate"
    assert result.dictionary == result.out / "dictionary-controls.safetensors"

    # the feature table carries each feature's stains
    features = pd.read_parquet(result.analysis / "features.parquet")
    assert {f"stain_{n}" for n in names} | {"top_stain"} <= set(features.columns)

    # nested levels and feature families reach the analysis and the printed report
    assert result.levels == "16/64" and load_dictionary(result.dictionary).levels == [16, 64]
    assert features["level"].tolist() == ([16] * 16 + [64] * 48) * 3  # each view nested
    # each concept names the view whose feature found it, and the printed report says so
    assert set(concepts["view"]) <= {"whitened", "within-type", "centred"}
    views = features["view"].to_numpy()
    assert (concepts["view"] == views[concepts["best_feature"]]).all()
    assert result.families is not None and "family" in features.columns
    report = format_report(result)
    assert "FVU" in report and "HUVEC" in report and "stains touched" in report
    assert "nested levels: 16/64" in report and "feature families" in report
    assert "family_auroc" in report
    assert "view: the part of the dictionary that found the feature" in report
    assert "MB per site" in report
    # the HTML report is written beside the other outputs and its path printed
    assert result.report == result.out / "report" / "index.html" and result.report.is_file()
    assert f"report: {result.report}" in report
    assert "dictionary-controls" in result.report.read_text()  # the whitenings compared

    # a rerun with the same parameters keeps the plates (same files, same mtimes)
    before = {p: p.stat().st_mtime_ns for p in result.plates.rglob("*.png")}
    again = run_demo(tmp_path / "demo", settings, log=lambda s: None)
    after = {p: p.stat().st_mtime_ns for p in again.plates.rglob("*.png")}
    assert before == after
    np.testing.assert_allclose(again.metrics["fvu"], m["fvu"], rtol=1e-5)


def test_demo_cli(tmp_path, capsys):
    rc = main(
        [
            "demo",
            str(tmp_path / "d"),
            "--wells",
            "6",
            "--size",
            "256",
            "--levels",
            "8,M",
            "--steps",
            "10",
            "--plates",
            "2",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "the best single feature for each" in out
    for name in ("within-cell-type", "controls", "per-cell-type"):
        assert (tmp_path / "d" / f"dictionary-{name}.safetensors").is_file()
    assert "whitening" in out and "top_stain" in out
    assert "nested levels: 8/" in out and "feature families" in out
    assert "atoms (one atom per" in out  # sized to the cells: the rule is said
    # how each whitening's covariance was estimated, and why: the controls mix three types
    assert "    whitening: covariance within cell_type: the controls hold 3 values of it" in out
    # pooled, with the within-type view saying how it estimated its own
    assert (
        "    whitening: pooled (--whiten-within none); within-type view: covariance within "
        "cell_type: the controls hold 3 values of it"
    ) in out
    assert "views whitened + within-type + centred, a part each" in out
    # per plate and cell type: no hint, each group's controls hold one cell type
    assert "    whitening: pooled (--whiten-within none)\n" in out
    assert "covariance within" in out  # the comparison's column
    # the whitening check per dictionary: "7.2x overfits" where other cells' whitened tokens
    # lie far out against the controls' (the demo's plates have fewer control cells than token
    # dimensions), the same figure the dictionary's metrics keep
    assert "whitening check" in out
    d = load_dictionary(tmp_path / "d" / "dictionary-controls.safetensors")
    ratio = d.meta.metrics["whitened_norm_ratio"]
    shown = f"{ratio:.1f}x" + (" overfits" if ratio > OVERFIT_RATIO else "")
    assert shown in out
