"""Feature families: split copies of one direction are one family, unrelated features are not,
and the family's summed code recovers a concept its members split between them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from napari_concept_discovery.analysis.families import (
    concept_families,
    family_table,
    feature_families,
)


def _split_concept(seed=0, n=900, d=64):
    """Atoms 0-2: copies of one direction (pairwise cosine about 0.9), each active on its own
    third of the concept's 300 cells; atoms 3-7 random directions active on random cells."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    copies = u + 0.3 * rng.normal(size=(3, d)) / np.sqrt(d)
    others = rng.normal(size=(5, d))
    atoms = np.vstack([copies, others])
    concept = np.zeros(n, bool)
    concept[:300] = True
    rows, cols = [], []
    for i in range(3):  # member i fires on cells 100*i .. 100*i+99 of the concept
        rows += list(range(100 * i, 100 * (i + 1)))
        cols += [i] * 100
    for j in range(3, 8):
        on = rng.choice(n, 90, replace=False)
        rows += on.tolist()
        cols += [j] * 90
    values = rng.uniform(0.5, 1.0, len(rows))
    codes = sp.csr_matrix((values, (rows, cols)), shape=(n, 8))
    return atoms, codes, concept


def test_split_copies_form_one_family_and_unrelated_features_none():
    atoms, codes, _ = _split_concept()
    fam = feature_families(atoms, codes)
    assert fam[0] == fam[1] == fam[2] == 0
    assert (fam[3:] == -1).all()


def test_features_that_fire_together_form_a_family_whatever_their_directions():
    rng = np.random.default_rng(1)
    atoms = rng.normal(size=(4, 64))  # nearly orthogonal
    on = rng.random(500) < 0.3
    codes = sp.csr_matrix(
        np.column_stack([on, on, rng.random(500) < 0.3, rng.random(500) < 0.3]).astype(float)
    )
    fam = feature_families(atoms, codes)
    assert fam[0] == fam[1] == 0 and fam[2] == fam[3] == -1


def test_the_family_summed_code_recovers_a_split_concept():
    atoms, codes, concept = _split_concept()
    fam = feature_families(atoms, codes)
    table = pd.DataFrame({"truth": concept, "group": np.where(concept, "a", "b")})
    fams = family_table(codes, fam, table, ["group"], ["truth"])
    row = fams.iloc[0]
    assert row["members"] == "0 1 2" and row["n_members"] == 3
    # one member fires on a third of the concept and nowhere else: AUROC 1/3 + 2/3 * 0.5
    assert row["auroc_best_member"] == pytest.approx(2 / 3, abs=1e-9)
    assert row["auroc_family"] == pytest.approx(1.0)
    assert row["concept"] == "truth"
    # selectivity (avg form) of the summed code for group=a: P(active | a) - P(active | b) = 1
    assert (row["top_column"], row["top_label"]) == ("group", "a")
    assert row["selectivity_family"] == pytest.approx(1.0)
    assert row["selectivity_best_member"] == pytest.approx(1 / 3)
    per_concept = concept_families(codes, fam, table, ["truth"])
    assert per_concept.loc[0, "best_family"] == 0
    assert per_concept.loc[0, "family_auroc"] == pytest.approx(1.0)


def test_families_are_deterministic_and_empty_without_kin():
    atoms, codes, _ = _split_concept()
    np.testing.assert_array_equal(feature_families(atoms, codes), feature_families(atoms, codes))
    rng = np.random.default_rng(2)
    lone = feature_families(rng.normal(size=(6, 64)), sp.identity(6, format="csr"))
    assert (lone == -1).all()
    assert family_table(sp.identity(6, format="csr"), lone).empty
