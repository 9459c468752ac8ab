"""Faults at encoding: a store or a dictionary that yields codes that are
not finite is refused with a message naming the store, the dictionary file and the sites, and
nothing is written.

A NaN token can give ICFL no atom at all, so codes that are all zero and look sound: the tokens
are checked as they are read, as well as the codes.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import zarr

from fault_helpers import snapshot
from helpers import poison
from napari_concept_discovery.analysis.analyze import analyze_store
from napari_concept_discovery.analysis.encode import encode_store
from napari_concept_discovery.cli import main
from napari_concept_discovery.dictionary import (
    AnalyzeSettings,
    TrainSettings,
    load_dictionary,
    save_dictionary,
    train_on_store,
)
from napari_concept_discovery.embed.store import ActivationStore
from napari_concept_discovery.errors import DictionaryError

torch.set_num_threads(2)

TRAIN = dict(atoms=24, sparsity=4, steps=10, batch_size=64, seed=3)


@pytest.fixture(scope="module")
def dictionaries(tiny_store_path, tmp_path_factory):
    store = ActivationStore.open(tiny_store_path)
    folder = tmp_path_factory.mktemp("encode-faults")
    icfl = train_on_store(store, TrainSettings(**TRAIN, n_pick=2), out=folder / "icfl.safetensors")
    topk = train_on_store(
        store, TrainSettings(**TRAIN, method="topk"), out=folder / "topk.safetensors"
    )
    return {"icfl": icfl.path, "topk": topk.path}


def _poisoned_store(tiny_store_path, tmp_path, rows=(5, 6, -1)):
    """A copy of the tiny store with NaN or Inf in a few cell tokens; the rows' sites."""
    copy = tmp_path / "store"
    shutil.copytree(tiny_store_path, copy)
    n = zarr.open_array(str(copy / "cell" / "tokens"), mode="r").shape[0]
    rows = sorted(r % n for r in rows)
    for row, value in zip(rows, (np.nan, np.inf, np.nan), strict=False):
        poison(copy, row, value)
    table = ActivationStore.open(copy).table("cell")
    sites = table.iloc[rows][["plate", "well", "site"]].drop_duplicates()
    return copy, rows, sites


@pytest.mark.parametrize("method", ["icfl", "topk"])
def test_non_finite_tokens_are_refused_at_encoding(tiny_store_path, dictionaries, tmp_path, method):
    copy, rows, sites = _poisoned_store(tiny_store_path, tmp_path)
    store = ActivationStore.open(copy)
    d = load_dictionary(dictionaries[method])
    with pytest.raises(DictionaryError) as err:
        encode_store(store, d, batch_size=4)  # the bad rows fall in different batches
    msg = str(err.value)
    n = len(store.table("cell"))
    assert msg.startswith(f"3 of {n} cell tokens of the store at {copy} hold NaN or Inf")
    assert f"at {len(sites)} site(s): " in msg and str(dictionaries[method]) in msg
    for s in sites.itertuples(index=False):
        assert f"{s.plate} {s.well} {s.site}" in msg
    # the patch tokens of the same store are sound, and encode
    codes, _ = encode_store(store, d, "patch")
    assert np.isfinite(codes.data).all()


def test_analyze_refuses_non_finite_tokens_and_leaves_the_old_analysis(
    tiny_store_path, dictionaries, tmp_path, capsys
):
    copy, _, sites = _poisoned_store(tiny_store_path, tmp_path)
    out = tmp_path / "analysis"
    sound = ActivationStore.open(tiny_store_path)
    analyze_store(sound, load_dictionary(dictionaries["icfl"]), AnalyzeSettings(top_n=3), out)
    before = snapshot(out)
    argv = ["analyze", str(copy), str(dictionaries["icfl"]), "--out", str(out), "--top", "3"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "hold NaN or Inf" in err and str(copy) in err and "nothing is written" in err
    first = sites.iloc[0]
    assert f"{first.plate} {first.well} {first.site}" in err
    assert snapshot(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".analysis")]


