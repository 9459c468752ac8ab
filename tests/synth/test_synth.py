"""Synthetic plates: layout on disk, determinism, and that the ground truth means what it says."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_concept_discovery.synth import (
    CELL_TYPES,
    CHANNELS,
    MITOTIC_FRACTION,
    PERTURBATIONS,
    PlateBatch,
    generate_site,
    plan_plate,
    well_names,
)
from napari_concept_discovery.synth.plate import METADATA_COLUMNS


def _site_files(root, plate, well, site):
    img = root / "images" / "SYNTH" / f"Plate{plate}"
    lab = root / "labels" / "SYNTH" / f"Plate{plate}"
    chans = [img / f"{well}_s{site}_w{c}.png" for c in range(1, 7)]
    return chans, lab / f"{well}_s{site}_cells.tif", lab / f"{well}_s{site}_nuclei.tif"


def test_layout_and_metadata(small_plates):
    meta = pd.read_csv(small_plates / "metadata.csv")
    assert list(meta.columns) == METADATA_COLUMNS
    assert len(meta) == 2 * 6 * 1
    assert meta.site_id.is_unique
    for row in meta.itertuples():
        chans, cells, nuclei = _site_files(small_plates, row.plate, row.well, row.site)
        for path in chans:
            image = iio.imread(path)
            assert image.dtype == np.uint8 and image.shape == (256, 256)
        assert cells.is_file() and nuclei.is_file()
        assert row.well_id == f"SYNTH_{row.plate}_{row.well}"
    # controls are exactly the negative-control wells, with the RxRx-style empty siRNA
    ctrl = meta.well_type == "negative_control"
    assert (meta.perturbation[ctrl] == "control").all()
    assert (meta.perturbation[~ctrl] != "control").all()
    assert (meta.sirna[ctrl] == "EMPTY").all()
    # every plate has every cell type, and controls of every type
    types = {c.name for c in CELL_TYPES}
    for _, plate in meta.groupby("plate"):
        assert set(plate.cell_type) == types
        assert set(plate.cell_type[plate.well_type == "negative_control"]) == types
    # the two small plates together still hold several treatments, a null one among them
    treated = set(meta.perturbation[~ctrl])
    assert len(treated) >= 5
    assert treated & {p.name for p in PERTURBATIONS if p.is_null}


def test_truth_matches_labels(small_plates):
    truth = pd.read_csv(small_plates / "truth.csv")
    meta = pd.read_csv(small_plates / "metadata.csv")
    assert {"plate", "well", "site", "label", "cell_type", "perturbation", "responded"} <= set(
        truth.columns
    )
    assert "mitotic" in truth.columns
    for row in meta.itertuples():
        rows = truth[
            (truth.plate == f"SYNTH_{row.plate}")
            & (truth.well == row.well)
            & (truth.site == row.site)
        ]
        _, cells_path, nuclei_path = _site_files(small_plates, row.plate, row.well, row.site)
        cells = tifffile.imread(cells_path)
        nuclei = tifffile.imread(nuclei_path)
        ids = set(np.unique(cells)) - {0}
        assert set(rows.label) == ids
        assert set(np.unique(nuclei)) - {0} == ids  # every cell has its nucleus, same id
        inside = nuclei > 0
        assert np.array_equal(nuclei[inside], cells[inside])  # nucleus i lies in cell i
        assert (rows.cell_type == row.cell_type).all()
        assert (rows.perturbation == row.perturbation).all()
        if row.perturbation == "control":
            assert not rows.responded.any()


def test_written_site_equals_generate_site(small_plates):
    """Sites are seeded by their coordinates only: the same pixels in any generation order."""
    meta = pd.read_csv(small_plates / "metadata.csv")
    row = meta.iloc[-1]
    site = generate_site(
        row.cell_type, row.perturbation, size=256, seed=0, plate=row.plate, well=row.well, site=1
    )
    chans, cells_path, _ = _site_files(small_plates, row.plate, row.well, 1)
    written = np.stack([iio.imread(p) for p in chans])
    assert np.array_equal(written, site.image)
    assert np.array_equal(tifffile.imread(cells_path), site.cells)


def test_deterministic_for_seed():
    a = generate_site("HUVEC", "mito_fragmentation", size=128, seed=5, well="C04", site=2)
    b = generate_site("HUVEC", "mito_fragmentation", size=128, seed=5, well="C04", site=2)
    c = generate_site("HUVEC", "mito_fragmentation", size=128, seed=6, well="C04", site=2)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.cells, b.cells)
    pd.testing.assert_frame_equal(a.truth, b.truth)
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == (len(CHANNELS), 128, 128) and a.image.dtype == np.uint8


@pytest.mark.parametrize("cell_type", ["HUVEC", "HEPG2"])
def test_perturbations_change_only_their_channels(cell_type):
    """Same site coordinates: null perturbations give the control's pixels, others differ
    from it in their named channels only (the cells are the same under every perturbation)."""
    kw = dict(size=192, seed=1, plate=1, well="D05", site=1)
    control = generate_site(cell_type, "control", **kw)
    for pert in PERTURBATIONS:
        site = generate_site(cell_type, pert, **kw)
        assert np.array_equal(site.cells, control.cells), pert.name
        changed = {
            CHANNELS[c] for c in range(6) if not np.array_equal(site.image[c], control.image[c])
        }
        if pert.is_null:
            assert changed == set(), pert.name
            assert not site.truth.responded.any()
        elif "nucleus_scale" in pert.effects:
            assert "DNA" in changed
            resp = site.truth.responded
            ratio = site.truth.nucleus_area / control.truth.nucleus_area
            assert ratio[resp].median() > 1.5 and ratio[~resp].median() == pytest.approx(1.0)
        else:
            assert changed == set(pert.channels), pert.name


def test_penetrance_below_one():
    for pert in PERTURBATIONS:
        assert 0.0 <= pert.penetrance < 1.0
    truth = pd.concat(
        [
            generate_site("HEPG2", "actin_fibres", size=256, seed=2, well="B02", site=s).truth
            for s in (1, 2, 3)
        ]
    )
    interphase = truth[~truth.mitotic]
    assert len(interphase) > 60
    frac = interphase.responded.mean()
    assert 0.45 < frac < 0.9  # penetrance 0.7: some cells respond, not all
    assert not truth.responded[truth.mitotic].any()


def test_mitotic_fraction():
    truth = pd.concat(
        [
            generate_site("HEPG2", "control", size=256, seed=4, well="C03", site=s).truth
            for s in range(1, 7)
        ]
    )
    assert len(truth) > 150
    assert abs(truth.mitotic.mean() - MITOTIC_FRACTION) < 0.035
    # mitotic cells are rounded and their condensed chromatin is bright
    site = generate_site("HEPG2", "control", size=256, seed=4, well="C03", site=1)
    t = site.truth
    dna = site.image[0].astype(float)
    mean_dna = np.array([dna[site.nuclei == lab].mean() for lab in t.label])
    if t.mitotic.any():
        assert mean_dna[t.mitotic.to_numpy()].mean() > 1.3 * mean_dna[~t.mitotic.to_numpy()].mean()


def test_batch_effects_differ_by_plate(small_plates):
    b1, b2 = PlateBatch.sample(0, 1), PlateBatch.sample(0, 2)
    assert not np.allclose(b1.gain, b2.gain)
    assert not np.allclose(b1.offset, b2.offset)
    ill = b1.illumination(64)
    assert ill.shape == (6, 64, 64) and ill.max() <= 1.2 and ill.min() < 0.95  # uneven field
    # background level in the written images follows each plate's offset
    meta = pd.read_csv(small_plates / "metadata.csv")
    bg = {}
    for p in (1, 2):
        rows = meta[meta.plate == p]
        vals = []
        for row in rows.itertuples():
            chans, cells_path, _ = _site_files(small_plates, p, row.well, row.site)
            background = tifffile.imread(cells_path) == 0
            vals.append([np.median(iio.imread(c)[background]) for c in chans])
        bg[p] = np.median(vals, axis=0)
    assert np.abs(bg[1] - bg[2]).max() > 1.0
    for p, b in ((1, b1), (2, b2)):
        assert np.allclose(bg[p], 6.0 + b.offset, atol=2.0)


def test_clean_site_without_batch():
    site = generate_site("U2OS", size=128, seed=0, batch=PlateBatch.none())
    background = site.cells == 0
    assert np.all(np.abs(np.median(site.image[:, background], axis=1) - 6) <= 1)


def test_plan_covers_all_perturbations_on_bigger_plates():
    plans = [w for p in (1, 2) for w in plan_plate(p, 24)]
    assert {w.perturbation for w in plans} == {"control"} | {p.name for p in PERTURBATIONS}
    assert len({(w.plate, w.well) for w in plans}) == 48
    assert well_names(24)[0] == "B02" and well_names(24)[-1] == "E07"
    with pytest.raises(ValueError):
        well_names(0)


def test_cli_synth_round_trip(tmp_path):
    from napari_concept_discovery.cli import main
    from napari_concept_discovery.plate import open_plate

    out = tmp_path / "plates"
    argv = ["synth", str(out), "--plates", "1", "--wells", "3", "--sites", "2", "--size", "96"]
    assert main([*argv, "--workers", "1"]) == 0
    plate = open_plate(out)
    assert len(plate) == 6
    assert tuple(plate.channel_names) == CHANNELS
    site = next(iter(plate))
    assert site.read().shape == (6, 96, 96)
    assert site.metadata["perturbation"] in {"control"} | {p.name for p in PERTURBATIONS}
    assert site.labels_path is not None and site.read_labels().max() > 0
    truth = pd.read_csv(out / "truth.csv")
    assert set(truth.plate) == {"SYNTH_1"}


# --- the "forms" variant ------------------------------------------------------------------

#: sha256 (first 16 hex digits) of image, cells, nuclei and truth of default-generator sites,
#: taken before the "forms" variant was added: the variant's own random stream must leave the
#: default generator's output bit-identical.
DEFAULT_SITE_HASHES = {
    ("HUVEC", "control"): "f1f672c8bd3d34f2",
    ("HEPG2", "er_aggregation"): "dea829eccbcf2046",
    ("U2OS", "golgi_dispersal"): "991957827472d6c4",
    ("HUVEC", "nucleolar_rna"): "543682984838e244",
    ("HEPG2", "mito_fragmentation"): "8ed097c6c9a0fdea",
    ("U2OS", "actin_fibres"): "bfd6be2a9b6dc9f4",
    ("HEPG2", "nuclear_enlargement"): "a0e908c1241cd263",
}


def _site_hash(site) -> str:
    import hashlib

    h = hashlib.sha256()
    for a in (site.image, site.cells, site.nuclei):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(site.truth.to_csv(index=False).encode())
    return h.hexdigest()[:16]


@pytest.mark.parametrize(("cell_type", "perturbation"), list(DEFAULT_SITE_HASHES))
def test_the_default_generator_is_bit_identical_to_before_the_variant(cell_type, perturbation):
    site = generate_site(cell_type, perturbation, size=128, seed=3, plate=2, well="C04", site=1)
    assert _site_hash(site) == DEFAULT_SITE_HASHES[cell_type, perturbation]


def test_the_default_plan_is_unchanged_and_the_variant_fills_the_same_slots():
    from napari_concept_discovery.synth.concepts import FORM_PERTURBATIONS

    before = [
        ("B02", "er_aggregation"), ("B03", "null_a"), ("B04", "golgi_dispersal"),
        ("B05", "control"), ("B06", "control"), ("C02", "nuclear_enlargement"),
        ("C03", "mito_fragmentation"), ("C04", "actin_fibres"), ("C05", "nucleolar_rna"),
        ("C06", "actin_fibres"), ("D02", "null_b"), ("D03", "control"),
    ]  # fmt: skip
    assert [(w.well, w.perturbation) for w in plan_plate(2, 12, seed=3)] == before
    assert plan_plate(2, 12, seed=3, variant="default") == plan_plate(2, 12, seed=3)
    slot = {p.name: f.name for p, f in zip(PERTURBATIONS, FORM_PERTURBATIONS, strict=True)}
    slot["control"] = "control"
    forms = plan_plate(2, 12, seed=3, variant="forms")
    assert [(w.well, w.perturbation) for w in forms] == [(w, slot[p]) for w, p in before]
    with pytest.raises(ValueError, match="variant must be one of default, forms, got 'x'"):
        plan_plate(1, 6, variant="x")


@pytest.mark.parametrize("cell_type", ["HUVEC", "U2OS"])
def test_the_variant_changes_its_stain_in_another_form_with_graded_penetrance(cell_type):
    """Each form perturbation changes only its own stain, only in responding cells, in the
    slot and stain of a default perturbation but with other effects and a lower penetrance;
    nulls stay null."""
    from napari_concept_discovery.synth.concepts import FORM_PERTURBATIONS

    kw = dict(size=256, seed=2, plate=1, well="C03", site=1)
    control = generate_site(cell_type, "control", **kw)
    seen = 0
    for pert, default in zip(FORM_PERTURBATIONS, PERTURBATIONS, strict=True):
        site = generate_site(cell_type, pert, **kw)
        assert np.array_equal(site.cells, control.cells), pert.name
        changed = {
            CHANNELS[c] for c in range(6) if not np.array_equal(site.image[c], control.image[c])
        }
        if pert.is_null:
            assert default.is_null and changed == set()
            continue
        assert set(pert.channels) == set(default.channels), pert.name
        assert pert.penetrance < default.penetrance and set(pert.effects).isdisjoint(
            default.effects
        )
        resp = site.truth.responded.to_numpy()
        assert changed == (set(pert.channels) if resp.any() else set()), pert.name
        if not resp.any() or resp.all():
            continue
        seen += 1
        c = CHANNELS.index(pert.channels[0])
        diff = np.abs(site.image[c].astype(float) - control.image[c].astype(float))
        labels = site.truth.label.to_numpy()
        per_cell = np.array([diff[site.cells == lab].mean() for lab in labels])
        # the noise is shared (same site stream), so a non-responder's pixels barely move
        assert np.median(per_cell[resp]) > 3 * np.median(per_cell[~resp]) + 0.1, pert.name
    assert seen >= 4  # most of the six had responders and non-responders on this site


def test_write_synthetic_plates_writes_the_variant(tmp_path):
    from napari_concept_discovery.synth import write_synthetic_plates
    from napari_concept_discovery.synth.concepts import FORM_PERTURBATIONS

    out = write_synthetic_plates(
        tmp_path / "p", n_plates=1, n_wells=12, n_sites=1, size=96, seed=1, workers=1,
        variant="forms",
    )  # fmt: skip
    meta = pd.read_csv(out / "metadata.csv")
    truth = pd.read_csv(out / "truth.csv")
    names = {p.name for p in FORM_PERTURBATIONS} | {"control"}
    assert set(meta.perturbation) <= names and set(truth.perturbation) <= names
    assert {"er_peripheral", "null_a"} <= set(meta.perturbation)
    with pytest.raises(ValueError, match="variant must be one of"):
        write_synthetic_plates(tmp_path / "q", n_plates=1, n_wells=3, size=96, variant="shapes")


def test_cli_synth_variant(tmp_path, capsys):
    from napari_concept_discovery.cli import main

    argv = ["synth", str(tmp_path / "p"), "--plates", "1", "--wells", "12", "--sites", "1"]
    assert main([*argv, "--size", "96", "--workers", "1", "--variant", "forms"]) == 0
    meta = pd.read_csv(tmp_path / "p" / "metadata.csv")
    assert "er_peripheral" in set(meta.perturbation)
    assert "er_aggregation" not in set(meta.perturbation)
    with pytest.raises(SystemExit):
        main([*argv, "--variant", "shapes"])
    assert "invalid choice: 'shapes'" in capsys.readouterr().err
