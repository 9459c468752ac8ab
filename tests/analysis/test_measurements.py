"""Per-cell measurements and the feature descriptions built from them, on images where the
answer is known: a hand-made site, and synthetic plates whose perturbations change one stain."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from helpers import small_train
from napari_concept_discovery.analysis import measurements as M
from napari_concept_discovery.analysis.analyze import analyze_store
from napari_concept_discovery.analysis.truth import join_truth, read_truth
from napari_concept_discovery.dictionary.pipeline import train_on_store
from napari_concept_discovery.dictionary.settings import (
    AnalyzeSettings,
    WhitenSettings,
)
from napari_concept_discovery.errors import StoreError
from napari_concept_discovery.synth.concepts import PERTURBATION_BY_NAME


def _hand_made_site():
    """Two cells, 60 x 60 px each, with a nucleus each; Mito flat in cell 1 and in 4 x 4 px
    puncta (every 8 px) on a dim background in cell 2."""
    cells = np.zeros((80, 160), np.int32)
    cells[10:70, 10:70] = 1
    cells[10:70, 90:150] = 2
    dna = np.zeros(cells.shape, np.float32)
    dna[30:50, 30:50] = 0.8  # nucleus 1: 400 px
    dna[25:55, 105:135] = 0.8  # nucleus 2: 900 px
    mito = np.zeros(cells.shape, np.float32)
    mito[10:70, 10:70] = 0.5
    mito[10:70, 90:150] = 0.1  # a dim cell (zero pixels are outside texture's co-occurrences)
    for y in range(12, 68, 8):
        for x in range(92, 148, 8):
            mito[y : y + 4, x : x + 4] = 1.0
    return np.stack([dna, mito]), cells


def test_measure_site_on_a_hand_made_site():
    image, cells = _hand_made_site()
    m = M.measure_site(image, cells, ["DNA", "Mito"]).set_index("label")
    assert list(m.index) == [1, 2]
    np.testing.assert_array_equal(m["Cells_AreaShape_Area"], [3600, 3600])
    np.testing.assert_array_equal(m["Nuclei_AreaShape_Area"], [400, 900])
    np.testing.assert_array_equal(m["Cytoplasm_AreaShape_Area"], [3200, 2700])
    # intensities as given (floats in [0, 1]); CellProfiler's names
    np.testing.assert_allclose(
        m["Cells_Intensity_MeanIntensity_Mito"], [0.5, (49 * 16 + 0.1 * (3600 - 49 * 16)) / 3600]
    )
    np.testing.assert_allclose(m["Nuclei_Intensity_IntegratedIntensity_DNA"], [320, 720])
    np.testing.assert_allclose(m["Cytoplasm_Intensity_MeanIntensity_DNA"], [0, 0])
    np.testing.assert_allclose(m.loc[1, "Cells_Intensity_StdIntensity_Mito"], 0, atol=1e-12)
    # flat signal has no texture and no granularity; puncta have both
    for d in ("00", "01", "02", "03"):
        assert m.loc[1, f"Cells_Texture_Contrast_Mito_3_{d}_256"] == 0
        assert m.loc[2, f"Cells_Texture_Contrast_Mito_3_{d}_256"] > 100
    assert m.loc[1, "Cells_Granularity_1_Mito"] < 5
    assert m.loc[2, "Cells_Granularity_1_Mito"] > 50
    # the spectrum (at a quarter of the resolution) peaks where the opening removes the object:
    # the 20 px nucleus at step 3, the 30 px one a step later
    dna = m[[f"Cells_Granularity_{k}_DNA" for k in range(1, M.GRANULARITY_STEPS + 1)]]
    assert list(dna.to_numpy().argmax(axis=1) + 1) == [3, 4]
    # radial distribution in cells only: the nuclear stain sits in the centre rings
    inner = m.loc[1, [f"Cells_RadialDistribution_FracAtD_DNA_{k}of4" for k in (1, 2)]]
    assert inner.sum() == pytest.approx(1.0)
    assert m.loc[1, "Cells_RadialDistribution_FracAtD_DNA_4of4"] == 0
    assert not [c for c in m.columns if c.startswith(("Nuclei_Radial", "Cytoplasm_Radial"))]
    # a cell's granularity, from its nucleus' and cytoplasm's in one pass, is what measuring
    # the cell alone gives
    from cp_measure.core.measuregranularity import get_granularity

    for c, stain in enumerate(("DNA", "Mito")):
        direct = get_granularity(
            cells, image[c], granular_spectrum_length=M.GRANULARITY_STEPS, **M.GRANULARITY
        )
        for k in range(1, M.GRANULARITY_STEPS + 1):
            np.testing.assert_allclose(
                m[f"Cells_Granularity_{k}_{stain}"], direct[f"Granularity_{k}"], atol=1e-9
            )
    # 8-bit images are read on the type's scale, as CellProfiler does
    as8 = M.measure_site((image * 255).astype(np.uint8), cells, ["DNA", "Mito"])
    np.testing.assert_allclose(
        as8["Cells_Intensity_MeanIntensity_Mito"],
        [0.5, (49 * 16 + 0.1 * (3600 - 49 * 16)) / 3600],
        atol=0.01,
    )
    # a cell without a nucleus: nuclear area 0, nuclear measurements NaN, its cell's granularity
    # that of its cytoplasm
    three, lit = cells.copy(), image.copy()
    three[72:79, 10:60] = 3
    lit[1, 72:79, 10:60] = 0.3
    m3 = M.measure_site(lit, three, ["DNA", "Mito"]).set_index("label")
    assert m3.loc[3, "Nuclei_AreaShape_Area"] == 0
    assert np.isnan(m3.loc[3, "Nuclei_Intensity_MeanIntensity_Mito"])
    assert m3.loc[3, "Cells_Granularity_1_Mito"] == m3.loc[3, "Cytoplasm_Granularity_1_Mito"]
    # an object without any signal has no granularity spectrum (not a division by epsilon)
    assert np.isnan(m3.loc[3, "Cells_Granularity_1_DNA"])
    # a seeded sample: the other cell's row is NaN
    one = M.measure_site(image, cells, ["DNA", "Mito"], max_cells=1, seed=0)
    assert one["Cells_AreaShape_Area"].isna().sum() == 1
    # without a nuclear stain: cells only
    only = M.measure_site(image[1:], cells, ["Mito"])
    assert not [c for c in only.columns if c.startswith(("Nuclei", "Cytoplasm"))]
    assert "Cells_Granularity_1_Mito" in only.columns
    with pytest.raises(ValueError, match="channels"):
        M.measure_site(image, cells, ["Mito"])


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("Cells_Texture_Contrast_Mito_3_00_256", ("Cells", "Texture_Contrast", "Mito", "3_00_256")),
        ("Nuclei_Granularity_2_my_DNA", ("Nuclei", "Granularity", "my_DNA", "2")),
        (
            "Cells_RadialDistribution_FracAtD_RNA_1of4",
            ("Cells", "RadialDistribution_FracAtD", "RNA", "1of4"),
        ),
        ("Cytoplasm_AreaShape_Area", ("Cytoplasm", "AreaShape_Area", "", "")),
        ("Cells_Intensity_MeanIntensity_ER", ("Cells", "Intensity_MeanIntensity", "ER", "")),
    ],
)
def test_parse_name_reads_cellprofiler_names(name, parts):
    """(compartment, measure, stain, parameters) of a CellProfiler column name."""
    assert M.parse_name(name) == parts


def test_describe_names_the_stain_and_sign():
    rng = np.random.default_rng(0)
    gran = rng.normal(size=400)
    meas = pd.DataFrame(
        {
            "plate": "P",
            "well": "A01",
            "site": 1,
            "label": np.arange(400),
            "Cells_AreaShape_Area": rng.normal(size=400),
            "Cells_Granularity_2_Mito": gran,
            # one texture in four directions: named once
            **{
                f"Cells_Texture_Contrast_Mito_3_0{d}_256": gran + 0.3 * rng.normal(size=400)
                for d in range(4)
            },
            "Nuclei_AreaShape_Area": rng.normal(size=400),
        }
    )
    act = np.maximum(meas["Cells_Granularity_2_Mito"] - 0.5, 0)  # sparse, follows granularity
    act2 = np.maximum(-meas["Nuclei_AreaShape_Area"], 0)  # follows small nuclei
    d = M.describe_features(sp.csr_matrix(np.stack([act, act2], 1)), meas)
    text = d.loc[0, "description"]
    assert text.startswith("Mito: granularity 2 up (0."), text
    assert text.count("texture contrast") == 1, text
    assert d.loc[0, "top_measurements"][0] == "Cells_Granularity_2_Mito"
    assert d.loc[0, "top_correlations"][0] > 0.6
    assert d.loc[1, "description"].startswith("shape: nuclear area down (0.")
    assert d.loc[1, "top_correlations"][0] < -0.6


@pytest.fixture(scope="module")
def twelve_wells(tmp_path_factory):
    """Two synthetic plates whose 12 wells hold every perturbation, embedded by the bundled
    default model (as a user's plate is), and their measurements (cached beside the store)."""
    from napari_concept_discovery.embed.plate import EmbedSettings, embed_plate
    from napari_concept_discovery.synth import write_synthetic_plates

    root = tmp_path_factory.mktemp("describe")
    plates = write_synthetic_plates(
        root / "plates", n_plates=2, n_wells=12, n_sites=1, size=256, seed=0, workers=1
    )
    store = embed_plate(plates, EmbedSettings(), root / "store.zarr")
    M.store_measurements(store)
    return plates, store


@pytest.mark.parametrize(
    "perturbation", ["er_aggregation", "nucleolar_rna", "golgi_dispersal", "actin_fibres"]
)
def test_a_one_stain_perturbation_is_described_by_that_stain(twelve_wells, perturbation):
    """The ideal feature of a perturbation (active exactly on its responding cells) is
    described first by the one stain the perturbation changes."""
    plates, store = twelve_wells
    table = join_truth(store.table("cell"), read_truth(plates / "truth.csv"))
    meas = M.store_measurements(store)
    responded = table["responded"].astype(str).str.lower().isin(("true", "1")).to_numpy()
    member = (table["perturbation"].astype(str).to_numpy() == perturbation) & responded
    assert member.sum() >= 10
    d = M.describe_features(sp.csr_matrix(member[:, None].astype(np.float32)), meas)
    (stain,) = PERTURBATION_BY_NAME[perturbation].channels
    text = d.loc[0, "description"]
    assert text.startswith(f"{stain}: "), text
    assert M.parse_name(d.loc[0, "top_measurements"][0])[2] == stain


def test_the_best_trained_feature_for_a_one_stain_perturbation_is_described_by_it(twelve_wells):
    """Through the product's path (store, whitened ICFL dictionary, encoding): the feature
    that best separates the ER-aggregation responders from their controls (AUROC) is described
    first by ER measurements."""
    from sklearn.metrics import roc_auc_score

    from napari_concept_discovery.analysis.encode import encode_store
    from napari_concept_discovery.analysis.truth import truth_concepts

    plates, store = twelve_wells
    whiten = WhitenSettings(controls="well_type=negative_control")
    settings = small_train(atoms=16, n_pick=None, steps=300, batch_size=128, seed=0, whiten=whiten)
    dictionary = train_on_store(store, settings).dictionary
    codes, _ = encode_store(store, dictionary)
    table = join_truth(store.table("cell"), read_truth(plates / "truth.csv"))
    (concept,) = [c for c in truth_concepts(table) if c.name == "er_aggregation"]
    dense = codes[concept.rows].toarray()
    aurocs = [roc_auc_score(concept.member, dense[:, f]) for f in range(dense.shape[1])]
    best = int(np.argmax(aurocs))
    assert aurocs[best] >= 0.9, aurocs
    d = M.describe_features(codes, M.store_measurements(store))
    text = d.loc[best, "description"]
    assert text.startswith("ER: "), text
    assert M.parse_name(d.loc[best, "top_measurements"][0])[2] == "ER"


def test_analyze_writes_the_descriptions_of_the_cached_measurements(twelve_wells, tmp_path):
    _, store = twelve_wells
    centred = WhitenSettings(controls="well_type=negative_control", mode="center")
    settings = small_train(atoms=16, n_pick=None, steps=30, seed=0, whiten=centred)
    dictionary = train_on_store(store, settings).dictionary
    path = M.cache_path(store)
    cached = pd.read_parquet(path)
    a = analyze_store(store, dictionary, AnalyzeSettings(), tmp_path / "an")
    feats = pd.read_parquet(a.paths["features"])
    assert {"description", "top_measurements", "top_correlations"} <= set(feats.columns)
    want = M.describe_features(a.codes, cached)
    assert list(feats["description"]) == list(want["description"])
    described = feats[feats["description"] != ""]
    assert len(described) > 0
    row = described.iloc[0]
    assert len(row["top_measurements"]) == len(row["top_correlations"]) >= 1
    adata = ad.read_h5ad(a.paths["h5ad"])
    assert list(adata.var["description"]) == list(feats["description"])
    assert adata.var["top_measurements"].iloc[int(row["feature"])] == "; ".join(
        row["top_measurements"]
    )
    # --no-describe leaves it out
    b = analyze_store(store, dictionary, AnalyzeSettings(describe=False), tmp_path / "an2")
    assert "description" not in pd.read_parquet(b.paths["features"]).columns


def test_the_cache_is_reused_and_rebuilt_when_stale(tmp_path, monkeypatch):
    """On a small store: the cache is read back while nothing changed, measured again for
    another store, another cells budget or another version of the measurements, and a file
    that is not ours is refused by name."""
    import torch

    from napari_concept_discovery.embed.plate import EmbedSettings, embed_plate
    from napari_concept_discovery.models.backend import ChannelAgnosticBackend
    from napari_concept_discovery.models.vit import ChannelAgnosticViT
    from napari_concept_discovery.synth import write_synthetic_plates

    plates = write_synthetic_plates(
        tmp_path / "plates", n_plates=1, n_wells=3, n_sites=1, size=128, seed=0, workers=1
    )
    torch.manual_seed(0)
    vit = ChannelAgnosticViT(embed_dim=32, depth=2, num_heads=2, max_channels=6)
    backend = ChannelAgnosticBackend(vit, model_id="tiny-random", weights_hash="0", default_block=1)
    store = embed_plate(
        plates, EmbedSettings(precision="fp32"), tmp_path / "s.zarr", backend=backend
    )
    path = M.cache_path(store)
    first = M.store_measurements(store)
    assert path.is_file() and first["Cells_AreaShape_Area"].notna().all()
    assert len(first) == len(store.table("cell"))
    stamp = path.stat().st_mtime_ns
    again = M.store_measurements(store)
    pd.testing.assert_frame_equal(again, first)
    assert path.stat().st_mtime_ns == stamp  # read, not measured again
    stale = first.copy()
    stale.iloc[:, 4] = -1.0
    M._write_cached(stale, path, "another store")
    pd.testing.assert_frame_equal(M.store_measurements(store), first)
    # a budget of 3 cells measures one cell per site; the others are NaN
    sampled = M.store_measurements(store, max_cells=3)
    assert sampled["Cells_AreaShape_Area"].notna().sum() == len(store.sites()) == 3
    # a table of an older version of the measurements is not trusted
    M._write_cached(stale, path, M._signature(store, None))
    pd.testing.assert_frame_equal(M.store_measurements(store), stale)
    monkeypatch.setattr(M, "VERSION", M.VERSION + 1)
    pd.testing.assert_frame_equal(M.store_measurements(store), first)
    # a file that is not ours is refused by name, not overwritten
    pd.DataFrame({"x": [1]}).to_parquet(path)
    with pytest.raises(StoreError, match="not written by concept-discovery"):
        M.store_measurements(store)


def test_the_cache_is_measured_again_when_an_image_changes_under_the_same_cells(tmp_path):
    """A site re-imaged into the same cell labels (same cell table) gives a store with another
    data hash; its cached measurements must not be trusted."""
    import imageio.v3 as iio
    import torch

    from napari_concept_discovery.embed.plate import EmbedSettings, embed_plate
    from napari_concept_discovery.models.backend import ChannelAgnosticBackend
    from napari_concept_discovery.models.vit import ChannelAgnosticViT
    from napari_concept_discovery.synth import write_synthetic_plates

    plates = write_synthetic_plates(
        tmp_path / "plates", n_plates=1, n_wells=3, n_sites=1, size=128, seed=0, workers=1
    )
    torch.manual_seed(0)
    vit = ChannelAgnosticViT(embed_dim=32, depth=2, num_heads=2, max_channels=6)
    backend = ChannelAgnosticBackend(vit, model_id="tiny-random", weights_hash="0", default_block=1)

    def embed():
        return embed_plate(
            plates, EmbedSettings(precision="fp32"), tmp_path / "s.zarr", backend=backend
        )

    store = embed()
    first = M.store_measurements(store, max_cells=None)
    col = "Cells_Intensity_MeanIntensity_ER"
    png = sorted((plates / "images").rglob("*_w2.png"))[0]  # ER of the first site
    iio.imwrite(png, (iio.imread(png) // 2).astype(np.uint8))
    store = embed()
    pd.testing.assert_frame_equal(
        store.table("cell")[list(M.KEYS)], first[list(M.KEYS)], check_dtype=False
    )
    again = M.store_measurements(store, max_cells=None)
    site = png.name.split("_w")[0]  # B02_s1
    well = site.split("_")[0]
    mine = (again["well"] == well).to_numpy()
    assert mine.any() and (~mine).any()
    ratio = again.loc[mine, col].to_numpy() / first.loc[mine, col].to_numpy()
    assert np.allclose(ratio, 0.5, atol=0.03)  # measured again on the darker image
    np.testing.assert_allclose(again.loc[~mine, col], first.loc[~mine, col])
