"""Dictionaries in views: a whitened and a centred part of one dictionary, in one file.

Whitening on the controls scales away what controls vary in (cell type, cell cycle), which the
centred view keeps; each part must be exactly the dictionary its view trains alone, and the
file must keep both (and older files still load).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import small_train
from napari_concept_discovery.analysis.concepts import feature_auroc
from napari_concept_discovery.analysis.encode import encode_store
from napari_concept_discovery.dictionary import (
    TrainSettings,
    WhitenSettings,
    load_dictionary,
    save_dictionary,
    train_on_store,
)
from napari_concept_discovery.dictionary.combined import CombinedDictionary
from napari_concept_discovery.dictionary.io import read_header
from napari_concept_discovery.dictionary.pipeline import view_checkpoint_path
from napari_concept_discovery.dictionary.views import parse_views
from napari_concept_discovery.embed.store import ActivationStore
from napari_concept_discovery.errors import DictionaryError
from napari_concept_discovery.settings import SettingsError

BOTH = small_train(views="whitened,centred")


@pytest.fixture(scope="module")
def store(tiny_store_path):
    return ActivationStore.open(tiny_store_path)


@pytest.fixture(scope="module")
def both(store, tmp_path_factory):
    path = tmp_path_factory.mktemp("views") / "both.safetensors"
    return train_on_store(store, BOTH, out=path)


def test_views_are_parsed_and_unknown_ones_refused():
    assert parse_views("centred, whitened") == ("whitened", "centred")
    assert parse_views("centered") == ("centred",)
    with pytest.raises(
        DictionaryError, match="views: raw; give one or more of whitened,within-type,centred"
    ):
        parse_views("whitened,raw")
    with pytest.raises(SettingsError, match="views"):
        TrainSettings(views="")


def test_each_view_is_the_whitening_with_its_mode():
    parts = dict(BOTH.view_settings())
    assert list(parts) == ["whitened", "centred"]
    assert parts["whitened"].whiten == BOTH.whiten
    assert parts["centred"].whiten == BOTH.whiten.replace(mode="center")
    assert {p.views for p in parts.values()} == {"whitened", "centred"}
    # a whitening that only centres gives one part; no whitening gives a plain dictionary
    centring = BOTH.replace(whiten=BOTH.whiten.replace(mode="center"))
    assert [v for v, _ in centring.view_settings()] == ["centred"]
    assert BOTH.replace(whiten=None).view_settings() == []


def test_a_dictionary_in_views_round_trips_in_one_file(store, both):
    d = load_dictionary(both.path)
    assert isinstance(d, CombinedDictionary)
    assert d.view_names == ("whitened", "centred") == d.meta.views
    assert d.n_atoms == 48 and [p.n_atoms for _, p in d.parts] == [24, 24]
    views = d.feature_views()
    assert list(views[:24]) == ["whitened"] * 24 and list(views[24:]) == ["centred"] * 24
    assert d.part("whitened").whitener.transform_ is not None  # PCA
    assert d.part("centred").whitener.transform_ is None  # centring only
    assert d.meta.train == BOTH.replace(tokens="concat")
    assert d.meta.within_chosen == d.part("whitened").meta.within_chosen
    assert d.meta.within_chosen.startswith("pooled (--whiten-within none)")
    assert d.part("centred").meta.within_chosen.startswith("centring only")
    assert set(d.meta.metrics["views"]) == {"whitened", "centred"}
    assert d.meta.metrics["n_atoms"] == 48
    header = read_header(both.path)
    assert header["format_version"] == "3" and header["views"] == '["whitened", "centred"]'
    for (name, a), (_, b) in zip(d.parts, both.dictionary.parts, strict=True):
        assert torch.equal(a.model.W, b.model.W.detach()), name
        assert a.meta == b.meta
    codes, _ = encode_store(store, d)
    before, _ = encode_store(store, both.dictionary)
    assert codes.shape == (before.shape[0], 48) and (codes != before).nnz == 0
    assert d.stain_attribution().shape == (48, 6)
    again = load_dictionary(save_dictionary(both.path.with_name("again.safetensors"), d))
    assert again.meta == d.meta and (encode_store(store, again)[0] != codes).nnz == 0
    with pytest.raises(DictionaryError, match="no view 'raw'"):
        d.part("raw")


def test_each_part_codes_as_the_dictionary_of_its_view_alone(store, both):
    codes, _ = encode_store(store, both.dictionary)
    for view, cols in (("whitened", slice(0, 24)), ("centred", slice(24, 48))):
        alone = train_on_store(store, BOTH.replace(views=view)).dictionary
        assert not isinstance(alone, CombinedDictionary)
        assert alone.meta.train.whiten.mode == {"whitened": "pca", "centred": "center"}[view]
        own, _ = encode_store(store, alone)
        assert (codes[:, cols] != own).nnz == 0, view
        assert own.nnz > 0


def test_a_format_2_file_of_one_view_still_loads(store, tmp_path):
    """A file of one view is laid out as in format 2; a format 2 header reads the same."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    trained = train_on_store(store, small_train(views="whitened"), out=tmp_path / "one.safetensors")
    with safe_open(str(trained.path), framework="pt") as fh:
        header = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    assert "views" not in header
    header["format_version"] = "2"
    save_file(tensors, str(tmp_path / "v2.safetensors"), metadata=header)
    old = load_dictionary(tmp_path / "v2.safetensors")
    assert not isinstance(old, CombinedDictionary) and old.feature_views() is None
    assert (encode_store(store, old)[0] != encode_store(store, trained.dictionary)[0]).nnz == 0


