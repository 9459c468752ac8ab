"""Feature overlays without Qt: where a patch grid lands on the pixels, per-cell values as pixels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_concept_discovery.views.overlay import (
    CellImages,
    activation_grid,
    cell_index,
    cell_table,
    cell_value_image,
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


def test_active_cells_are_marked_and_keyed_by_label():
    out = cell_table(table([3, 5, 9, 11], [0.0, 1.0, 2.0, np.nan]))
    assert list(out.columns) == ["index", "label", "activation", "active"]
    assert out["label"].tolist() == [3, 5, 9, 11] and out["index"].tolist() == [3, 5, 9, 11]
    assert out["active"].tolist() == [False, True, True, False]
    above = cell_table(table([1, 2], [0.5, 0.05], "value"), "value", threshold=0.1)
    assert above["active"].tolist() == [True, False]


def test_an_active_column_decides_which_cells_are_active():
    """The explore API marks a cell active where its code is non-zero, negative ICFL codes too."""
    cells = pd.DataFrame(
        {"label": [1, 2, 3], "value": [-0.5, 0.0, 2.0], "active": [True, False, True]}
    )
    out = cell_table(cells, "value")
    assert out["active"].tolist() == [True, False, True]
    index = cell_index(np.array([[0, 1, 2, 3]]), out["label"].to_numpy())
    image = cell_value_image(index, out["value"].to_numpy(), out["active"].to_numpy())
    np.testing.assert_array_equal(image, [[np.nan, -0.5, np.nan, 2.0]])  # negative yet shown


def test_cell_values_are_checked():
    with pytest.raises(ValueError, match="columns 'label' and 'activation'"):
        cell_table(pd.DataFrame({"cell": [1], "activation": [1.0]}))
    with pytest.raises(ValueError, match="cell 4 twice"):
        cell_table(table([4, 4], [1.0, 2.0]))
    with pytest.raises(ValueError, match="positive whole numbers"):
        cell_table(table([0, 1], [1.0, 2.0]))
    with pytest.raises(ValueError, match="positive whole numbers"):
        cell_table(table([1.5], [1.0]))


@pytest.mark.parametrize("offset", [0, 100_000, 2**40])
def test_each_pixel_takes_its_cells_value(offset):
    """Dense and sparse label ids alike; a label the table lacks stays clear like background."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, (40, 30)).astype(np.int64)
    labels[labels > 0] += offset
    ids = np.array([3, 1, 4, 2]) + offset  # cell 5 has no value; order is the table's
    values = np.array([0.3, -0.2, 0.0, 0.9], np.float32)
    active = np.array([True, True, False, True])
    index = cell_index(labels, ids)
    assert index.dtype == np.intp and index.shape == labels.shape
    image = cell_value_image(index, values, active)
    expected = np.full(labels.shape, np.nan, np.float32)
    for label, value, on in zip(ids, values, active, strict=True):
        if on:
            expected[labels == label] = value
    np.testing.assert_array_equal(image, expected)
    assert np.isnan(image[labels == 0]).all() and np.isnan(image[labels == 5 + offset]).all()
    out = np.zeros(labels.shape, np.float32)
    assert cell_value_image(index, values, active, out=out) is out
    np.testing.assert_array_equal(out, expected)
    assert not cell_index(labels, np.array([], np.int64)).any()


def test_the_label_index_is_built_once_per_label_image():
    labels = np.array([[0, 1], [2, 2]], np.int32)
    images = CellImages()
    first = images.index(labels, np.array([1, 2]))
    assert images.index(labels, np.array([1, 2])) is first  # the same site: kept
    assert images.index(labels.copy(), np.array([1, 2])) is not first  # another array
    swapped = images.index(labels, np.array([2, 1]))  # another row order: built again
    np.testing.assert_array_equal(swapped, [[0, 2], [1, 1]])
    cells = cell_table(pd.DataFrame({"label": [1, 2], "value": [0.5, 0.0]}), "value")
    np.testing.assert_array_equal(
        images.paint(labels, cells, "value"), [[np.nan, 0.5], [np.nan] * 2]
    )
