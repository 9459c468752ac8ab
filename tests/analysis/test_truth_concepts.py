"""True concepts of a cell table: who is a member, and whom they are judged against."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from napari_concept_discovery.analysis.truth import recovery_table, truth_concepts, well_concepts
from napari_concept_discovery.dictionary.stains import stain_table


def cells() -> pd.DataFrame:
    rows = []

    def add(n, plate, ct, pert, responded=False, mitotic=False):
        rows.extend(
            dict(
                plate=plate,
                cell_type=ct,
                perturbation=pert,
                responded=responded,
                mitotic=mitotic,
            )
            for _ in range(n)
        )

    add(20, "P1", "A", "control")
    add(20, "P1", "B", "control")
    add(20, "P2", "A", "control", mitotic=True)
    add(12, "P1", "A", "drug", responded=True)
    add(8, "P1", "A", "drug")  # non-responders of the treated well
    add(15, "P2", "A", "null")
    add(5, "P2", "B", "rare", responded=True)  # too few members
    return pd.DataFrame(rows)


def test_members_and_matched_controls():
    table = cells()
    found = {c.name: c for c in truth_concepts(table)}
    assert list(found) == ["A", "B", "mitotic", "drug", "null"]
    assert found["A"].kind == "cell type" and found["A"].member.sum() == 75
    drug = found["drug"]
    # responders only, against controls of the same plate and cell type (P1/A; not P1/B, not
    # P2) and against the same well's non-responders
    assert drug.kind == "perturbation" and drug.member.sum() == 12
    others = table.iloc[drug.rows[~drug.member]]
    assert others["perturbation"].value_counts().to_dict() == {"control": 20, "drug": 8}
    assert set(zip(others.plate, others.cell_type, strict=True)) == {("P1", "A")}
    # no cell of "null" responds: all its cells are members, judged against P2/A controls
    null = found["null"]
    assert null.kind == "null perturbation" and null.member.sum() == 15
    assert len(null.rows) == 35


def test_recovery_table_finds_the_best_feature_and_its_stain():
    table = cells()
    concepts = truth_concepts(table)
    n = len(table)
    codes = np.zeros((n, 3))
    drug = (table.perturbation == "drug") & table.responded
    codes[drug.to_numpy(), 2] = 1.0  # feature 2 fires on the drug's responders only
    codes[(table.cell_type == "B").to_numpy(), 0] = 0.5
    stains = stain_table(np.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]]), ["DNA", "ER"])
    out = recovery_table(sp.csr_matrix(codes), concepts, stains).set_index("concept")
    assert out.loc["drug", "best_feature"] == 2 and out.loc["drug", "auroc"] == 1.0
    assert out.loc["drug", "top_stain"] == "ER" and out.loc["drug", "stain_share"] == 0.8
    assert out.loc["B", "best_feature"] == 0 and out.loc["B", "top_stain"] == "DNA"
    assert out.loc["null", "auroc"] == 0.5  # nothing fires on it: chance


def test_well_concepts_for_crops():
    """Crops know only their well: every crop of a treated well is a member, judged against the
    control crops of the same plate and cell type; no subpopulation; nulls as told."""
    rows = []
    for plate, ct, pert, n in (
        ("P1", "A", "control", 4),
        ("P1", "B", "control", 4),
        ("P2", "A", "control", 4),
        ("P1", "A", "drug", 4),
        ("P2", "A", "null", 4),
        ("P2", "B", "orphan", 4),  # no control crops of P2/B: cannot be judged
        ("P1", "A", "tiny", 1),
    ):
        rows += [dict(plate=plate, cell_type=ct, perturbation=pert)] * n
    table = pd.DataFrame(rows)
    found = {c.name: c for c in well_concepts(table, ["null"])}
    assert list(found) == ["A", "B", "drug", "null"]
    assert found["A"].member.sum() == 17 and found["B"].member.sum() == 8
    drug = found["drug"]
    assert drug.kind == "perturbation" and drug.member.sum() == 4
    others = table.iloc[drug.rows[~drug.member]]
    assert set(zip(others.plate, others.cell_type, others.perturbation, strict=True)) == {
        ("P1", "A", "control")
    }
    assert found["null"].kind == "null perturbation" and len(found["null"].rows) == 8
    codes = np.zeros((len(table), 2))
    codes[(table.perturbation == "drug").to_numpy(), 1] = 1.0
    out = recovery_table(sp.csr_matrix(codes), list(found.values())).set_index("concept")
    assert out.loc["drug", "best_feature"] == 1 and out.loc["drug", "auroc"] == 1.0
