"""The well-level test: a known effect is found, a null perturbation has no significant
feature, plate effects do not make one, and Benjamini-Hochberg matches its definition."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from napari_concept_discovery.analysis.profiles import concept_profiles
from napari_concept_discovery.analysis.welltest import benjamini_hochberg


def _well_rows(plate: str, w: int, pert: str, cells: int, **extra) -> list[dict]:
    """The table rows of well ``w``'s ``cells`` cells (control wells: ``pert == "control"``)."""
    kind = "negative_control" if pert == "control" else "treatment"
    return [
        {"plate": plate, "well": f"W{w:02d}", "label": c + 1, "perturbation": pert, **extra}
        | {"well_type": kind}
        for c in range(cells)
    ]


def _plate_table(seed=0, m=40, cells=30, effect=1.0):
    """Two plates of 6 control wells, 3 wells of ``hit`` and 3 of ``null``: every feature's code
    per cell is well noise + cell noise (with a plate offset on plate 2); ``hit`` raises
    feature 7 by ``effect`` in 40% of its cells; ``null`` changes nothing."""
    rng = np.random.default_rng(seed)
    rows, codes = [], []
    for plate, offset in (("P1", 0.0), ("P2", 0.3)):
        layout = ["control"] * 6 + ["hit"] * 3 + ["null"] * 3
        for w, pert in enumerate(layout):
            well_effect = rng.normal(0, 0.05, m)
            x = np.maximum(rng.normal(0.5 + offset + well_effect, 0.3, (cells, m)), 0)
            if pert == "hit":
                x[rng.random(cells) < 0.4, 7] += effect
            codes.append(x)
            rows += _well_rows(plate, w, pert, cells)
    return sp.csr_matrix(np.vstack(codes)), pd.DataFrame(rows)


def test_known_effect_is_significant_and_the_null_perturbation_has_nothing():
    codes, table = _plate_table()
    prof = concept_profiles(codes, table, "perturbation", "well_type=negative_control", seed=1)
    t = prof.table()
    sig = t[t["significant"]]
    assert set(zip(sig["value"], sig["feature"], strict=True)) == {("hit", 7)}
    assert t.loc[t["value"] == "control", "q_value"].isna().all()
    hit7 = t[(t["value"] == "hit") & (t["feature"] == 7)].iloc[0]
    assert hit7["p_value"] < 1e-3 and hit7["q_value"] <= 0.05
    # seeded: the same seed gives the same p-values
    again = concept_profiles(codes, table, "perturbation", "well_type=negative_control", seed=1)
    np.testing.assert_array_equal(again.table()["p_value"], t["p_value"])
    assert prof.significant().sum() == 1


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_without_an_effect_no_feature_is_significant(seed):
    codes, table = _plate_table(seed, effect=0.0)  # "hit" is now a null too
    prof = concept_profiles(codes, table, "perturbation", "well_type=negative_control", seed=seed)
    assert not prof.table()["significant"].any()


def test_benjamini_hochberg_by_definition():
    p = np.array([0.01, 0.04, 0.03, 0.2, np.nan])
    # sorted 0.01, 0.03, 0.04, 0.2 (n=4): 0.04, 0.06, 0.0533, 0.2 -> monotone from the top
    np.testing.assert_allclose(
        benjamini_hochberg(p), [0.04, 0.0533333, 0.0533333, 0.2, np.nan], rtol=1e-5
    )


def _two_cell_types(seed=0, m=20, cells=25):
    """Four plates, each with 3 control wells of cell type A and 9 of B, 4 wells of ``hit`` and
    4 of ``null``, both in A only. Feature 3 is higher in B's cells by 1.0 (a cell-type
    feature); ``hit`` raises feature 7 in 40% of its cells; ``null`` changes nothing."""
    rng = np.random.default_rng(seed)
    rows, codes = [], []
    for plate in ("P1", "P2", "P3", "P4"):
        layout = [("control", "A")] * 3 + [("control", "B")] * 9
        layout += [("hit", "A")] * 4 + [("null", "A")] * 4
        for w, (pert, cell_type) in enumerate(layout):
            x = np.maximum(rng.normal(0.5 + rng.normal(0, 0.05, m), 0.3, (cells, m)), 0)
            if cell_type == "B":
                x[:, 3] += 1.0
            if pert == "hit":
                x[rng.random(cells) < 0.4, 7] += 1.0
            codes.append(x)
            rows += _well_rows(plate, w, pert, cells, cell_type=cell_type)
    return sp.csr_matrix(np.vstack(codes)), pd.DataFrame(rows)


def _significant(prof) -> set[tuple[str, int]]:
    t = prof.table()
    sig = t[t["significant"]]
    return set(zip(sig["value"], sig["feature"], strict=True))


@pytest.mark.parametrize("seed", [0, 1])
def test_wells_of_one_cell_type_are_ranked_against_controls_of_that_type(seed):
    codes, table = _two_cell_types(seed)
    control = "well_type=negative_control"
    # ranked within plates alone, the null's wells (all A) rank below the B control wells on the
    # cell-type feature: a concept from nothing
    plates_only = concept_profiles(codes, table, "perturbation", control, seed=seed, strata=None)
    assert plates_only.strata == ("plate",)
    assert ("null", 3) in _significant(plates_only)
    # by default the test ranks within plate and cell type: the hit alone is found
    prof = concept_profiles(codes, table, "perturbation", control, seed=seed)
    assert prof.strata == ("plate", "cell_type")
    assert _significant(prof) == {("hit", 7)}
    # the cell-type column itself is tested within plates (not within its own values)
    by_type = concept_profiles(codes, table, "cell_type", control, seed=seed)
    assert by_type.strata == ("plate",)


def test_strata_named_outright_must_exist():
    codes, table = _plate_table()
    with pytest.raises(Exception, match="cell_line"):
        concept_profiles(
            codes, table, "perturbation", "well_type=negative_control", strata="cell_line"
        )
