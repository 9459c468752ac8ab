"""Whitening that respects groups: fitted on each group's own controls, by any column(s)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_concept_discovery.analysis.encode import encode_store
from napari_concept_discovery.cli import main
from napari_concept_discovery.dictionary import (
    WhitenSettings,
    load_dictionary,
    train_on_store,
)
from napari_concept_discovery.dictionary.pipeline import fit_whitener
from napari_concept_discovery.dictionary.whiten import group_labels, ledoit_wolf_shrinkage
from napari_concept_discovery.embed.store import ActivationStore
from napari_concept_discovery.errors import DictionaryError
from napari_concept_discovery.settings import SettingsError

CONTROLS = "well_type=negative_control"


def two_cell_types(seed: int = 0):
    """Tokens of two cell types far apart, with controls of each, on two plates."""
    rng = np.random.default_rng(seed)
    rows, parts = [], []
    for plate in ("P1", "P2"):
        for ct, offset, scale in (("A", 0.0, 1.0), ("B", 8.0, 3.0)):
            for well_type in ("negative_control", "treatment"):
                n = 150
                parts.append(offset + scale * rng.standard_normal((n, 6)))
                rows += [{"plate": plate, "cell_type": ct, "well_type": well_type}] * n
    return np.vstack(parts), pd.DataFrame(rows)


def test_whiten_by_any_column_fits_each_groups_controls():
    x, table = two_cell_types()
    settings = WhitenSettings(CONTROLS, by="cell_type", shrinkage="none")
    w = fit_whitener(x, table, settings)
    assert w.groups_ == ("A", "B") and w.n_samples_.tolist() == [300, 300]
    w.unit_norm = False
    y = w.transform(x, group_labels(table, "cell_type"))
    ctrl = (table.well_type == "negative_control").to_numpy()
    for ct in ("A", "B"):
        part = y[ctrl & (table.cell_type == ct).to_numpy()]
        np.testing.assert_allclose(part.mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(np.cov(part, rowvar=False), np.eye(6), atol=1e-5)
    # whitening on the mixed controls instead: the cell-type difference is one of the directions
    # it scales to unit variance, so the two types end up much closer than per type
    mixed = fit_whitener(x, table, WhitenSettings(CONTROLS, shrinkage="none"))
    mixed.unit_norm = False
    gap = mixed.transform(x[table.cell_type == "B"]).mean(0)
    assert np.linalg.norm(gap) < 1.5  # 8 raw units apart, about one control SD once whitened


def test_covariance_within_cell_types_keeps_their_difference():
    x, table = two_cell_types()
    # both types with unit control variance, 8 apart in each of the 6 dimensions
    x = np.where((table.cell_type == "B").to_numpy()[:, None], x / 3.0 + 8.0 - 8.0 / 3.0, x)
    settings = WhitenSettings(CONTROLS, within="cell_type", shrinkage="none")
    w = fit_whitener(x, table, settings)
    assert w.within == "cell_type" and w.groups_ == (None,)
    w.unit_norm = False
    y = w.transform(x)
    ctrl = (table.well_type == "negative_control").to_numpy()
    a, b = (ctrl & (table.cell_type == t).to_numpy() for t in ("A", "B"))
    # within each type the controls are white; the types stay ~20 SD apart instead of ~2
    for part in (y[a], y[b]):
        np.testing.assert_allclose(np.cov(part, rowvar=False), np.eye(6), atol=0.25)
    assert np.linalg.norm(y[b].mean(0) - y[a].mean(0)) > 15
    plain = fit_whitener(x, table, WhitenSettings(CONTROLS, shrinkage="none"))
    plain.unit_norm = False
    yp = plain.transform(x)
    assert np.linalg.norm(yp[b].mean(0) - yp[a].mean(0)) < 2.5
    with pytest.raises(
        DictionaryError,
        match=r"^--whiten-within \(within\): no column 'cell_line' to estimate the controls' "
        r"covariance within; columns are 'plate', 'cell_type', 'well_type'",
    ):
        fit_whitener(x, table, WhitenSettings(CONTROLS, within="cell_line"))
    # auto resolves to cell_type on these controls (two cell types): the same whitening
    auto = fit_whitener(x, table, WhitenSettings(CONTROLS, shrinkage="none", within="auto"))
    assert auto.within == "cell_type"
    np.testing.assert_array_equal(auto.transform_, w.transform_)


def test_whiten_by_several_columns_joins_them():
    x, table = two_cell_types()
    w = fit_whitener(x, table, WhitenSettings(CONTROLS, by="plate,cell_type"))
    assert w.groups_ == ("P1 / A", "P1 / B", "P2 / A", "P2 / B")
    assert w.group_by == "plate,cell_type"
    assert group_labels(table.iloc[[0, -1]], "plate, cell_type").tolist() == ["P1 / A", "P2 / B"]


def test_a_group_without_controls_is_named():
    x, table = two_cell_types()
    table.loc[(table.cell_type == "B") & (table.plate == "P2"), "well_type"] = "treatment"
    with pytest.raises(
        DictionaryError,
        match=r"whitening per plate,cell_type needs controls \(well_type == 'negative_control'\) "
        r"in every group, but plate,cell_type 'P2 / B' \(300 tokens\) has none",
    ):
        fit_whitener(x, table, WhitenSettings(CONTROLS, by="plate,cell_type"))
    with pytest.raises(DictionaryError, match=r"no column 'well' to whiten by; columns are"):
        fit_whitener(x, table, WhitenSettings(CONTROLS, by="well"))
    with pytest.raises(SettingsError, match="by: name a table column"):
        WhitenSettings(CONTROLS, by=" , ")
    with pytest.raises(SettingsError, match="shrinkage: must be auto, none or a number"):
        WhitenSettings(CONTROLS, shrinkage="1.5")


def test_ledoit_wolf_shrinkage_matches_scikit_learn():
    from sklearn.covariance import ledoit_wolf_shrinkage as reference

    rng = np.random.default_rng(4)
    for n, d in ((40, 100), (500, 20)):
        x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
        x -= x.mean(0)
        assert ledoit_wolf_shrinkage(x) == pytest.approx(reference(x, assume_centered=True))


def test_train_whiten_by_cell_type_on_a_store_and_encode_it_again(
    tiny_store_path, tmp_path, small_train
):
    store = ActivationStore.open(tiny_store_path)
    out = tmp_path / "d.safetensors"
    args = [
        "train",
        str(store.path),
        "--atoms",
        "12",
        "--sparsity",
        "4",
        "--L",
        "2",
        "--steps",
        "5",
        "--batch-size",
        "64",
        "--whiten",
        CONTROLS,
        "--whiten-by",
        "plate,cell_type",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    d = load_dictionary(out)
    assert len(d.whitener.groups_) == 6 and d.meta.whitening.by == "plate,cell_type"
    # the default: a whitened and a centred part of 12 atoms each, both per plate and cell type
    assert d.view_names == ("whitened", "centred")
    assert [len(p.whitener.groups_) for _, p in d.parts] == [6, 6]
    codes, table = encode_store(store, d)
    assert codes.shape == (len(table), 24)
    # a cell type without controls in the store's table is refused by name
    settings = small_train(
        atoms=12,
        steps=5,
        seed=0,
        whiten=WhitenSettings("perturbation=nuclear_enlargement", by="cell_type"),
    )
    with pytest.raises(
        DictionaryError, match=r"whitening per cell_type needs controls .* has none"
    ):
        train_on_store(store, settings)
