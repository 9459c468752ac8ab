"""The classical segmenter's parts: thresholds, propagation, size limits, edge objects, settings,
channel choice, and the Cellpose adapter's id matching and messages."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from napari_concept_discovery.errors import ModelError
from napari_concept_discovery.segment.cellpose import CellposeSegmenter, match_ids
from napari_concept_discovery.segment.classical import (
    cell_channels,
    find_nuclei,
    propagate,
    threshold,
    touching_edge,
)
from napari_concept_discovery.segment.site import make_segmenter, segment_nuclei, segment_site
from napari_concept_discovery.settings import SegmentSettings, SettingsError
from napari_concept_discovery.synth import generate_site


def _disc(shape, center, radius):
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def test_thresholds_on_known_levels():
    rng = np.random.default_rng(0)
    # background 100, dim cytoplasm 300, bright bodies 3000 (pixel shares 60/30/10 %)
    image = np.concatenate(
        [
            rng.normal(100, 5, 6000),
            rng.normal(300, 15, 3000),
            rng.normal(3000, 100, 1000),
        ]
    ).reshape(100, 100)
    three = threshold(image, "otsu3")
    # two classes put the dim class with the background, linear or log, Otsu or MCE ...
    assert 330 < threshold(image, "otsu") < 2800
    assert 330 < threshold(image, "otsu", log=True) < 2800
    assert 330 < threshold(image, "mce") < 2800
    # ... three classes (middle as foreground) and MCE on the log count it as cell
    assert 110 < three < 250
    assert 110 < threshold(image, "otsu3", log=True) < 250
    assert 110 < threshold(image, "mce", log=True) < 250
    assert threshold(image, "otsu3", factor=0.5) == pytest.approx(three * 0.5)
    assert threshold(np.full((4, 4), 7.0), "otsu") == 7.0
    # a two-level image has no middle class: three classes fall back to two, between the levels
    two = np.where(np.arange(100).reshape(10, 10) < 70, 10.0, 200.0)
    assert threshold(two, "otsu3") == pytest.approx(105.0)
    with pytest.raises(ValueError, match="unknown threshold"):
        threshold(image, "kapur")


def test_propagation_weighs_edges_against_distance():
    """Between two seeds a bright ridge off the midpoint: small lambda follows the ridge,
    large lambda splits at the midpoint (plain distance)."""
    image = np.zeros((20, 61))
    image[:, 40] = 1.0  # ridge at column 40; seeds at 10 and 50, midpoint 30
    seeds = np.zeros((20, 61), np.int32)
    seeds[10, 10] = 1
    seeds[10, 50] = 2
    mask = np.ones_like(image, bool)
    by_edge = propagate(image, seeds, mask, regularization=0.01)
    by_distance = propagate(image, seeds, mask, regularization=100.0)
    assert (by_edge[:, :39] == 1).all() and (by_edge[:, 42:] == 2).all()
    assert (by_distance[:, :29] == 1).all() and (by_distance[:, 32:] == 2).all()
    # the mask bounds the growth: behind a masked-off column seed 1 cannot reach
    mask[:, 20] = False
    cut = propagate(image, seeds, mask, regularization=0.01)
    assert (cut[:, :20] == 1).all() and (cut[:, 20] == 0).all() and (cut[:, 21:] == 2).all()
    # seed pixels outside the mask keep their label but do not spread
    outside = np.zeros_like(mask)
    outside[:, :5] = True
    grown = propagate(image, seeds, outside, 0.05)
    assert grown[10, 10] == 1 and grown[10, 50] == 2 and (grown[:, :5] == 0).all()


def _nuclear_image(shape=(200, 420)):
    """Fourteen discs of radius 12 (two of them touching), a speck of radius 2, a blob of
    radius 40 and a nucleus cut by the left edge."""
    image = np.full(shape, 10.0)
    centers = [(40, 40 + 50 * i) for i in range(6)] + [(100, 40 + 50 * i) for i in range(6)]
    centers += [(160, 40), (160, 63)]  # a touching pair: one component, two nuclei
    for c in centers:
        image[_disc(shape, c, 12)] = 200.0
    image[_disc(shape, (170, 110), 2)] = 200.0  # debris
    image[_disc(shape, (150, 340), 40)] = 200.0  # far too big for a nucleus here
    image[_disc(shape, (70, -6), 12)] = 200.0  # cut by the left border
    return image, centers


def test_size_limits_relative_and_explicit():
    image, centers = _nuclear_image()
    found = find_nuclei(image)
    assert found.sizes.typical == pytest.approx(24, abs=2)  # a disc's diameter
    assert found.sizes.min_diameter == pytest.approx(0.4 * found.sizes.typical)
    assert found.sizes.max_diameter == pytest.approx(3 * found.sizes.typical)
    kept = np.where(found.dropped[found.labels], 0, found.labels)
    ids = {int(kept[c]) for c in centers}
    assert 0 not in ids and len(ids) == len(centers)  # the touching pair is split
    assert found.labels[170, 110] == 0  # debris removed outright
    blob = found.labels[150, 340]
    assert blob > 0 and found.dropped[blob]  # too big: grows a cell, then dropped
    assert kept[70, 2] > 0 and np.unique(kept).size - 1 == len(centers) + 1  # edge one stays
    # explicit limits in pixels: a 30 px lower limit removes the 24 px discs
    strict = segment_nuclei(image, SegmentSettings(min_diameter=30, max_diameter=200))
    assert strict[40, 40] == 0 and strict[150, 340] > 0
    with_edge = segment_nuclei(image, SegmentSettings(drop_edge=True))
    assert with_edge[70, 2] == 0 and touching_edge(with_edge).size == 0
    merged = segment_nuclei(image, SegmentSettings(declump=False))
    assert merged[160, 40] == merged[160, 63] > 0


def _edge_scene():
    """DNA and a cell stain (160 x 160): A's nucleus touches the top edge; B's nucleus is
    interior but its cell reaches the left edge; C lies wholly inside."""
    shape = (160, 160)
    dna = np.full(shape, 10.0)
    stain = np.full(shape, 10.0)
    for center, cell_r in (((4, 80), 26), ((80, 30), 40), ((110, 110), 28)):
        stain[_disc(shape, center, cell_r)] = 400.0
        dna[_disc(shape, center, 9)] = 2000.0
    return np.stack([dna, stain]), ["DNA", "Actin"]


def test_drop_edge_by_nucleus_keeps_cells_of_interior_nuclei():
    """CellProfiler's IdentifyPrimaryObjects rule: a nucleus touching the border is dropped with
    its cell; a cell reaching the border from an interior nucleus is kept."""
    image, names = _edge_scene()
    nuclei, cells = segment_site(image, names)
    a, b, c = cells[2, 80], cells[80, 30], cells[110, 110]
    assert 0 not in (a, b, c) and len({a, b, c}) == 3
    assert cells[80, 0] == b  # B's cell reaches the left edge, its nucleus does not
    assert touching_edge(nuclei).tolist() == [a]
    n1, c1 = segment_site(image, names, settings=SegmentSettings(drop_edge=True))
    assert c1[2, 80] == 0 and n1[2, 80] == 0  # A: nucleus on the edge, gone with its cell
    assert c1[80, 0] > 0 and c1[80, 0] == c1[80, 30] == n1[80, 30]  # B kept, reaching the edge
    assert np.array_equal(c1 > 0, (cells == b) | (cells == c))
    assert touching_edge(n1).size == 0
    n2, c2 = segment_site(
        image, names, settings=SegmentSettings(drop_edge=True, drop_edge_by="cell")
    )
    assert np.array_equal(c2 > 0, cells == c) and np.array_equal(n2 > 0, nuclei == c)
    assert c2.max() == n2.max() == 1
    with pytest.raises(SettingsError, match="drop_edge_by"):
        SegmentSettings(drop_edge_by="pixel")


def test_drop_edge_keeps_interior_cells_unchanged():
    site = generate_site("HEPG2", size=256, seed=3)
    nuclei, cells = segment_site(site.image, site.channel_names)
    by_cell = SegmentSettings(drop_edge=True, drop_edge_by="cell")
    n2, c2 = segment_site(site.image, site.channel_names, settings=by_cell)
    edge = touching_edge(cells)
    assert edge.size > 0 and touching_edge(c2).size == 0
    assert c2.max() == cells.max() - edge.size
    interior = ~np.isin(cells, edge) & (cells > 0)
    # the same pixels, relabelled 1..K in the same order
    mapping = {int(a): int(b) for a, b in zip(cells[interior], c2[interior], strict=True)}
    assert sorted(mapping.values()) == list(range(1, c2.max() + 1))
    assert np.array_equal(c2 > 0, interior)
    assert set(np.unique(n2)) == set(np.unique(c2))
    assert np.array_equal(n2[n2 > 0], c2[n2 > 0])


def test_transmitted_light_channel_left_out():
    site = generate_site("U2OS", size=128, seed=2)
    rng = np.random.default_rng(0)
    brightfield = rng.normal(12000, 600, site.image.shape[1:]).astype(site.image.dtype)
    image = np.concatenate([site.image, brightfield[None]])
    names = (*site.channel_names, "ch7")  # a name that says nothing
    n = names.index("DNA")
    assert cell_channels(image, names, n, None) == [i for i in range(6) if i != n]
    assert cell_channels(image, names, n, [6]) == [6]  # asked for, it is used
    renamed = (*site.channel_names, "Brightfield")
    flat = image.copy()
    flat[6] = 0  # even a dark transmitted channel is left out by its name
    assert 6 not in cell_channels(flat, renamed, n, None)


def test_segment_settings_are_checked():
    assert SegmentSettings(nuclear=3).nuclear == "3"
    for bad, name in (
        ({"regularization": -0.1}, "regularization"),
        ({"smoothing": -1}, "smoothing"),
        ({"cell_threshold_factor": 0}, "cell_threshold_factor"),
        ({"min_diameter": 0}, "min_diameter"),
        ({"min_diameter": 40, "max_diameter": 30}, "max_diameter"),
        ({"nuclear": " "}, "nuclear"),
        ({"cell_threshold": "kapur"}, "cell_threshold"),
        ({"segmenter": "stardist"}, "segmenter"),
        ({"cellpose_diameter": -5}, "cellpose_diameter"),
        ({"cellpose_cellprob": 7}, "cellpose_cellprob"),
        ({"cellpose_flow": -0.1}, "cellpose_flow"),
    ):
        with pytest.raises(SettingsError, match=name):
            SegmentSettings(**bad)
    with pytest.raises(SettingsError, match="unknown setting"):
        SegmentSettings.from_dict({"regularisation": 0.1})
    s = SegmentSettings(cell=" RNA,AGP ")
    assert SegmentSettings.from_dict(s.to_dict()) == s and s.cell == "RNA,AGP"


def test_channel_names_checked_before_segmenting():
    site = generate_site("HEPG2", size=64, seed=0)
    with pytest.raises(ValueError, match="cell channel 'AGP' not among"):
        segment_site(site.image, site.channel_names, cell="AGP")
    with pytest.raises(ValueError, match="nuclear channel index 9 out of range"):
        segment_site(site.image, site.channel_names, nuclear=9)


def test_legacy_segmenter_still_runs():
    site = generate_site("HUVEC", size=256, seed=1)
    nuclei, cells = segment_site(
        site.image, site.channel_names, settings=SegmentSettings(segmenter="legacy")
    )
    assert nuclei.dtype == cells.dtype == np.int32 and cells.max() > 5
    inside = nuclei > 0
    assert np.array_equal(nuclei[inside], cells[inside])


# --- Cellpose adapter ---------------------------------------------------------------------


def test_cellpose_missing_gives_one_line_how_to(monkeypatch):
    monkeypatch.setitem(sys.modules, "cellpose", None)  # as if not installed
    with pytest.raises(ModelError, match=r"not installed.*pip install") as info:
        make_segmenter(SegmentSettings(segmenter="cellpose"))
    assert "\n" not in str(info.value)


def test_match_ids_pairs_cells_and_nuclei():
    cells = np.zeros((30, 40), np.int32)
    nuclei = np.zeros_like(cells)
    cells[0:10, 0:10] = 7  # one nucleus
    nuclei[2:6, 2:6] = 3
    cells[0:10, 20:35] = 9  # two nuclei: keeps the larger
    nuclei[2:5, 22:25] = 4
    nuclei[2:8, 27:33] = 5
    cells[15:25, 0:10] = 2  # no nucleus: dropped
    nuclei[15:25, 20:26] = 6  # no cell: dropped
    cells[15:25, 30:40] = 11  # nucleus mostly outside: dropped with it
    nuclei[15:25, 26:33] = 8
    cells[26:30, 0:10] = 12  # nucleus spilling over the cell edge: clipped
    nuclei[25:30, 2:6] = 13
    n, c = match_ids(cells, nuclei)
    assert c.max() == 3 and set(np.unique(c)) == set(np.unique(n)) == {0, 1, 2, 3}
    assert (c[cells == 7] == 1).all() and (c[cells == 9] == 2).all() and (c[cells == 12] == 3).all()
    assert (n[nuclei == 5] == 2).all() and (n[nuclei == 4] == 0).all()
    assert (
        (c[cells == 2] == 0).all() and (n[nuclei == 6] == 0).all() and (c[cells == 11] == 0).all()
    )
    assert n[25, 3] == 0 and n[27, 3] == 3  # the part outside cell 12 is cut off
    inside = n > 0
    assert np.array_equal(n[inside], c[inside])
    with pytest.raises(ValueError, match="shape"):
        match_ids(cells, nuclei[:10])


def test_match_ids_with_no_nucleus_inside_a_cell_gives_no_cells():
    """Cells and nuclei that overlap, but no nucleus half inside one cell (what an untrained
    Cellpose network's fragments gave): no pairs, and no crash."""
    cells = np.zeros((10, 10), np.int32)
    nuclei = np.zeros_like(cells)
    cells[0:10, 0:3] = 1
    cells[0:10, 7:10] = 2
    nuclei[2:8, 2:8] = 5  # 12 of its 36 pixels in cell 1, 6 in cell 2
    n, c = match_ids(cells, nuclei)
    assert n.dtype == c.dtype == np.int32 and not n.any() and not c.any()


class _FakeCellModel:
    """Stands in for a Cellpose model in this unit test of the id matching only: returns the
    synthetic site's true cells under shuffled ids and records what it was given."""

    def __init__(self, cells):
        rng = np.random.default_rng(0)
        ids = rng.permutation(np.arange(1, cells.max() + 1)) + 100
        self.masks = np.where(cells > 0, np.r_[0, ids][cells], 0).astype(np.uint16)
        self.calls = []

    def eval(self, x, **kwargs):
        self.calls.append((x.shape, x.dtype, kwargs))
        return self.masks, None, None


@pytest.mark.parametrize("major", [3, 4])
def test_cellpose_adapter_matches_ids(major):
    site = generate_site("HEPG2", size=192, seed=4)
    fake = _FakeCellModel(site.cells)
    settings = SegmentSettings(segmenter="cellpose", cellpose_diameter=40)
    segmenter = CellposeSegmenter(settings, cell_model=fake, major=major)
    n = site.channel_names.index("DNA")
    nuclei, cells = segmenter(site.image, n, [i for i in range(6) if i != n])
    ((shape, dtype, kwargs),) = fake.calls
    assert shape == (192, 192, 2) and dtype == np.float32
    assert kwargs["diameter"] == 40 and kwargs["channel_axis"] == -1
    assert kwargs.get("channels") == ([1, 2] if major == 3 else None)
    assert nuclei.dtype == cells.dtype == np.int32
    assert set(np.unique(nuclei)) == set(np.unique(cells))
    inside = nuclei > 0
    assert np.array_equal(nuclei[inside], cells[inside])
    # every kept cell is one true cell, whole
    for k in range(1, cells.max() + 1):
        assert np.unique(site.cells[cells == k]).size == 1
    assert cells.max() >= 0.8 * site.cells.max()


def test_auto_cellpose_model_is_the_installed_versions_default(monkeypatch, tmp_path):
    """ "auto" is Cellpose's own default of the installed version, and a store's signature
    records the model it resolved to, so upgrading Cellpose re-segments instead of reusing."""
    import napari_concept_discovery.segment.cellpose as sc
    from napari_concept_discovery.embed.plate import EmbedSettings, plate_inputs
    from napari_concept_discovery.plate import open_plate
    from napari_concept_discovery.synth import write_synthetic_plates

    assert SegmentSettings().cellpose_model == EmbedSettings().segment.cellpose_model == "auto"
    write_synthetic_plates(tmp_path, n_plates=1, n_wells=1, n_sites=1, size=64, seed=0)
    plate = open_plate(next(p for p in tmp_path.iterdir() if p.is_dir()))
    settings = EmbedSettings(cells="segment", segment=SegmentSettings(segmenter="cellpose"))
    for major, name in ((4, "cpsam"), (3, "cyto3")):
        monkeypatch.setattr(sc, "cellpose_major", lambda major=major: major)
        assert sc.cellpose_model_name("auto") == sc.cellpose_model_name(" Auto") == name
        (inputs,) = plate_inputs(plate, settings).values()
        assert inputs.token == f"segment:DNA:cellpose:{name}"
    assert sc.cellpose_model_name("cyto2") == "cyto2"
    assert sc.cellpose_model_name("/models/mine.pt") == "/models/mine.pt"


def test_embed_settings_refuse_an_empty_cellpose_model_and_an_unknown_segmenter():
    from napari_concept_discovery.embed.plate import EmbedSettings

    with pytest.raises(SettingsError, match="cellpose_model"):
        EmbedSettings(segment={"segmenter": "cellpose", "cellpose_model": " "})
    with pytest.raises(SettingsError, match="segmenter"):
        EmbedSettings(segment={"segmenter": "stardist"})
    with pytest.raises(SettingsError, match="segment: embedding segments with nuclear"):
        EmbedSettings(segment=SegmentSettings(cell_fraction=0.3))