def test_a_dictionary_that_overflows_is_refused_naming_its_file(
    tiny_store_path, dictionaries, tmp_path, capsys
):
    # finite tensors that overflow float32 on ordinary tokens: the file loads (nothing in it
    # is NaN), its codes would not be finite
    d = load_dictionary(dictionaries["topk"])
    with torch.no_grad():
        d.model.W_enc.copy_(torch.sign(d.model.W_enc) * 3e38)
    path = save_dictionary(tmp_path / "overflow.safetensors", d)
    loaded = load_dictionary(path)
    store = ActivationStore.open(tiny_store_path)
    n = len(store.table("cell"))
    with pytest.raises(DictionaryError) as err:
        encode_store(store, loaded)
    msg = str(err.value)
    assert msg.startswith(f"the dictionary {path} gives NaN or Inf codes for ")
    assert f" of {n} cell tokens of the store at {tiny_store_path}" in msg
    assert "although those tokens are finite" in msg
    out = tmp_path / "analysis"
    assert main(["analyze", str(tiny_store_path), str(path), "--out", str(out)]) == 2
    assert "gives NaN or Inf codes" in capsys.readouterr().err
    assert not out.exists()


def test_report_refuses_non_finite_tokens_by_name(tiny_store_path, dictionaries, tmp_path, capsys):
    """Report refuses a store with NaN or Inf tokens as analyze does (it gave a raw
    'Cannot cast array data' TypeError)."""
    copy, _, sites = _poisoned_store(tiny_store_path, tmp_path)
    out = tmp_path / "report"
    assert main(["report", str(copy), str(dictionaries["icfl"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    n = len(ActivationStore.open(copy).table("cell"))
    said = [line for line in err if line.startswith("error:")]  # after the progress lines
    assert len(said) == 1 and "Traceback" not in "\n".join(err)
    assert said[0].startswith(f"error: 3 of {n} cell tokens of the store at {copy} hold NaN")
    first = sites.iloc[0]
    assert f"{first.plate} {first.well} {first.site}" in said[0]
    assert not out.exists()


def test_one_site_is_encoded_by_the_store_encoder_and_refused_by_name(
    tiny_store_path, dictionaries, tmp_path
):
    """The explorer's site codes come from the store encoder's row range: equal to those rows of
    the whole store's codes, and a site holding a NaN token is refused naming that site, while
    the sites beside it still encode."""
    from napari_concept_discovery.analysis.explore import Explorer
    from napari_concept_discovery.plate.model import SiteKey

    store = ActivationStore.open(tiny_store_path)
    d = load_dictionary(dictionaries["icfl"])
    whole, table = encode_store(store, d, batch_size=64)
    for key in [
        SiteKey(*k) for k in store.sites()[["plate", "well", "site"]].itertuples(index=False)
    ]:
        rows = store.site_rows("cell", key)
        part, part_table = encode_store(store, d, rows=rows, batch_size=64)
        # the same codes up to float32 rounding: the batches start at other rows, so the
        # whitening's products sum in another order
        np.testing.assert_allclose(part.toarray(), whole[rows].toarray(), rtol=1e-3, atol=1e-4)
        assert part_table.index[0] == 0
        assert part_table["label"].tolist() == table.iloc[rows]["label"].tolist()

    copy, rows, sites = _poisoned_store(tiny_store_path, tmp_path, rows=(5,))
    poisoned = ActivationStore.open(copy)
    bad = SiteKey(*sites.iloc[0])
    ex = Explorer(poisoned, d)
    with pytest.raises(DictionaryError) as err:
        ex.site(bad)
    assert f"{bad.well}" in str(err.value) and str(copy) in str(err.value)
    good = next(k for k in ex.keys() if k != bad)
    assert ex.site(good).cell_codes.shape[1] == d.n_atoms
