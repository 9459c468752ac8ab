"""Dictionary files: exact round trip, atomic writes, refusal to apply to the wrong activations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_concept_discovery import _files
from napari_concept_discovery.dictionary import (
    ICFL,
    ICFLConfig,
    TopKConfig,
    TopKSAE,
    TrainSettings,
    Whitener,
    build_model,
    load_dictionary,
    save_dictionary,
    train,
)
from napari_concept_discovery.dictionary.meta import DictionaryMeta
from napari_concept_discovery.errors import DictionaryError
from napari_concept_discovery.settings import SettingsError

META = {
    "unit": "cell",
    "model_id": "default-vit-s",
    "block": 7,
    "channel_names": ["DNA", "ER", "Actin"],
    "signature": "abc123",
    "metrics": {"fvu": 0.123456789012345, "dead_fraction": 0.0},
}


def _trained(method, tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((600, 10)).astype(np.float32) * 2 + 1
    plates = np.array(["P1", "P2"] * 300)
    w = Whitener(group_by="plate", n_components=8).fit(raw, plates)
    model = (
        ICFL(8, ICFLConfig(n_atoms=16, n_iter=2, n_pick=2))
        if method == "icfl"
        else TopKSAE(8, TopKConfig(n_atoms=16, k=3))
    )
    train(model, raw, steps=5, batch_size=100, whitener=w, groups=plates)
    return model, w, raw, plates


@pytest.mark.parametrize("method", ["icfl", "topk"])
def test_round_trip_is_exact(method, tmp_path):
    model, w, raw, plates = _trained(method, tmp_path)
    path = save_dictionary(tmp_path / "d.safetensors", model, w, META)
    loaded = load_dictionary(path)
    assert loaded.model.method == method and loaded.model.config == model.config
    for k, v in model.tensors().items():
        assert torch.equal(loaded.model.tensors()[k], v), k
    assert loaded.meta == DictionaryMeta.from_dict(META)
    assert {k: loaded.meta.to_dict()[k] for k in META} == META
    assert loaded.whitener.groups_ == w.groups_ and loaded.whitener.get_params() == w.get_params()
    np.testing.assert_array_equal(loaded.whitener.mean_, w.mean_)
    np.testing.assert_array_equal(loaded.whitener.transform_, w.transform_)
    loaded.check_compatible(model_id="default-vit-s", block=7, width=10)
    a = loaded.encode(raw, plates)
    model.eval()
    with torch.no_grad():
        from napari_concept_discovery.dictionary import codes_to_csr

        b = codes_to_csr(model.encode(torch.from_numpy(w.transform(raw, plates))), 16)
    assert (a != b).nnz == 0
    # saving what was loaded and loading again changes nothing
    again = load_dictionary(
        save_dictionary(tmp_path / "e.safetensors", loaded.model, loaded.whitener, loaded.meta)
    )
    for k, v in model.tensors().items():
        assert torch.equal(again.model.tensors()[k], v), k
    assert again.meta == loaded.meta and again.model.config == model.config


def test_config_json_round_trip_and_unknown_fields():
    cfg = ICFLConfig(n_atoms=64, n_iter=3, n_pick=2, pursuit="plain")
    assert ICFLConfig.from_json(cfg.to_json()) == cfg
    t = TopKConfig(k=7, lr=1e-3)
    assert TopKConfig.from_json(t.to_json()) == t
    with pytest.raises(DictionaryError, match="unknown topk config field"):
        TopKConfig.from_dict({"k": 3, "sparsity": 2})


def test_refuses_other_model_block_or_width(tmp_path):
    model, w, raw, plates = _trained("icfl", tmp_path)
    loaded = load_dictionary(save_dictionary(tmp_path / "d.safetensors", model, w, META))
    with pytest.raises(DictionaryError) as e:
        loaded.check_compatible(model_id="openphenom", block=7, width=10)
    msg = str(e.value)
    assert "'default-vit-s' block 7 (width 10" in msg and "'openphenom' block 7" in msg
    assert "model differ" in msg
    with pytest.raises(DictionaryError, match=r"block 7 .* block 5 .* block differ"):
        loaded.check_compatible(model_id="default-vit-s", block=5, width=10)
    with pytest.raises(DictionaryError, match=r"width 10.*\(width 384\); width differ"):
        loaded.encode(np.zeros((3, 384), np.float32))
    with pytest.raises(DictionaryError, match=r"takes \(N, 10\) activations; got shape \(10,\)"):
        loaded.encode(np.zeros(10, np.float32))


def test_writes_are_atomic(tmp_path, monkeypatch):
    model, w, *_ = _trained("topk", tmp_path)
    path = save_dictionary(tmp_path / "d.safetensors", model, w, META)
    before = path.read_bytes()

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(_files.os, "replace", fail)
    with torch.no_grad():
        model.W_dec.mul_(2)
    with pytest.raises(OSError, match="disk full"):
        save_dictionary(path, model, w, META)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors"]


def test_load_refuses_other_files(tmp_path):
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(3, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(DictionaryError, match="not a concept-discovery dictionary"):
        load_dictionary(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"nope")
    with pytest.raises(DictionaryError, match="not a readable safetensors file"):
        load_dictionary(tmp_path / "junk.safetensors")
    with pytest.raises(DictionaryError, match="no dictionary file"):
        load_dictionary(tmp_path / "missing.safetensors")


def test_checkpoints_written_during_training(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 6)).astype(np.float32)
    model = ICFL(6, ICFLConfig(n_atoms=8, n_iter=2, n_pick=1))
    ck = tmp_path / "ck.safetensors"
    seen, saved = [], []

    def checkpoint(m, step):
        saved.append(step)
        save_dictionary(ck, m, None, {"unit": "cell", "steps": step})

    def progress(p):
        if ck.exists():
            seen.append(load_dictionary(ck).meta.steps)

    train(
        model,
        x,
        steps=14,
        batch_size=50,
        on_checkpoint=checkpoint,
        checkpoint_every=4,
        progress=progress,
        progress_every=1,
    )
    assert saved == [4, 8, 12, 14]  # every 4 steps and after the last one
    assert 4 in seen and 8 in seen
    final = load_dictionary(ck)
    assert final.meta.steps == 14 and final.meta.unit == "cell"
    assert torch.equal(final.model.W, model.W.detach())
    saved.clear()
    train(model, x, steps=8, batch_size=50, on_checkpoint=checkpoint, checkpoint_every=4)
    assert saved == [4, 8]  # the last step's checkpoint is not written twice


def test_sparsity_one_rule_for_both_methods():
    def config(**kw):
        return TrainSettings(**kw).method_config()

    assert config(method="topk", atoms=128, sparsity=16) == {"n_atoms": 128, "k": 16}
    assert config(atoms=64, sparsity=8) == {"n_atoms": 64, "n_iter": 2, "n_pick": 4}
    assert config(atoms=64, n_iter=3, n_pick=2, lr=1e-2) == {
        "n_atoms": 64,
        "lr": 1e-2,
        "n_iter": 3,
        "n_pick": 2,
    }
    assert config(atoms=64)["n_iter"] * config(atoms=64)["n_pick"] == 32
    assert config(method="topk", atoms=64) == {"n_atoms": 64, "k": 32}
    with pytest.raises(SettingsError, match="sparsity: ICFL sparsity 6 must be a multiple of L"):
        config(atoms=64, sparsity=6)
    with pytest.raises(SettingsError, match="sparsity: 8 disagrees with J 3 x L 4"):
        config(atoms=64, sparsity=8, n_iter=3)
    with pytest.raises(SettingsError, match="ICFL settings"):
        config(method="topk", atoms=64, sparsity=8, n_pick=2)
    with pytest.raises(SettingsError, match=r"sparsity: TopK k \(40\) cannot exceed atoms \(16\)"):
        config(method="topk", atoms=16, sparsity=40)
    with pytest.raises(SettingsError, match=r"n_pick: L \(8\) cannot exceed atoms \(4\)"):
        config(atoms=4, n_pick=8)
    # the configs build models of exactly that shape
    model = build_model("icfl", 8, config(atoms=16, sparsity=6, n_pick=3))
    assert (model.config.n_iter, model.config.n_pick, model.n_atoms) == (2, 3, 16)
