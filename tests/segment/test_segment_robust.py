"""Thresholds that know where the background is, stains judged before they join the cells, and
the per-site quality flags. Each test fails under the rules before it: log Otsu
without a noise floor, every stain joined, no quality table."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy import ndimage as ndi
from skimage.segmentation import expand_labels

from napari_concept_discovery.segment.classical import (
    StainWarning,
    background,
    foreground,
    judge_stain,
    smooth,
)
from napari_concept_discovery.segment.qc import read_qc, site_qc
from napari_concept_discovery.segment.site import segment_site
from napari_concept_discovery.settings import SegmentSettings
from napari_concept_discovery.synth.zoo import ZOO, generate_zoo_site

BEFORE = SegmentSettings(cell_threshold="otsu", noise_floor=0.0, judge_stains=False)


def _scores(cells, truth):
    fg, true = cells > 0, truth > 0
    return (fg & true).sum() / (fg | true).sum(), fg.sum() / true.sum()


def test_background_level_and_noise_from_the_image():
    rng = np.random.default_rng(0)
    image = rng.normal(3.0, 1.2, (200, 200))
    image[50:100, 50:150] += 80  # cells on a fifth of the site
    s = smooth(image, 1.0)
    bg = background(s)
    assert abs(bg.level - 3.0) < 0.3
    expected = s[150:, :].std()  # the smoothed background's own deviation
    assert 0.7 * expected < bg.noise < 1.4 * expected
    # the same with nine tenths of the site covered by cells of many brightnesses: the level
    # is still the background's
    dense = image.copy()
    dense[:180] += np.linspace(20, 120, 200)[None, :]
    assert abs(background(smooth(dense, 1.0)).level - 3.0) < 1.0


@pytest.mark.parametrize(
    "method,log",
    [("otsu", True), ("mce", True), ("otsu", False), ("otsu3", False), ("background", False)],
)
def test_no_threshold_inside_the_noise(method, log):
    """An 8-bit site with no cells, a background a count or two above zero: nothing is
    foreground (log Otsu alone splits the noise, the zeros from the rest)."""
    rng = np.random.default_rng(1)
    image = np.clip(np.rint(rng.normal(1.5, 1.3, (256, 256))), 0, 255).astype(np.uint8)
    mask = foreground(image, method, log=log, factor=1.0, sigma=1.0)
    assert mask.mean() < 0.01
    if (method, log) == ("otsu", True):  # the floor is what holds it
        unfloored = foreground(image, method, log=log, factor=1.0, sigma=1.0, noise_floor=0.0)
        assert unfloored.mean() > 0.2


def test_missing_stain_has_no_foreground():
    assert not foreground(
        np.zeros((32, 32), np.uint8), "background", log=False, factor=1, sigma=1
    ).any()
    assert not foreground(np.zeros((32, 32), np.uint8), "otsu", log=True, factor=1, sigma=1).any()


@pytest.mark.parametrize("variant", ["read noise 4", "dim stains (x0.3)", "sparse"])
def test_noisy_dim_and_sparse_sites_do_not_flood(variant):
    """Zoo variants where the log-Otsu default grew the cells over the background."""
    site = generate_zoo_site(variant, size=256, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StainWarning)
        _, cells = segment_site(site.image, site.channel_names)
    j, ratio = _scores(cells, site.cells)
    assert j >= 0.8 and 0.8 <= ratio <= 1.25, (j, ratio)
    _, flooded = segment_site(site.image, site.channel_names, settings=BEFORE)
    assert _scores(flooded, site.cells)[1] > 1.5


def _sparse_site_with_a_bad_stain():
    """Nine nuclei, a good cell stain around them, and a stain of large blotches that have
    nothing to do with them (a lognormal field, as a precipitate or a bad antibody gives)."""
    size = 240
    yy, xx = np.mgrid[:size, :size]
    dna = np.zeros((size, size))
    good = np.zeros((size, size))
    for cy in (40, 120, 200):
        for cx in (40, 120, 200):
            r2 = (yy - cy) ** 2 + (xx - cx) ** 2
            dna += 120 * (r2 <= 8**2)
            good += 80 * (r2 <= 16**2)
    rng = np.random.default_rng(2)
    field = ndi.gaussian_filter(rng.normal(size=(size, size)), 6.0)
    blotches = 10.0 * np.exp(field / field.std())
    image = np.stack([dna, good, blotches]) + rng.normal(3, 1, (3, size, size))
    return np.clip(image, 0, 255).astype(np.uint8), ("DNA", "Good", "Bad")


def test_a_stain_that_does_not_follow_the_nuclei_is_left_out_by_name():
    image, names = _sparse_site_with_a_bad_stain()
    with pytest.warns(StainWarning, match="'Bad'") as caught:
        _, cells = segment_site(image, names)
    assert not any("'Good'" in str(w.message) for w in caught)
    assert 8 <= len(np.unique(cells[cells > 0])) <= 9
    assert (cells > 0).mean() < 0.16  # nine cells of radius 16: 12.6% of the site
    _, joined = segment_site(image, names, settings=SegmentSettings(judge_stains=False))
    assert (joined > 0).mean() > 1.3 * (cells > 0).mean()


def test_judge_stain_reasons():
    nuclei = np.zeros((200, 200), np.int32)
    nuclei[20:30, 20:30] = 1
    nuclei[150:160, 150:160] = 2
    flood = np.ones((200, 200), bool)
    reason, measured = judge_stain(flood, nuclei, 10.0)
    assert "sparse site" in reason and measured["share"] == 1.0
    assert "only 0%" in judge_stain(np.zeros_like(flood), nuclei, 10.0)[0]
    around = expand_labels(nuclei, 8) > 0
    assert judge_stain(around, nuclei, 10.0)[0] is None


def test_quality_flags_a_tiled_site_and_passes_a_true_one():
    site = generate_zoo_site("base", size=256, seed=0)
    good = site_qc(site.nuclei, site.cells)
    assert not good["flag"] and good["cells"] == good["nuclei"] > 5
    assert 2 < good["cell_nucleus_ratio"] < 6 and good["enclosed"] < 0.2
    tiled = site_qc(site.nuclei, expand_labels(site.nuclei, 200))
    assert tiled["flag"] and "tile the site" in tiled["reason"]
    assert tiled["foreground"] == 1.0 and tiled["enclosed"] == 1.0
    bare = site_qc(site.nuclei, site.nuclei)
    assert bare["flag"] and "no cytoplasm" in bare["reason"]
    orphans = site.cells.copy()
    orphans[site.nuclei > 0] = 0
    no_nucleus = site_qc(np.zeros_like(site.nuclei), orphans)
    assert no_nucleus["flag"] and "have no nucleus" in no_nucleus["reason"]
    assert site_qc(site.nuclei, site.cells, ["'ER': empty"])["flag"]


def test_zoo_varies_one_thing_at_a_time():
    base = generate_zoo_site("base", size=128, seed=5)
    offset = generate_zoo_site("offset 40", size=128, seed=5)
    assert np.array_equal(base.cells, offset.cells)  # same cells, another camera
    assert offset.image[1][offset.cells == 0].mean() > base.image[1][base.cells == 0].mean() + 30
    assert generate_zoo_site("16-bit", size=64).image.dtype == np.uint16
    assert not generate_zoo_site("missing stain (ER)", size=64).image[1].any()
    assert set(ZOO) >= {"base", "sparse", "confluent", "40x (radius 40)", "touching nuclei"}


def test_cli_segment_writes_and_info_shows_quality(small_plates, tmp_path, capsys):
    from napari_concept_discovery.cli import main

    out = tmp_path / "seg"
    assert main(["segment", str(small_plates), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "quality:" in said and "12 sites" in said
    table = read_qc(out)
    assert isinstance(table, pd.DataFrame) and len(table) == 12
    assert {"well", "foreground", "enclosed", "flag", "reason"} <= set(table.columns)
    # a label folder whose cells tile the sites: flagged, by segment's table and by info
    for path in out.glob("*/*_cells.tif"):
        nuclei = tifffile.imread(str(path).replace("_cells", "_nuclei"))
        tifffile.imwrite(path, expand_labels(nuclei, 300))
    rows = []
    for _, r in table.iterrows():
        stem = out / r["plate"] / f"{r['well']}_s{r['site']}"
        rows.append(
            {"plate": r["plate"], "well": r["well"], "site": r["site"]}
            | site_qc(tifffile.imread(f"{stem}_nuclei.tif"), tifffile.imread(f"{stem}_cells.tif"))
        )
    from napari_concept_discovery.segment.qc import write_qc

    write_qc(out, pd.DataFrame(rows))
    assert main(["info", str(small_plates), "--labels", str(out)]) == 0
    said = capsys.readouterr().out
    assert "12 flagged" in said and "tile the site" in said


def test_store_keeps_the_quality_table(tiny_store_path, capsys):
    from napari_concept_discovery.cli import main
    from napari_concept_discovery.embed.store import ActivationStore

    quality = ActivationStore.open(tiny_store_path).quality()
    assert quality is not None and len(quality) == 12
    assert {"plate", "well", "site", "foreground", "cells", "flag", "reason"} <= set(quality)
    assert not quality["flag"].any()  # the synthetic truth is plausible
    assert (quality["cells"] > 0).all() and (quality["cell_nucleus_ratio"] > 1.3).all()
    # info on the store says where it came from, what it holds and its quality
    assert main(["info", str(tiny_store_path)]) == 0
    said = capsys.readouterr().out
    assert f"store:    {tiny_store_path}" in said and "cell tokens" in said
    assert "quality:  12 sites" in said and "0 flagged" in said


def test_report_quality_section_draws_flagged_sites(tmp_path, capsys):
    """A user segments a dark, noisy plate with the old rule, embeds those labels and reports:
    the store keeps the quality table, embed names the flagged sites, and the report lists them
    with their reasons and draws them with their cells outlined."""
    import base64
    import io
    import re

    import imageio.v3 as iio
    from PIL import Image

    from napari_concept_discovery.cli import main

    folder = tmp_path / "plate" / "images" / "ZOO-01" / "Plate1"
    folder.mkdir(parents=True)
    rows = []
    for well, variant in (("B02", "base"), ("B03", "combined: dark noisy dim cytoplasm")):
        site = generate_zoo_site(variant, size=192, seed=3)
        for c, plane in enumerate(site.image, start=1):
            iio.imwrite(folder / f"{well}_s1_w{c}.png", plane)
        rows.append(
            {
                "experiment": "ZOO-01",
                "plate": 1,
                "well": well,
                "site": 1,
                "well_type": "negative_control" if well == "B02" else "treatment",
            }
        )
    pd.DataFrame(rows).to_csv(tmp_path / "plate" / "metadata.csv", index=False)
    plate, seg, store = tmp_path / "plate", tmp_path / "seg", tmp_path / "store.zarr"
    old_rule = ["--cell-threshold", "otsu", "--noise-floor", "0", "--no-judge-stains"]
    assert main(["segment", str(plate), "--out", str(seg), *old_rule]) == 0
    assert main(["embed", str(plate), "--labels", str(seg), "--out", str(store)]) == 0
    said = capsys.readouterr()
    assert "flagged plate ZOO-01_1 well B03" in said.out + said.err
    dictionary = tmp_path / "d.safetensors"
    train = ["train", str(store), "--out", str(dictionary), "--atoms", "8", "--sparsity", "4"]
    assert main([*train, "--steps", "5", "--no-whiten"]) == 0
    assert main(["report", str(store), str(dictionary), "--out", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "index.html").read_text()
    section = text[text.index("id='quality'") : text.index("id='profiles'")]
    assert "1 flagged" in section and "<td>B03</td>" in section
    assert "tile the site" in section or "cells reach over the background" in section
    assert "<td>B02</td>" not in section  # the plausible site is not listed
    found = re.search(r'data-kind="quality" src="data:image/jpeg;base64,([^"]+)"', section)
    picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(found.group(1)))).convert("L"))
    assert picture.shape[0] > 200 and (picture > 250).mean() > 0.02  # white outlines drawn


def test_quality_flags_cells_over_the_background_of_a_sparse_site():
    """A sparse flood does not tile the site; the image says its cells are mostly background."""
    from napari_concept_discovery.segment.site import quality_channels

    site = generate_zoo_site("sparse", size=256, seed=1)
    stains = quality_channels(SegmentSettings(), site.channel_names)(site.image)
    _, flooded = segment_site(site.image, site.channel_names, settings=BEFORE)
    nuclei = site.nuclei
    bad = site_qc(nuclei, flooded, image=site.image, channels=stains)
    assert bad["flag"] and "background in every cell stain" in bad["reason"]
    assert "tile the site" not in bad["reason"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StainWarning)
        _, cells = segment_site(site.image, site.channel_names)
    good = site_qc(nuclei, cells, image=site.image, channels=stains)
    assert not good["flag"] and good["background_share"] < 0.1


@pytest.mark.parametrize(
    "variant,stain", [("empty stain (Mito)", "Mito"), ("missing stain (ER)", "ER")]
)
def test_an_empty_or_missing_stain_is_named(variant, stain):
    site = generate_zoo_site(variant, size=256, seed=0)
    with pytest.warns(StainWarning, match=f"'{stain}'"):
        segment_site(site.image, site.channel_names)
    base = generate_zoo_site("base", size=256, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StainWarning)
        segment_site(base.image, base.channel_names)  # every stain of a good site is kept
