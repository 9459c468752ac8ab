"""Feature overlays without Qt: where a patch grid lands on the pixels, per-cell colours."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib import colormaps

from napari_concept_discovery.overlay import (
    DIMMED,
    MAX_DIRECT_LABEL,
    TRANSPARENT,
    activation_grid,
    cell_colours,
    compact_labels,
    grid_placement,
)


@pytest.mark.parametrize(("patch", "offset"), [(16, 0), (14, (3, 5)), ((8, 16), (0, 4)), (1, 0)])
def test_every_pixel_shows_the_patch_it_belongs_to(patch, offset):
    scale, translate = grid_placement(patch, offset)
    p = np.broadcast_to(np.asarray(patch, float), (2,))
    off = np.broadcast_to(np.asarray(offset, float), (2,))
    for axis in range(2):
        pixels = np.arange(int(off[axis]), int(off[axis] + 5 * p[axis]))
        owner = (pixels - off[axis]) // p[axis]  # the patch each pixel was pooled into
        # napari shows at world coordinate j the data point nearest to (j - translate) / scale;
        # half-way points (j on a patch edge) cannot occur: edges sit at half pixels
        shown = np.floor((pixels - translate[axis]) / scale[axis] + 0.5)
        np.testing.assert_array_equal(shown, owner)


def test_placement_numbers_and_bad_input():
    assert grid_placement(16) == ((16.0, 16.0), (7.5, 7.5))
    assert grid_placement((8, 16), (0, 4)) == ((8.0, 16.0), (3.5, 11.5))
    with pytest.raises(ValueError, match="patch_size must be positive"):
        grid_placement(0)
    with pytest.raises(ValueError, match=r"offset must be one number or \(y, x\)"):
        grid_placement(16, (1, 2, 3))
    grid = activation_grid(np.ones((3, 4), np.float64))
    assert grid.dtype == np.float32 and grid.shape == (3, 4)
    with pytest.raises(ValueError, match=r"\(rows, cols\), got shape \(4,\)"):
        activation_grid(np.ones(4))


def table(labels, values, column="activation"):
    return pd.DataFrame({"label": labels, column: values})


def test_active_cells_are_coloured_by_value_inactive_ones_hidden():
    out = cell_colours(table([3, 5, 9, 11], [0.0, 1.0, 2.0, np.nan]), limits=(0.0, 2.0))
    magma = colormaps["magma"]
    assert set(out.colours) == {5, 9, None}
    assert np.allclose(out.colours[5], magma(0.5)) and np.allclose(out.colours[9], magma(1.0))
    assert out.colours[None] == TRANSPARENT
    f = out.features
    assert list(f.columns) == ["index", "label", "activation", "active"]
    assert f["label"].tolist() == [3, 5, 9, 11] and f["index"].tolist() == [3, 5, 9, 11]
    assert f["active"].tolist() == [False, True, True, False]
    dim = cell_colours(
        table([1, 2], [0.5, 0.05], "value"),
        "value",
        limits=(0.0, 1.0),
        colormap="viridis",
        threshold=0.1,
        inactive=DIMMED,
    )
    assert set(dim.colours) == {1, None} and dim.colours[None] == DIMMED


def test_an_active_column_decides_which_cells_are_active():
    """The explore API marks a cell active where its code is non-zero, negative ICFL codes too."""
    cells = pd.DataFrame(
        {"label": [1, 2, 3], "value": [-0.5, 0.0, 2.0], "active": [True, False, True]}
    )
    out = cell_colours(cells, "value", limits=(0.0, 2.0))
    assert out.features["active"].tolist() == [True, False, True]
    assert set(out.colours) == {1, 3, None}
    assert np.allclose(out.colours[1], colormaps["magma"](0.0))  # below the limits: the bottom


def test_cell_values_are_checked():
    with pytest.raises(ValueError, match="columns 'label' and 'activation'"):
        cell_colours(pd.DataFrame({"cell": [1], "activation": [1.0]}), limits=(0, 1))
    with pytest.raises(ValueError, match="cell 4 twice"):
        cell_colours(table([4, 4], [1.0, 2.0]), limits=(0, 1))
    with pytest.raises(ValueError, match="positive whole numbers"):
        cell_colours(table([0, 1], [1.0, 2.0]), limits=(0, 1))
    with pytest.raises(ValueError, match="positive whole numbers"):
        cell_colours(table([1.5], [1.0]), limits=(0, 1))


def test_large_label_ids_are_renumbered_for_display():
    labels = np.array([[0, 70000], [123456, 70000]], dtype=np.int64)
    shown, mapping = compact_labels(labels)
    assert mapping == {70000: 1, 123456: 2}
    np.testing.assert_array_equal(shown, [[0, 1], [2, 1]])
    out = cell_colours(table([70000, 123456], [1.0, 0.0]), limits=(0, 1), index=mapping)
    assert set(out.colours) == {1, None}
    assert out.features["index"].tolist() == [1, 2]
    assert out.features["label"].tolist() == [70000, 123456]
    small = np.array([[0, 5], [MAX_DIRECT_LABEL, 5]])
    same, none = compact_labels(small)
    assert none is None and same is small
