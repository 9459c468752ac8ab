"""The demo runs every step end to end on a tiny plate set and reuses its plates on a rerun."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from napari_concept_discovery.cli import main
from napari_concept_discovery.demo import format_report, run_demo
from test_cli_dictionary import assert_best_aurocs


def test_demo_end_to_end_and_rerun(tmp_path):
    kwargs = dict(n_plates=2, n_wells=6, n_sites=1, size=256, n_atoms=64, steps=30, seed=0)
    result = run_demo(tmp_path / "demo", log=lambda s: None, **kwargs)

    assert result.dictionary.is_file()
    assert result.n_cells > 50
    m = result.metrics
    assert 0.0 <= m["fvu"] < 1.0  # the dictionary explains some of the variance
    assert m["n_atoms"] == 64
    # every true concept gets its best feature and AUROC, as sklearn finds them on the codes
    concepts = result.concepts
    assert {"cell_type=HUVEC", "perturbation=control", "mitotic"} <= set(concepts["concept"])
    adata = ad.read_h5ad(result.analysis / "codes.h5ad")
    assert_best_aurocs(concepts, adata)
    # codes land in AnnData with the cell table as obs, one row per cell token
    assert adata.shape == (result.n_cells, 64)
    assert {"plate", "well", "cell_type", "perturbation", "mitotic"} <= set(adata.obs.columns)
    truth = pd.read_csv(result.plates / "truth.csv")
    assert adata.obs["mitotic"].astype(str).isin(["True", "False"]).all()
    assert len(truth) >= result.n_cells * 0.8

    # both preparations are compared, each with an AUROC per concept group
    assert result.comparison["preparation"].tolist() == ["center", "pca"]
    center = result.comparison.set_index("preparation").loc["center"]
    by_group = concepts.groupby(concepts["concept"].str.split("=").str[0])["auroc"].mean()
    for group, value in by_group.items():  # the analysed dictionary is the first preparation's
        assert center[f"auroc {group}"] == pytest.approx(value)
    assert result.comparison["auroc cell_type"].notna().all()

    report = format_report(result)
    assert "FVU" in report and "cell_type=HUVEC" in report
    # the HTML report is written beside the other outputs and its path printed
    assert result.report == result.out / "report" / "index.html" and result.report.is_file()
    assert f"report: {result.report}" in report
    assert "dictionary-pca" in result.report.read_text()  # both preparations compared

    # a rerun with the same parameters keeps the plates (same files, same mtimes)
    before = {p: p.stat().st_mtime_ns for p in result.plates.rglob("*.png")}
    again = run_demo(tmp_path / "demo", log=lambda s: None, **kwargs)
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
            "--atoms",
            "32",
            "--steps",
            "10",
            "--plates",
            "2",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "best single-feature AUROC" in out
    assert (tmp_path / "d" / "dictionary-center.safetensors").is_file()
    assert (tmp_path / "d" / "dictionary-pca.safetensors").is_file()
    assert "preparation" in out
