"""Where propagation divides touching cells: the cell stains weighted by how far each fills its
cells (reach), so that a perinuclear or uneven stain averaged in does not move the borders.
The site tests fail under the previous rule (the plain mean of the cell stains)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_concept_discovery.segment.classical import (
    Nuclei,
    NucleusSizes,
    cell_foreground,
    nucleus_sizes,
    propagation_surface,
    propagation_weights,
    reach_regions,
    stain_reach,
    unit_scale,
)
from napari_concept_discovery.segment.site import segment_site
from napari_concept_discovery.settings import SegmentSettings, SettingsError
from napari_concept_discovery.synth.zoo import generate_zoo_site

NAMES = ("DNA", "Actin", "GFP")
BORDER = 84  # first column of the right cell


def _two_cells(seed: int = 0):
    """Two touching cells side by side, nuclei at columns 40 and 106, the true border at column
    84 (off the nuclei's midpoint, 73). Actin fills each cell evenly (the left one brighter);
    GFP is perinuclear and uneven: bright around the left nucleus, dim around the right one,
    fading to a few percent by the left cell's border. Returns the (3, H, W) uint8 image and the
    true cell labels."""
    rng = np.random.default_rng(seed)
    h, w = 100, 140
    yy, xx = np.mgrid[0:h, 0:w]
    inside = (yy >= 22) & (yy < 78) & (xx >= 16) & (xx < 124)
    truth = np.where(inside, np.where(xx < BORDER, 1, 2), 0).astype(np.int32)
    d1, d2 = np.hypot(yy - 50, xx - 40), np.hypot(yy - 50, xx - 106)
    dna = 10 + 200.0 * ((d1 <= 7) | (d2 <= 7))
    actin = 10 + np.select([truth == 1, truth == 2], [120.0, 60.0], 0.0)
    gfp = 10 + np.select(
        [truth == 1, truth == 2],
        [230 * np.exp(-np.maximum(d1 - 7, 0) / 10), 40 * np.exp(-np.maximum(d2 - 7, 0) / 10)],
        0.0,
    )
    image = np.stack([dna, actin, gfp]) + rng.normal(0, 1.5, (3, h, w))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), truth


def _borders(cells: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per row of the true cells, the first column of the right cell."""
    rows = np.flatnonzero((truth > 0).any(axis=1))
    return np.array([np.flatnonzero(cells[r] == 2)[0] for r in rows])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_uneven_perinuclear_stain_does_not_move_the_border(seed):
    image, truth = _two_cells(seed)
    _, cells = segment_site(image, NAMES, settings=SegmentSettings())
    _, mean = segment_site(image, NAMES, settings=SegmentSettings(propagation="mean"))
    # reach: the border is where Actin steps, within 2 px on every row
    assert np.abs(_borders(cells, truth) - BORDER).max() <= 2
    both = (cells > 0) & (truth > 0)
    assert (cells[both] == truth[both]).mean() > 0.98
    # the plain mean: the right cell takes the dim periphery of the bright GFP cell
    assert np.median(_borders(mean, truth)) <= BORDER - 8
    assert (mean[both] == truth[both]).mean() < 0.92


def _nuclei(image) -> Nuclei:
    labels = np.zeros(image.shape[1:], np.int32)
    labels[image[0] > 100] = 1
    labels[:, 73:][image[0][:, 73:] > 100] = 2
    return Nuclei(labels, np.zeros(3, bool), nucleus_sizes(labels))


def test_stain_reach_and_weights_on_known_stains():
    image, _ = _two_cells()
    nuclei = _nuclei(image)
    mask, used = cell_foreground(image, [1, 2], nuclei)
    assert used == [1, 2]
    regions = reach_regions(nuclei, mask)
    actin, gfp = (stain_reach(image[c], regions) for c in (1, 2))
    assert actin == pytest.approx(1.0, abs=0.05)  # fills the cells to their borders
    assert 0.05 < gfp < 0.3  # fades to a fraction of its perinuclear level
    weights = propagation_weights(image, [1, 2], nuclei, mask)
    assert weights.sum() == pytest.approx(1.0)
    assert weights[0] == pytest.approx(actin**2 / (actin**2 + gfp**2))
    # squared reach: GFP counts for a few percent of the propagation image
    assert weights[1] < 0.1
    surface = propagation_surface(image, [1, 2], nuclei, mask)
    expected = weights[0] * unit_scale(image[1]) + weights[1] * unit_scale(image[2])
    np.testing.assert_allclose(surface, expected)
    plain = propagation_surface(image, [1, 2], nuclei, mask, rule="mean")
    np.testing.assert_allclose(plain, (unit_scale(image[1]) + unit_scale(image[2])) / 2)


def test_reach_unmeasurable_gives_equal_weights():
    image, _ = _two_cells()
    none = Nuclei(np.zeros(image.shape[1:], np.int32), np.zeros(1, bool), NucleusSizes(0, 0, 0))
    mask = np.ones(image.shape[1:], bool)
    assert reach_regions(none, mask) is None
    assert np.isnan(stain_reach(image[1], None))
    np.testing.assert_allclose(propagation_weights(image, [1, 2], none, mask), [0.5, 0.5])
    # one stain: the propagation image is that stain
    nuclei = _nuclei(image)
    np.testing.assert_allclose(propagation_surface(image, [2], nuclei, mask), unit_scale(image[2]))
    with pytest.raises(ValueError, match="propagation rule"):
        propagation_surface(image, [1, 2], nuclei, mask, rule="median")
    with pytest.raises(SettingsError, match="propagation"):
        SegmentSettings(propagation="median")


def test_patchy_zoo_variant_changes_one_stain():
    base = generate_zoo_site("base", size=192, seed=4)
    patchy = generate_zoo_site("patchy stain (Actin)", size=192, seed=4)
    assert np.array_equal(base.cells, patchy.cells)
    others = [c for c in range(6) if c != 2]
    assert np.array_equal(base.image[others], patchy.image[others])
    # the Actin level of each cell, relative to the same cell in the base: a wide spread
    ids = np.arange(1, int(base.cells.max()) + 1)
    sums = [np.bincount(s.cells.ravel(), s.image[2].ravel().astype(float)) for s in (base, patchy)]
    areas = np.bincount(base.cells.ravel())
    present = areas[ids] > 100
    ratio = (sums[1][ids] / sums[0][ids])[present]
    assert np.std(np.log(ratio)) > 0.4
