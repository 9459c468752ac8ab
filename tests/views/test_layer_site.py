"""A site made of a user's layers: stains guessed from names, planes stacked in the model's
order, saved as a one-site plate that opens and embeds like any other, codes as a features
table."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from napari_concept_discovery.analysis.explore import SiteCodes
from napari_concept_discovery.errors import ConceptDiscoveryError
from napari_concept_discovery.views.layer_site import (
    CELL_PAINTING,
    LAYER_SITE,
    Plane,
    codes_table,
    feature_column,
    guess_mapping,
    planes_of,
    site_image,
    squeezed,
    stain_family,
    write_layer_plate,
)


def test_stains_guessed_from_names_only_where_they_say_it():
    names = ["w1_Hoechst.tif", "ConA", "Phalloidin 568", "SYTO14", "MitoTracker Deep Red", "img"]
    planes = [Plane(n) for n in names] + [Plane("stack", c) for c in range(3)]
    found = guess_mapping(CELL_PAINTING, planes)
    assert {s: (p.layer if p else None) for s, p in found.items()} == {
        "DNA": "w1_Hoechst.tif",
        "ER": "ConA",
        "Actin": "Phalloidin 568",
        "RNA": "SYTO14",
        "Mito": "MitoTracker Deep Red",
        "Membrane": None,  # "img" says nothing; the stack's channels are never guessed
    }
    # the stain's own name wins over a family word; a name two layers share is taken by none
    assert guess_mapping(["DNA"], [Plane("DNA"), Plane("Hoechst")])["DNA"] == Plane("DNA")
    assert guess_mapping(["DNA"], [Plane("Hoechst a"), Plane("DAPI b")])["DNA"] is None
    assert stain_family("nucleolar RNA") == "rna" and stain_family("brightfield") is None


def test_planes_of_layers_of_any_reader():
    assert planes_of("a", (64, 64)) == [Plane("a")]
    assert planes_of("s", (3, 64, 64)) == [Plane("s", 0), Plane("s", 1), Plane("s", 2)]
    # OME-Zarr's (t, c, z, y, x) with length-1 axes is a stack of its channels
    assert planes_of("z", (1, 2, 1, 64, 64)) == [Plane("z", 0), Plane("z", 1)]
    assert planes_of("rgb", (64, 64, 3), rgb=True) == []
    assert planes_of("movie", (5, 3, 64, 64)) == []  # time and channels: not one site
    assert squeezed(np.zeros((1, 2, 1, 4, 5))).shape == (2, 4, 5)


def test_site_image_in_the_stains_order_and_refusals_that_name_the_layer():
    a = np.full((8, 9), 1, np.uint8)
    stack = np.stack([np.full((8, 9), v, np.uint8) for v in (2, 3)])
    image = site_image(
        {"ER": Plane("stack", 1), "DNA": Plane("a"), "RNA": Plane("stack", 0)},
        {"a": a, "stack": stack[None]},  # a leading length-1 axis, as OME-Zarr has
    )
    assert image.shape == (3, 8, 9) and image[:, 0, 0].tolist() == [3, 1, 2]
    with pytest.raises(ConceptDiscoveryError, match="stain.*ER"):
        site_image({"DNA": Plane("a"), "ER": None}, {"a": a})
    with pytest.raises(ConceptDiscoveryError, match="differ in shape.*b"):
        site_image({"DNA": Plane("a"), "ER": Plane("b")}, {"a": a, "b": np.zeros((4, 4))})
    with pytest.raises(ConceptDiscoveryError, match="'stack'.*no channel 5"):
        site_image({"DNA": Plane("stack", 5)}, {"stack": stack})


def test_layer_plate_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 4000, (3, 40, 48)).astype(np.uint16)
    labels = np.zeros((40, 48), np.int32)
    labels[5:15, 5:20], labels[20:35, 10:40] = 1, 7
    plate = write_layer_plate(tmp_path, image, ["DNA", "ER", "RNA"], labels)
    assert plate.channel_names == ("DNA", "ER", "RNA") and plate.keys == [LAYER_SITE]
    site = plate[LAYER_SITE]
    np.testing.assert_array_equal(site.read(), image)
    np.testing.assert_array_equal(site.read_labels(), labels)
    # the same pixels give the same folder (a store made from it is reused); others another
    again = write_layer_plate(tmp_path, image, ["DNA", "ER", "RNA"], labels)
    assert again.root == plate.root
    other = write_layer_plate(tmp_path, image, ["DNA", "ER", "RNA"], labels[::-1].copy())
    assert other.root != plate.root
    assert write_layer_plate(tmp_path, image, ["DNA", "ER", "RNA"]).root != plate.root
    with pytest.raises(ConceptDiscoveryError, match="cells layer 'mine'.*\\(40, 48\\)"):
        write_layer_plate(tmp_path, image, ["DNA", "ER", "RNA"], labels[:10], "mine")
    with pytest.raises(ConceptDiscoveryError, match="8- or 16-bit"):
        write_layer_plate(tmp_path, image.astype(np.float32) / 7, ["DNA", "ER", "RNA"])


def test_codes_table_is_napari_features_layout():
    import pandas as pd

    codes = sp.csr_matrix(np.array([[0.0, 1.5, 0.0], [2.0, 0.0, 0.25]], np.float32))
    sc = SiteCodes(
        LAYER_SITE, (1, 1), 16, sp.csr_matrix((1, 3)), codes, pd.DataFrame({"label": [4, 9]})
    )
    table = codes_table(sc)
    assert list(table.columns) == ["label", "f0000", "f0001", "f0002"]
    assert table["label"].tolist() == [4, 9]
    np.testing.assert_array_equal(table.iloc[:, 1:].to_numpy(), codes.toarray())


def test_codes_table_keeps_the_most_active_features_of_a_large_dictionary():
    import pandas as pd

    rng = np.random.default_rng(0)
    dense = np.zeros((5, 12000), np.float32)  # wider than 9999: five-digit names
    active = rng.choice(12000, 40, replace=False)
    dense[:, active] = rng.random((5, 40), dtype=np.float32) + 0.01
    sc = SiteCodes(
        LAYER_SITE,
        (1, 1),
        16,
        sp.csr_matrix((1, 12000)),
        sp.csr_matrix(dense),
        pd.DataFrame({"label": np.arange(1, 6)}),
    )
    every_active = codes_table(sc, max_features=64)
    assert list(every_active.columns[1:]) == [f"f{f:05d}" for f in sorted(active)]
    top = codes_table(sc, max_features=10)
    expected = sorted(active[np.argsort(-dense[:, active].sum(0))[:10]])
    assert list(top.columns[1:]) == [feature_column(f, 12000) for f in expected]
    np.testing.assert_array_equal(top.iloc[:, 1:].to_numpy(), dense[:, expected])
    assert feature_column(7, 16) == "f0007" and feature_column(7, 12000) == "f00007"
