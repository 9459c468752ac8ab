"""``--whiten-within auto``: the controls' covariance within the cell-type column where the
controls mix cell types, pooled otherwise; resolved once against the token table and recorded."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_concept_discovery.dictionary import WhitenSettings, load_dictionary, train_on_store
from napari_concept_discovery.dictionary.control import Control
from napari_concept_discovery.dictionary.within import (
    cell_type_column,
    resolve_within,
    resolved_whitening,
)
from napari_concept_discovery.embed.store import ActivationStore
from napari_concept_discovery.errors import DictionaryError

CONTROLS = "well_type=negative_control"
CONTROL = Control("well_type", "negative_control")


def table(kinds_of_controls: list[str], column: str = "cell_type") -> pd.DataFrame:
    """Two plates; control rows of the given cell types, treated rows of a third."""
    rows = []
    for plate in ("P1", "P2"):
        rows += [
            {"plate": plate, column: k, "well_type": "negative_control"} for k in kinds_of_controls
        ]
        rows += [{"plate": plate, column: "C", "well_type": "treatment"}]
    return pd.DataFrame(rows)


def test_auto_resolves_to_the_cell_type_column_where_controls_mix_cell_types():
    column, why = resolve_within(table(["A", "B", "A"]), CONTROL, "auto")
    assert column == "cell_type"
    assert why.startswith("covariance within cell_type: the controls hold 2 values of it (A, B)")
    # one cell type among the controls (the treated wells' C does not count): pooled
    column, why = resolve_within(table(["A", "A"]), CONTROL, "auto")
    assert column is None and why.startswith("pooled: the controls hold one cell_type (A)")
    # whitened per plate and cell type: each group's controls hold one type, nothing to keep
    column, why = resolve_within(table(["A", "B"]), CONTROL, "auto", by="plate,cell_type")
    assert column is None and "in each plate,cell_type group (A, B)" in why
    # per plate only: each plate's controls still mix A and B
    assert resolve_within(table(["A", "B"]), CONTROL, "auto", by="plate")[0] == "cell_type"
    # no cell-type column: pooled, and said so
    column, why = resolve_within(table(["A", "B"]).drop(columns="cell_type"), CONTROL, "auto")
    assert column is None and why.startswith("pooled: the table has no cell-type column")


def test_the_cell_type_column_is_found_by_its_usual_names():
    assert cell_type_column(["plate", "Metadata_CellLine", "well"]) == "Metadata_CellLine"
    assert cell_type_column(["cell_line", "Cell_Type"]) == "Cell_Type"  # cell_type first
    assert cell_type_column(["plate", "cell-type"]) == "cell-type"
    assert cell_type_column(["plate", "celltypes", "line"]) is None
    column, _ = resolve_within(table(["x", "y"], "Metadata_Cell_Line"), CONTROL, "auto")
    assert column == "Metadata_Cell_Line"


def test_none_and_named_columns_and_bad_names():
    t = table(["A", "B"])
    # pooled, with the hint that the controls mix cell types (and none without that)
    assert resolve_within(t, CONTROL, None) == (
        None,
        "pooled (--whiten-within none); the controls mix cell_type: --whiten-within auto keeps it",
    )
    assert resolve_within(table(["A"]), CONTROL, "none") == (None, "pooled (--whiten-within none)")
    assert resolve_within(t, CONTROL, "plate") == ("plate", "covariance within plate (as given)")
    with pytest.raises(
        DictionaryError,
        match=r"^--whiten-within \(within\): no column 'cell_typ' to estimate the controls' "
        r"covariance within; columns are 'plate', 'cell_type', 'well_type' \(or auto",
    ):
        resolve_within(t, CONTROL, "cell_typ")
    with pytest.raises(DictionaryError, match=r"no column 'line' to estimate"):
        resolve_within(t, CONTROL, "plate, line")
    # centring alone has no covariance: within is None whatever was asked
    settings, why = resolved_whitening(WhitenSettings(CONTROLS, mode="center"), t)
    assert settings.within is None and why.startswith("centring only")
    with pytest.raises(DictionaryError, match="within='auto' names no column yet"):
        WhitenSettings(CONTROLS, within="auto").whitener().fit(np.zeros((4, 2)))


def test_training_records_the_resolved_choice(tiny_store_path, small_train, tmp_path):
    """The tiny store's controls hold three cell types: auto whitens within cell_type, and
    the dictionary (both views and the whole) records the column and why; none (the default)
    pools."""
    store = ActivationStore.open(tiny_store_path)
    controls = store.table("cell").query("well_type == 'negative_control'")
    assert controls["cell_type"].nunique() == 3
    out = tmp_path / "auto.safetensors"
    trained = train_on_store(
        store,
        small_train(
            steps=3, views="whitened,centred", whiten=WhitenSettings(CONTROLS, within="auto")
        ),
        out=out,
    )
    d = load_dictionary(out)
    assert d.meta.whitening.within == "cell_type"
    assert d.meta.within_chosen.startswith("covariance within cell_type: the controls hold 3")
    assert d.part("whitened").whitener.within == "cell_type"
    assert d.part("whitened").meta.within_chosen == d.meta.within_chosen
    assert d.part("centred").meta.whitening.within is None  # centring estimates no covariance
    assert trained.dictionary.meta.within_chosen == d.meta.within_chosen
    pooled = train_on_store(
        store,
        small_train(steps=3, views="whitened", whiten=WhitenSettings(CONTROLS)),
    ).dictionary
    assert pooled.meta.whitening.within is None and pooled.whitener.within is None
    assert pooled.meta.within_chosen.startswith("pooled (--whiten-within none); the controls mix")
    # the two whitenings differ: within cell types keeps the types' difference unscaled
    auto_t = d.part("whitened").whitener.transform_
    assert not np.allclose(auto_t, pooled.whitener.transform_)
    # a column that is not there is refused before any training, by the option's name
    with pytest.raises(DictionaryError, match="no column 'cell_line' to estimate"):
        train_on_store(
            store, small_train(steps=3, whiten=WhitenSettings(CONTROLS, within="cell_line"))
        )


def test_without_hints_drops_the_pointer_to_the_other_setting():
    """Beside the within-type view a reason's pointer to the other --whiten-within setting is
    that view itself: both kinds of pointer go, the reason stays."""
    from napari_concept_discovery.dictionary.within import without_hints

    _, pooled = resolve_within(table(["A", "B"]), CONTROL, None)
    _, within = resolve_within(table(["A", "B"]), CONTROL, "auto")
    assert without_hints(pooled) == "pooled (--whiten-within none)"
    assert without_hints(within) == (
        "covariance within cell_type: the controls hold 2 values of it (A, B), whose "
        "difference pooled whitening would scale away"
    )
    assert (
        without_hints("covariance within plate (as given)") == "covariance within plate (as given)"
    )