def test_a_damaged_view_is_refused_by_name(both, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(both.path), framework="pt") as fh:
        header = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    del header["checksum"]
    tensors["centred/atoms"] = tensors["centred/atoms"][:5].clone()
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=header)
    with pytest.raises(DictionaryError, match=r"'atoms' has shape .* \(its view 'centred'\)"):
        load_dictionary(tmp_path / "bad.safetensors")


def test_an_interrupted_training_in_views_resumes_to_the_same_dictionary(store, both, tmp_path):
    out = tmp_path / "r.safetensors"
    seen = {"train": 0}

    def cancel_in_second_view() -> bool:  # after the first view's 20 steps and 10 more
        return seen["train"] >= 30

    def progress(p) -> None:
        if p.stage == "train":
            seen["train"] = p.done

    stopped = train_on_store(
        store,
        BOTH.replace(checkpoint_every=5),
        out=out,
        progress=progress,
        cancel=cancel_in_second_view,
    )
    assert stopped.cancelled and stopped.path is None and not out.exists()
    assert view_checkpoint_path(out, "whitened").is_file()
    assert view_checkpoint_path(out, "centred").is_file()
    done = train_on_store(store, BOTH.replace(checkpoint_every=5), out=out, resume=True)
    assert not done.cancelled and done.path == out
    assert not view_checkpoint_path(out, "whitened").exists()
    assert not view_checkpoint_path(out, "centred").exists()
    resumed = load_dictionary(out)
    for (name, a), (_, b) in zip(resumed.parts, both.dictionary.parts, strict=True):
        assert torch.equal(a.model.W, b.model.W.detach()), name


class ArrayStore:
    """Tokens and their table held in memory, with the read API the pipeline takes from a
    store (docs: ``dictionary.pipeline``): how a plate whose answer is known is built here."""

    def __init__(self, tokens: np.ndarray, table: pd.DataFrame):
        self._tokens, self._table = tokens, table
        self.model_id, self.block, self.embed_dim = "arrays", 0, tokens.shape[1]
        self.channel_names, self.signature, self.path = ("all",), "arrays", "arrays"

    def tokens(self, unit, form=None):
        return self._tokens

    def table(self, unit):
        return self._table.copy()


def _plate_with_cell_types(seed: int, n_wells=16, per_well=120, d=24):
    """Two cell types in every well, controls included, far apart along one direction (the
    control variation whitening scales away); in treated wells 60% of cells shift along a
    direction in which the controls hardly vary (a perturbation)."""
    rng = np.random.default_rng(seed)
    tokens = rng.normal(0.0, 1.0, (n_wells * per_well, d))
    tokens[:, 1] *= 0.3
    well = np.repeat(np.arange(n_wells), per_well)
    control = well < n_wells // 2
    cell_a = np.tile(np.arange(per_well) % 2 == 1, n_wells)
    responded = ~control & (rng.random(len(well)) < 0.6)
    tokens[:, 0] += np.where(cell_a, 4.0, -4.0)
    tokens[responded, 1] += 1.5
    table = pd.DataFrame(
        {
            "plate": "P1",
            "well": [f"W{w:02d}" for w in well],
            "site": 1,
            "label": np.tile(np.arange(1, per_well + 1), n_wells),
            "well_type": np.where(control, "negative_control", "treatment"),
        }
    )
    return tokens.astype(np.float32), table, cell_a, responded, control


#: The library's default views and whitening on the controls, small enough for these plates.
PLATE_TRAIN = TrainSettings(
    atoms=16,
    sparsity=4,
    steps=200,
    batch_size=256,
    seed=0,
    checkpoint_every=0,
    whiten=WhitenSettings("well_type=negative_control"),
)


