"""Per-cell measurements and the feature descriptions built from them, on images where the
answer is known: a hand-made site, and synthetic plates whose perturbations change one stain."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

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


def test_measure_site_on_a_hand_made_site():
    cells = np.zeros((20, 30), np.int32)
    cells[2:8, 2:12] = 1  # 60 px
    cells[10:18, 15:25] = 2  # 80 px
    dna = np.zeros((20, 30), np.float32)
    dna[4:6, 4:8] = 1.0  # cell 1's nucleus: 8 px
    dna[12:16, 17:22] = 1.0  # cell 2's nucleus: 20 px
    mito = np.zeros((20, 30), np.float32)
    mito[2:8, 2:12] = 0.5  # flat in cell 1
    mito[10:18, 15:25][::2, ::2] = 0.5  # puncta in cell 2
    m = M.measure_site(np.stack([dna, mito]), cells, ["DNA", "Mito"]).set_index("label")
    assert list(m.index) == [1, 2]
    np.testing.assert_array_equal(m["Cells_AreaShape_Area"], [60, 80])
    np.testing.assert_array_equal(m["Nuclei_AreaShape_Area"], [8, 20])
    np.testing.assert_array_equal(m["Cytoplasm_AreaShape_Area"], [52, 60])
    # intensities on the site's own scale (its maximum is 1)
    np.testing.assert_allclose(m["Cells_Intensity_MeanIntensity_Mito"], [0.5, 0.5 * 20 / 80])
    np.testing.assert_allclose(m["Cells_Intensity_IntegratedIntensity_DNA"], [8, 20])
    np.testing.assert_allclose(m.loc[1, "Cells_Intensity_StdIntensity_Mito"], 0, atol=1e-12)
    # flat signal has no texture and little granularity (only its corners, which the radius-2
    # opening removes); single-pixel puncta have both, all their signal is granular
    assert m.loc[1, "Cells_Texture_Contrast_Mito"] == 0
    assert m.loc[2, "Cells_Texture_Contrast_Mito"] > 0.1
    assert m.loc[1, "Cells_Granularity_2_Mito"] < 0.25
    assert m.loc[2, "Cells_Granularity_2_Mito"] == pytest.approx(1.0)
    # without a nuclear stain: cells only
    only = M.measure_site(mito[None], cells, ["Mito"])
    assert not [c for c in only.columns if c.startswith(("Nuclei", "Cytoplasm"))]


def test_describe_names_the_stain_and_sign():
    rng = np.random.default_rng(0)
    meas = pd.DataFrame(
        {
            "plate": "P",
            "well": "A01",
            "site": 1,
            "label": np.arange(400),
            "Cells_Granularity_2_Mito": rng.normal(size=400),
            "Cells_Texture_Contrast_Mito": rng.normal(size=400),
            "Nuclei_AreaShape_Area": rng.normal(size=400),
        }
    )
    act = np.maximum(meas["Cells_Granularity_2_Mito"] - 0.5, 0)  # sparse, follows granularity
    act2 = np.maximum(-meas["Nuclei_AreaShape_Area"], 0)  # follows small nuclei
    d = M.describe_features(sp.csr_matrix(np.stack([act, act2], 1)), meas)
    assert d.loc[0, "description"].startswith("Mito: granularity up (0.")
    assert d.loc[0, "top_measurements"][0] == "Cells_Granularity_2_Mito"
    assert d.loc[0, "top_correlations"][0] > 0.6
    assert d.loc[1, "description"].startswith("shape: nuclear area down (0.")
    assert d.loc[1, "top_correlations"][0] < -0.6


@pytest.fixture(scope="module")
def twelve_wells(tmp_path_factory):
    """One synthetic plate whose 12 wells hold every perturbation, embedded by a tiny ViT."""
    from napari_concept_discovery.embed.plate import EmbedSettings, embed_plate
    from napari_concept_discovery.models.backend import ChannelAgnosticBackend
    from napari_concept_discovery.models.vit import ChannelAgnosticViT
    from napari_concept_discovery.synth import write_synthetic_plates

    root = tmp_path_factory.mktemp("describe")
    plates = write_synthetic_plates(
        root / "plates", n_plates=2, n_wells=12, n_sites=1, size=256, seed=0
    )
    torch.manual_seed(0)
    vit = ChannelAgnosticViT(embed_dim=32, depth=2, num_heads=2, max_channels=6)
    backend = ChannelAgnosticBackend(vit, model_id="tiny-random", weights_hash="0", default_block=1)
    store = embed_plate(plates, EmbedSettings(), root / "store.zarr", backend=backend)
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
    assert d.loc[0, "top_measurements"][0].endswith(f"_{stain}")


def test_analyze_writes_descriptions_and_the_cache_is_rebuilt_when_stale(twelve_wells, tmp_path):
    _, store = twelve_wells
    centred = WhitenSettings(controls="well_type=negative_control", mode="center")
    settings = small_train(atoms=16, n_pick=None, steps=30, seed=0, whiten=centred)
    dictionary = train_on_store(store, settings).dictionary
    path = M.cache_path(store)
    path.unlink(missing_ok=True)
    a = analyze_store(store, dictionary, AnalyzeSettings(), tmp_path / "an")
    assert path.is_file()
    feats = pd.read_parquet(a.paths["features"])
    assert {"description", "top_measurements", "top_correlations"} <= set(feats.columns)
    described = feats[feats["description"] != ""]
    assert len(described) > 0
    row = described.iloc[0]
    assert len(row["top_measurements"]) == len(row["top_correlations"]) >= 1
    adata = ad.read_h5ad(a.paths["h5ad"])
    assert list(adata.var["description"]) == list(feats["description"])
    assert adata.var["top_measurements"].iloc[int(row["feature"])] == "; ".join(
        row["top_measurements"]
    )
    # the cache is read back while the store is unchanged, and rebuilt when it is not its own
    again = M.store_measurements(store)
    pd.testing.assert_frame_equal(again, pd.read_parquet(path))
    stale = again.copy()
    stale.iloc[:, 4] = -1.0
    M._write_cached(stale, path, "another store")
    rebuilt = M.store_measurements(store)
    pd.testing.assert_frame_equal(rebuilt, again)
    # a file that is not ours is refused by name, not overwritten
    pd.DataFrame({"x": [1]}).to_parquet(path)
    with pytest.raises(StoreError, match="not written by concept-discovery"):
        M.store_measurements(store)
    path.unlink()
    # --no-describe leaves it out
    b = analyze_store(store, dictionary, AnalyzeSettings(describe=False), tmp_path / "an2")
    assert "description" not in pd.read_parquet(b.paths["features"]).columns
    assert not path.exists()
