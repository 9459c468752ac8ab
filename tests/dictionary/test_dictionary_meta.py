"""DictionaryMeta: one typed record of a dictionary's provenance, the whitening recorded once.

``tests/data/dictionary_v1`` holds a file written by the code before this record (whitening
recorded three times, ``seed`` and ``batch_size`` beside the training settings), with the
tokens it was trained on and the codes it gave then (``make.py`` says how it was made).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_concept_discovery.dictionary import load_dictionary, save_dictionary
from napari_concept_discovery.dictionary.io import read_header
from napari_concept_discovery.dictionary.meta import DictionaryMeta
from napari_concept_discovery.dictionary.settings import TrainSettings, WhitenSettings
from napari_concept_discovery.errors import DictionaryError

OLD = Path(__file__).parents[1] / "data" / "dictionary_v1"

#: What the old file records, as the typed record (read off its header by hand).
OLD_META = DictionaryMeta(
    unit="cell",
    tokens="concat",
    token_groups=2,
    model_id="tiny-vit",
    model_source="timm:tiny?seed=1",
    weights_hash="ab" * 32,
    block=3,
    embed_dim=16,
    channel_names=("DNA", "RNA"),
    signature="0123456789abcdef",
    train=TrainSettings(
        atoms=24,
        sparsity=4,
        n_pick=2,
        steps=20,
        batch_size=64,
        seed=3,
        checkpoint_every=0,
        tokens="concat",
        whiten=WhitenSettings("well_type=negative_control", by="plate", n_components=8, eps=1e-5),
    ),
    n_tokens=240,
    nonfinite_dropped=0,
    steps=20,
    steps_chosen="20 steps: as given",
    samples=1280,
    metrics={
        "dead_fraction": 0.0,
        "fvu": 0.2503817708759672,
        "l0": 4.0,
        "mean_cosine": 0.8783513649220491,
        "n_atoms": 24,
        "n_dead": 0,
        "n_tokens": 240,
    },
)


def _old_tokens():
    data = np.load(OLD / "tokens.npz")
    table = pd.DataFrame(
        {k[len("table_") :]: data[k] for k in data.files if k.startswith("table_")}
    )
    return data["tokens"], table, data["codes"]


def test_old_file_reads_to_the_record_and_encodes_as_before():
    header = read_header(OLD / "old_format.safetensors")
    old = json.loads(header["meta"])
    # the layout this test is about: three copies of the whitening, one without eps, one
    # calling ``by`` group_by
    assert "eps" not in old["whitening"] and old["train_settings"]["whiten"]["eps"] == 1e-5
    assert json.loads(header["whitener"])["params"]["group_by"] == "plate"
    d = load_dictionary(OLD / "old_format.safetensors")
    assert d.meta == OLD_META and d.meta.extra == {}
    assert d.meta.whitening.eps == 1e-5 and d.meta.controls == "well_type=negative_control"
    assert d.whitener.eps == 1e-5 and d.whitener.group_by == "plate"
    tokens, table, codes = _old_tokens()
    np.testing.assert_array_equal(d.encode_table(tokens, table).toarray(), codes)


def test_saving_records_the_whitening_once_and_reads_back_the_same(tmp_path):
    d = load_dictionary(OLD / "old_format.safetensors")
    path = save_dictionary(tmp_path / "new.safetensors", d)
    header = read_header(path)
    meta = json.loads(header["meta"])
    assert "whitening" not in meta and "seed" not in meta and "batch_size" not in meta
    assert meta["train_settings"]["whiten"] == {
        "controls": "well_type=negative_control",
        "by": "plate",
        "within": None,
        "mode": "pca",
        "n_components": 8,
        "eps": 1e-5,
        "shrinkage": "auto",
    }
    assert "params" not in json.loads(header["whitener"])  # the settings give them
    again = load_dictionary(path)
    assert again.meta == OLD_META
    assert again.whitener.get_params() == d.whitener.get_params()
    tokens, table, codes = _old_tokens()
    np.testing.assert_array_equal(again.encode_table(tokens, table).toarray(), codes)


def test_unknown_keys_of_a_newer_file_are_kept(tmp_path):
    d = load_dictionary(OLD / "old_format.safetensors")
    newer = d.meta.to_dict()
    newer["families"] = {"threshold": 0.5}
    newer["train_settings"] = {**newer["train_settings"], "schedule": [4, 8, 24]}
    d.meta = DictionaryMeta.from_dict(newer)
    assert d.meta.extra == {
        "families": {"threshold": 0.5},
        "train_settings": {"schedule": [4, 8, 24]},
    }
    assert d.meta.train == OLD_META.train
    path = save_dictionary(tmp_path / "newer.safetensors", d)
    written = json.loads(read_header(path)["meta"])
    assert written["families"] == {"threshold": 0.5}
    assert written["train_settings"]["schedule"] == [4, 8, 24]
    assert load_dictionary(path).meta == d.meta


def test_hand_built_whitening_keeps_its_parameters(tmp_path):
    """Without training settings the whitener's own parameters are the one record."""
    d = load_dictionary(OLD / "old_format.safetensors")
    d.meta = d.meta.replace(train=None)
    path = save_dictionary(tmp_path / "bare.safetensors", d)
    assert json.loads(read_header(path)["whitener"])["params"]["eps"] == 1e-5
    again = load_dictionary(path)
    assert again.meta.whitening is None and again.whitener.get_params() == d.whitener.get_params()
    tokens, table, codes = _old_tokens()
    np.testing.assert_array_equal(again.encode_table(tokens, table).toarray(), codes)


def test_meta_is_frozen_and_bad_training_settings_are_named():
    with pytest.raises(AttributeError):
        OLD_META.block = 4  # type: ignore[misc]
    assert OLD_META.replace(block=4).block == 4 and OLD_META.block == 3
    bad = {**OLD_META.to_dict(), "train_settings": {"atoms": 0}}
    with pytest.raises(DictionaryError, match="training settings.*atoms: must be at least 1"):
        DictionaryMeta.from_dict(bad)
