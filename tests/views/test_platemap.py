"""What the plate navigator draws, without Qt: plate formats, geometry, well table, colours."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib import colormaps

from napari_concept_discovery.plate import open_plate
from napari_concept_discovery.views.colours import (
    MISSING,
    category_palette,
    map_values,
    to_hex,
    value_range,
)
from napari_concept_discovery.views.platemap import (
    OTHER,
    GridGeometry,
    PlateGrid,
    colour_bar,
    colour_by_column,
    colour_by_value,
    colour_columns,
    per_well_values,
    well_position,
    well_table,
    well_tooltip,
)


@pytest.fixture(scope="module")
def wells(small_plates):
    return well_table(open_plate(small_plates).site_table())


def test_wells_sit_in_the_smallest_standard_plate():
    assert well_position("B03") == (1, 2) and well_position("aa1") == (26, 0)
    assert PlateGrid.for_wells(["B02", "C04"]) == PlateGrid(3, 4)
    assert PlateGrid.for_wells(["A01", "H12"]) == PlateGrid(8, 12)
    assert PlateGrid.for_wells(["A01", "P24"]) == PlateGrid(16, 24)
    assert PlateGrid.for_wells(["I01"]) == PlateGrid(16, 24)  # 9 rows: no 96-well plate
    assert PlateGrid.for_wells(["AF48"]) == PlateGrid(32, 48)
    assert PlateGrid.for_wells(["AH50"]) == PlateGrid(34, 50)  # beyond 1536: bounding box
    grid = PlateGrid(16, 24)
    assert grid.row_names[:3] == ["A", "B", "C"] and grid.row_names[-1] == "P"
    for well in ("A01", "B07", "P24"):
        assert grid.well(*grid.position(well)) == well
    with pytest.raises(IndexError, match="outside"):
        grid.position("Q01")


@pytest.mark.parametrize("shape", [(3, 4), (8, 12), (32, 48)])
def test_every_well_is_hit_at_its_centre_and_only_there(shape):
    grid = PlateGrid(*shape)
    geo = GridGeometry(grid, 400, 300)
    seen = set()
    for r in range(grid.n_rows):
        for c in range(grid.n_cols):
            x, y, w, h = geo.well_rect(r, c)
            assert w == pytest.approx(h) and w > 0  # round wells need square cells
            assert 0 <= x and x + w <= 400 and 0 <= y and y + h <= 300
            assert geo.well_at(x + w / 2, y + h / 2) == (r, c)
            seen.add((round(x, 3), round(y, 3)))
    assert len(seen) == grid.n_rows * grid.n_cols  # no two wells drawn in one place
    assert geo.well_at(1, 1) is None  # the label margin
    assert geo.well_at(399, 299) is None or shape == (3, 4)
    assert geo.label_step() == (1 if shape != (32, 48) else 2)


def test_well_table_keeps_what_describes_a_well(small_plates, wells):
    sites = open_plate(small_plates).site_table()
    assert len(wells) == len(sites.groupby(["plate", "well"]))
    assert list(wells.columns[:4]) == ["plate", "well", "n_sites", "sites"]
    row = wells.iloc[0]
    first = sites[(sites.plate == row.plate) & (sites.well == row.well)].iloc[0]
    for col in ("cell_type", "perturbation", "well_type", "sirna"):
        assert row[col] == first[col]
    # two sites per well, one value differing between them: that column is dropped
    table = pd.DataFrame(
        {
            "plate": ["P", "P", "P"],
            "well": ["A01", "A01", "A02"],
            "site": [1, 2, 1],
            "dose": [1.0, 1.0, 2.0],
            "note": ["x", "y", "z"],
        }
    )
    out = well_table(table)
    assert out["n_sites"].tolist() == [2, 1] and out["sites"].tolist() == [(1, 2), (1,)]
    assert "dose" in out.columns and "note" not in out.columns


def test_colour_columns_put_the_useful_ones_first(wells):
    columns = colour_columns(wells)
    assert columns[:4] == ["cell_type", "perturbation", "well_type", "sirna"]
    assert "well_id" not in columns  # an identifier: a different colour in every well
    assert "dataset" not in columns  # one value for the whole folder


def test_categories_get_the_same_colour_on_every_plate(wells):
    colouring = colour_by_column(wells, "cell_type")
    assert not colouring.numeric
    by_type: dict[str, set] = {}
    for (plate, well), colour in colouring.colours.items():
        cell_type = wells[(wells.plate == plate) & (wells.well == well)]["cell_type"].item()
        by_type.setdefault(cell_type, set()).add(colour)
    assert all(len(colours) == 1 for colours in by_type.values())
    assert len({next(iter(c)) for c in by_type.values()}) == len(by_type)  # distinct per type
    assert [e.label for e in colouring.legend] == sorted(by_type)
    assert sum(e.count for e in colouring.legend) == len(wells)
    plate = wells["plate"].iloc[0]
    on_plate = colouring.legend_for(plate)
    assert sum(e.count for e in on_plate) == (wells.plate == plate).sum()
    with pytest.raises(ValueError, match="no metadata column 'nope'.*cell_type"):
        colour_by_column(wells, "nope")


def test_many_categories_share_an_other_colour_and_gaps_are_grey():
    n = 30
    table = pd.DataFrame(
        {
            "plate": ["P"] * (n + 4),
            "well": [f"A{i + 1:02d}" for i in range(n + 4)],
            "compound": [f"c{i}" for i in range(n)] + ["c1", "c1", None, ""],
        }
    )
    colouring = colour_by_column(table, "compound", max_categories=10)
    labels = [e.label for e in colouring.legend]
    assert "c1" in labels and "c29" not in labels  # the most frequent keep a colour
    assert labels[-2:] == ["21 other values", "(none)"]
    assert len(colouring.legend) == 11
    assert colouring.colours[("P", "A33")] == MISSING == colouring.colours[("P", "A34")]
    others = [k for k, lab in colouring.labels.items() if lab == "21 other values"]
    assert len(others) == 21 and all(colouring.colours[k] == OTHER for k in others)
    # natural order: c2 before c10
    kept = [e.label for e in colouring.legend[:-2]]
    assert kept == sorted(kept, key=lambda s: int(s[1:]))


def test_values_use_one_scale_over_all_plates():
    df = pd.DataFrame(
        {
            "plate": ["P1", "P1", "P2", "P2"],
            "well": ["A1", "B01", "A01", "B01"],
            "value": [0.0, 2.0, 4.0, np.nan],
        }
    )
    colouring = colour_by_value(df, "feature 3: mean activation", colormap="magma")
    magma = colormaps["magma"]
    assert colouring.numeric and colouring.limits == (0.0, 4.0)
    assert np.allclose(colouring.colours[("P1", "A01")], magma(0.0))
    assert np.allclose(colouring.colours[("P1", "B01")], magma(0.5))
    assert np.allclose(colouring.colours[("P2", "A01")], magma(1.0))
    assert colouring.colours[("P2", "B01")] == MISSING
    fixed = colour_by_value(df, "t", limits=(0.0, 2.0))
    assert np.allclose(fixed.colours[("P2", "A01")], colormaps["viridis"](1.0))  # clipped
    assert np.allclose(colour_bar("magma", 3), magma([0.0, 0.5, 1.0]))


def test_per_well_values_are_checked():
    with pytest.raises(ValueError, match="missing value"):
        per_well_values(pd.DataFrame({"plate": ["P"], "well": ["A01"]}))
    with pytest.raises(ValueError, match="A01 on P is not a number: 'high'"):
        per_well_values(pd.DataFrame({"plate": ["P"], "well": ["A1"], "value": ["high"]}))
    with pytest.raises(ValueError, match="well A01 on P twice"):
        per_well_values(pd.DataFrame({"plate": ["P", "P"], "well": ["A1", "a01"], "value": [1, 2]}))
    with pytest.raises(ValueError, match="not a well name"):
        per_well_values(pd.DataFrame({"plate": ["P"], "well": ["middle"], "value": [1]}))


def test_tooltip_names_the_well_and_its_metadata(wells):
    row = wells.iloc[0].to_dict()
    text = well_tooltip(row)
    assert text.splitlines()[0] == f"{row['well']} on {row['plate']}: 1 site"
    assert f"cell_type: {row['cell_type']}" in text and "sites" not in text.splitlines()[1:]
    text = well_tooltip(row, ("feature 3", 0.123456))
    assert "feature 3: 0.1235" in text
    assert "feature 3: no value" in well_tooltip(row, ("feature 3", float("nan")))


def test_colour_helpers():
    assert value_range([np.nan, 2.0, 2.0]) == (2.0, 3.0) and value_range([]) == (0.0, 1.0)
    rgba = map_values([0.0, 5.0, 10.0, 20.0, np.nan], "viridis", (0.0, 10.0))
    assert np.allclose(rgba[:4], colormaps["viridis"]([0.0, 0.5, 1.0, 1.0]))
    assert tuple(rgba[4]) == MISSING
    with pytest.raises(ValueError, match="unknown colormap 'nope'"):
        map_values([1.0], "nope")
    with pytest.raises(ValueError, match="must rise"):
        map_values([1.0], "magma", (1.0, 1.0))
    assert len(set(category_palette(10))) == 10 and len(set(category_palette(20))) == 20
    with pytest.raises(ValueError, match="at most 20"):
        category_palette(21)
    assert to_hex((1.0, 0.5, 0.0, 1.0)) == "#ff8000"