def test_the_centred_view_finds_a_cell_type_that_whitening_scales_away():
    tokens, table, cell_a, responded, control = _plate_with_cell_types(seed=0)
    store = ArrayStore(tokens, table)
    d = train_on_store(store, PLATE_TRAIN).dictionary
    # no cell-type column: the within-type view would be the pooled whitening, and is left out
    assert d.view_names == ("whitened", "centred")
    codes, _ = encode_store(store, d)
    views = d.feature_views()
    judged = control | responded  # responded cells against the controls

    def best(member, rows=slice(None)) -> dict[str, float]:
        auc = feature_auroc(codes[rows], member)
        return {v: float(np.nanmax(auc[views == v])) for v in ("whitened", "centred")}

    cell_type = best(cell_a)
    perturbation = best(responded[judged], judged)
    # measured: cell type 0.60 whitened, 0.85 centred; perturbation 0.94 whitened, 0.53 centred
    assert cell_type["centred"] > 0.8 and cell_type["whitened"] < 0.65
    assert perturbation["whitened"] > 0.85 and perturbation["centred"] < 0.65


def test_the_within_type_view_keeps_the_cell_type_that_pooled_whitening_scales_away():
    """With the cell type in the table, the default adds a third part whitened with the
    controls' covariance within cell types: the type difference is not taken for control
    variation, so that part finds the cell type the pooled whitening scales away, while the
    whitened part keeps the perturbation."""
    tokens, table, cell_a, responded, control = _plate_with_cell_types(seed=0)
    table["cell_type"] = np.where(cell_a, "A", "B")
    store = ArrayStore(tokens, table)
    settings = PLATE_TRAIN
    d = train_on_store(store, settings).dictionary
    assert d.view_names == ("whitened", "within-type", "centred") == d.meta.views
    assert d.part("within-type").whitener.within == "cell_type"
    assert d.part("whitened").whitener.within is None
    assert d.meta.within_chosen.startswith("pooled (--whiten-within none); within-type view: ")
    assert "covariance within cell_type: the controls hold 2 values" in d.meta.within_chosen
    codes, _ = encode_store(store, d)
    views = d.feature_views()
    assert list(views) == ["whitened"] * 16 + ["within-type"] * 16 + ["centred"] * 16
    judged = control | responded

    def best(member, rows=slice(None)) -> dict[str, float]:
        auc = feature_auroc(codes[rows], member)
        return {v: float(np.nanmax(auc[views == v])) for v in d.view_names}

    cell_type = best(cell_a)
    perturbation = best(responded[judged], judged)
    # measured: cell type 0.59 whitened, 0.86 within-type; perturbation 0.94 whitened
    assert cell_type["within-type"] > 0.8 and cell_type["whitened"] < 0.65
    assert perturbation["whitened"] > 0.85
    # the same part as the view trains alone
    alone = train_on_store(store, settings.replace(views="within-type")).dictionary
    assert alone.whitener.within == "cell_type"
    assert (encode_store(store, alone)[0] != codes[:, 16:32]).nnz == 0


def test_views_that_come_to_one_whitening_are_one_part():
    """within-type is dropped where it is the pooled whitening (the controls hold one cell
    type, or the table names none) or where the whitening already is within auto."""
    from napari_concept_discovery.dictionary.pipeline import distinct_views

    three = TrainSettings(whiten=WhitenSettings("well_type=negative_control"))
    parts = three.view_settings()
    assert [v for v, _ in parts] == ["whitened", "within-type", "centred"]
    assert dict(parts)["within-type"].whiten == three.whiten.replace(within="auto")
    auto = three.replace(whiten=three.whiten.replace(within="auto"))
    assert [v for v, _ in auto.view_settings()] == ["whitened", "centred"]
    only = three.replace(views="within-type", whiten=three.whiten.replace(within="auto"))
    assert [v for v, _ in only.view_settings()] == ["whitened"]
    rows = {"well_type": ["negative_control"] * 4 + ["treatment"] * 2, "plate": "P"}
    mixed = pd.DataFrame({**rows, "cell_type": ["A", "B", "A", "B", "A", "B"]})
    assert [v for v, _ in distinct_views(parts, mixed)] == ["whitened", "within-type", "centred"]
    one = pd.DataFrame({**rows, "cell_type": ["A", "A", "A", "A", "B", "B"]})
    assert [v for v, _ in distinct_views(parts, one)] == ["whitened", "centred"]
    assert [v for v, _ in distinct_views(parts, pd.DataFrame(rows))] == ["whitened", "centred"]
