"""Backends: channel-agnostic ViT, OpenPhenom-format loading, timm checkpoints, input scaling,
the source registry (every source form round trips through ``Backend.source``) and the one block
rule."""

from __future__ import annotations

import json
import pickle
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from napari_concept_discovery import cli
from napari_concept_discovery._files import hash_file
from napari_concept_discovery.errors import ModelError
from napari_concept_discovery.models import (
    OPENPHENOM_REPO,
    ChannelAgnosticBackend,
    ChannelAgnosticViT,
    TimmViTBackend,
    intermediate_block,
    list_models,
    load_model,
    load_openphenom,
    load_timm_checkpoint,
    read_state_dict,
    scale_to_unit,
    sincos_2d,
    sniff_format,
)

torch.set_num_threads(2)

# OpenPhenom's encoder: ViT-S/16, 384 wide, 12 blocks, 6 heads, 11 channel slots.
OPENPHENOM_ARCH = dict(embed_dim=384, depth=12, num_heads=6, max_channels=11)
PREFIX = "encoder.vit_backbone."


@pytest.fixture(scope="module")
def phenom_like():
    torch.manual_seed(1)
    model = ChannelAgnosticViT(**OPENPHENOM_ARCH).eval()
    with torch.no_grad():  # LayerScale 1e-4 would hide wrongly loaded blocks: make them count
        for blk in model.blocks:
            blk.ls.gamma.uniform_(0.5, 1.0)
    x = torch.rand(1, 2, 256, 256)
    with torch.inference_mode():
        ref = model.forward_features(x)
    return model, x, ref


def _hub_state(model) -> dict[str, torch.Tensor]:
    """The model's weights under OpenPhenom's key names, plus decoder keys to be ignored."""
    state = {PREFIX + k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    state["decoder.blocks.0.norm1.weight"] = torch.ones(512)
    state["encoder_decoder_proj.weight"] = torch.zeros(512, 384)
    state["decoder_pred.weight"] = torch.zeros(256, 512)
    return state


def _write_repo(folder, state, fmt: str):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "MAE",
                "architectures": ["MAEModel"],
                "encoder": {"max_in_chans": 11, "vit_backbone": {"img_size": 256}},
            }
        )
    )
    path = folder / "model.safetensors"  # the hub's name, whatever the real format
    if fmt == "torch-zip":
        torch.save({"state_dict": state, "epoch": 1}, path)
    else:
        save_file(state, str(path))
    return path


@pytest.mark.parametrize("fmt", ["torch-zip", "safetensors"])
def test_openphenom_folder_loads_to_identical_outputs(tmp_path, phenom_like, fmt):
    model, x, ref = phenom_like
    path = _write_repo(tmp_path / "OpenPhenom", _hub_state(model), fmt)
    assert sniff_format(path) == fmt
    backend = load_model(tmp_path / "OpenPhenom", device="cpu")
    assert isinstance(backend, ChannelAgnosticBackend)
    assert (
        backend.embed_dim,
        backend.num_blocks,
        backend.patch_size,
        backend.tile_size,
        backend.max_channels,
    ) == (384, 12, 16, 256, 11)
    assert backend.weights_hash == hash_file(path)
    with torch.inference_mode():
        out = backend.model.forward_features(x)
        tok = backend.tokens(x, -1)
    assert torch.equal(out, ref)
    assert tok.shape == (1, 2, 256, 384)
    assert torch.equal(tok.reshape(1, 512, 384), ref[:, 1:])


def test_openphenom_bad_keys_are_named(tmp_path, phenom_like):
    model, _, _ = phenom_like
    state = _hub_state(model)
    del state[PREFIX + "blocks.5.in_proj.weight"]
    state[PREFIX + "blocks.2.q_norm.weight"] = torch.ones(32)
    state[PREFIX + "blocks.3.extra"] = torch.ones(3)
    _write_repo(tmp_path / "bad", state, "safetensors")
    with pytest.raises(ModelError) as err:
        load_openphenom(tmp_path / "bad")
    msg = str(err.value)
    assert "missing keys: blocks.5.in_proj.weight" in msg
    assert "blocks.2.q_norm.weight: file (32,), model (64,)" in msg
    assert "unexpected keys: blocks.3.extra" in msg


def test_not_openphenom_keys(tmp_path):
    save_file({"foo.weight": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelError, match="no keys under 'encoder.vit_backbone.'"):
        load_openphenom(tmp_path)


def test_pickles_are_loaded_without_code(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"w": torch.ones(1), "x": _Evil()}, f)
    assert sniff_format(path) == "pickle"
    with pytest.raises(ModelError, match="weights_only=True"):
        read_state_dict(path)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def _tiny(depth=3, channels=6):
    torch.manual_seed(0)
    m = ChannelAgnosticViT(embed_dim=64, depth=depth, num_heads=2, max_channels=channels).eval()
    with torch.no_grad():
        for blk in m.blocks:
            blk.ls.gamma.fill_(1.0)
    return m


def test_tokens_stop_after_block():
    m = _tiny(depth=3)
    backend = ChannelAgnosticBackend(m, model_id="tiny", weights_hash="-")
    calls = []
    for i, blk in enumerate(m.blocks):
        blk.register_forward_hook(lambda mod, inp, out, i=i: calls.append(i))
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        t1 = backend.tokens(x, 1)
        assert calls == [0, 1]
        full = m.forward_tokens(x, None)
    assert t1.shape == (2, 3, 16, 64)
    with torch.inference_mode():
        manual = m.prepend_cls(m.embed_patches(x)[0])
        for blk in m.blocks[:2]:
            manual = blk(manual)
    assert torch.allclose(t1.reshape(2, 48, 64), manual[:, 1:], atol=1e-6)
    assert not torch.allclose(full[:, 1:], manual[:, 1:])
    with pytest.raises(ModelError, match="out of range"):
        backend.tokens(x, 3)


def test_channel_agnostic_and_channel_major():
    m = _tiny()
    backend = ChannelAgnosticBackend(m, model_id="tiny", weights_hash="-")
    x = torch.rand(1, 3, 32, 48)
    with torch.inference_mode():
        a = backend.tokens(x, -1)
        b = backend.tokens(x[:, [2, 0, 1]], -1)
        one = backend.tokens(x[:, :1], -1)
    # No channel embedding: permuting channels permutes their tokens and nothing else.
    assert torch.allclose(b, a[:, [2, 0, 1]], atol=1e-5)
    assert a.shape == (1, 3, 6, 64) and one.shape == (1, 1, 6, 64)
    with pytest.raises(ModelError, match="at most 6 channels"):
        backend.tokens(torch.rand(1, 7, 32, 32), 0)


def test_sincos_positions_any_grid():
    full = sincos_2d(16, 16, 64)
    crop = sincos_2d(8, 8, 64)
    assert full.shape == (256, 64)
    # A crop's grid is the top-left corner of the tile's grid.
    assert torch.allclose(full.reshape(16, 16, 64)[:8, :8].reshape(64, 64), crop)
    m = _tiny()
    assert torch.allclose(m.pos_embed[0, 0], torch.zeros(64))
    assert torch.allclose(m.pos_embed[0, 1:257], sincos_2d(16, 16, 64))
    assert torch.allclose(m.pos_embed[0, 257:513], sincos_2d(16, 16, 64))


def test_standardisation_uint8_and_uint16():
    rng = np.random.default_rng(0)
    a8 = rng.integers(0, 256, (2, 32, 32), dtype=np.uint8)
    assert np.allclose(scale_to_unit(a8), a8 / 255.0)
    a16 = rng.integers(0, 4096, (2, 32, 32)).astype(np.uint16)  # 12-bit data in 16 bits
    s = scale_to_unit(a16)
    assert np.allclose(s.reshape(2, -1).max(1), 1.0)
    assert np.allclose(scale_to_unit(np.zeros((1, 4, 4), np.uint16)), 0.0)
    # 12-bit data gives the same model input as the same image stretched over 16 bits; dividing
    # by 65535 instead would leave it so dim that the variance floor (1e-5) changes the tokens.
    stretched = scale_to_unit((a16 * 16).astype(np.uint16))
    assert np.allclose(s, stretched, atol=1e-6)
    m = _tiny()
    naive = a16.astype(np.float32) / 65535
    with torch.inference_mode():
        t = m.forward_tokens(torch.from_numpy(np.stack([s, stretched, naive])), 0)
    assert torch.allclose(t[0], t[1], atol=1e-4)
    assert not torch.allclose(t[0], t[2], atol=1e-2)


def test_timm_checkpoint_per_channel_rule(tmp_path):
    torch.manual_seed(0)
    backend = load_timm_checkpoint(None, "vit_tiny_patch16_224", model_args={"depth": 2})
    assert backend.tile_size == 256 and backend.embed_dim == 192
    path = tmp_path / "tiny.pth"
    torch.save(backend.model.state_dict(), path)
    loaded = load_timm_checkpoint(path, "vit_tiny_patch16_224", model_args={"depth": 2})
    x = torch.rand(1, 2, 64, 64)
    with torch.inference_mode():
        t = loaded.tokens(x, -1)
        t0 = backend.tokens(x, -1)
        grey1 = backend.tokens(x[:, 1:2], -1)
    assert t.shape == (1, 2, 16, 192)
    assert torch.allclose(t, t0)
    assert torch.allclose(t[:, 1], grey1[:, 0], atol=1e-5)  # each channel alone, as grey RGB
    mean_rule = load_timm_checkpoint(
        path, "vit_tiny_patch16_224", model_args={"depth": 2}, channel_rule="mean"
    )
    with torch.inference_mode():
        assert mean_rule.tokens(x, 0).shape == (1, 1, 16, 192)
    ident = load_timm_checkpoint(
        path, "vit_tiny_patch16_224", model_args={"depth": 2}, channel_rule="identity"
    )
    with pytest.raises(ModelError, match="exactly 3 channels"):
        ident.tokens(x, 0)
    # timm's hub layout: config.json names the architecture, weights beside it.
    repo = tmp_path / "timm_repo"
    repo.mkdir()
    (repo / "config.json").write_text(
        json.dumps({"architecture": "vit_tiny_patch16_224", "model_args": {"depth": 2}})
    )
    save_file(
        {k: v.contiguous() for k, v in backend.model.state_dict().items()},
        str(repo / "model.safetensors"),
    )
    from_folder = load_model(repo, device="cpu")
    with torch.inference_mode():
        assert torch.allclose(from_folder.tokens(x, -1), t0)


# --- the source registry: every form round trips through Backend.source ----------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TINY_TIMM = {"architecture": "vit_tiny_patch16_224", "model_args": {"depth": 2}}


def _load_quietly(source, **kw):
    """load_model with every warning an error: loading a model must not talk to the user."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_model(source, device="cpu", **kw)


def _same_backend(a, b, channels: int = 2) -> None:
    assert (a.weights_hash, a.model_id, a.source) == (b.weights_hash, b.model_id, b.source)
    x = torch.rand(1, channels, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert torch.equal(a.tokens(x), b.tokens(x))


def _tiny_phenom_folder(folder, seed: int = 5):
    """An OpenPhenom-layout folder (config.json + model.safetensors under the hub's key names)
    holding a small channel-agnostic ViT, and that ViT."""
    torch.manual_seed(seed)
    m = ChannelAgnosticViT(embed_dim=64, depth=3, num_heads=2, max_channels=4).eval()
    state = {PREFIX + k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}
    state["decoder_pred.weight"] = torch.zeros(8, 8)
    return _write_repo(folder, state, "safetensors"), m


def _hf_cache(cache, repo_id: str, commit: str = COMMIT):
    """A repository snapshot laid out as huggingface_hub's cache keeps it (refs/main names the
    commit, snapshots/<commit>/ holds the files); returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    return snap


def _timm_repo(folder, config=TINY_TIMM):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    b = load_timm_checkpoint(None, config["architecture"], model_args=config.get("model_args"))
    state = {k: v.contiguous() for k, v in b.model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    return b


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty hub cache in tmp_path, read offline: nothing here can reach the network."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_default_source_round_trips():
    a = _load_quietly("default")
    assert a.source == "default" and a.model_id == "default"
    _same_backend(a, _load_quietly(a.source))


def test_folder_and_file_sources_round_trip(tmp_path):
    weights, m = _tiny_phenom_folder(tmp_path / "phenom")
    by_folder = _load_quietly(tmp_path / "phenom")
    assert by_folder.source == str((tmp_path / "phenom").resolve())
    assert by_folder.weights_hash == hash_file(weights)
    _same_backend(by_folder, _load_quietly(by_folder.source))
    by_file = _load_quietly(str(weights))
    assert by_file.source == str(weights.resolve()) and by_file.weights_hash == hash_file(weights)
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(by_file.tokens(x, -1), by_folder.tokens(x, -1))
        ref = m.forward_tokens(x, -1)[:, 1:]
    assert torch.equal(by_folder.tokens(x, -1).reshape(ref.shape), ref)
    # A timm checkpoint file needs its architecture; the source keeps it as an option.
    tb = load_timm_checkpoint(None, "vit_tiny_patch16_224")
    path = tmp_path / "tiny.pth"
    torch.save(tb.model.state_dict(), path, _use_new_zipfile_serialization=False, pickle_protocol=3)
    timm_file = _load_quietly(path, arch="vit_tiny_patch16_224")
    assert timm_file.source == f"{path.resolve()}?arch=vit_tiny_patch16_224"
    _same_backend(timm_file, _load_quietly(timm_file.source))
    assert timm_file.weights_hash == hash_file(path)


def test_hf_hub_source_from_the_local_cache(tmp_path, offline_cache):
    snap = _hf_cache(offline_cache, OPENPHENOM_REPO)
    weights, _ = _tiny_phenom_folder(snap)
    by_path = _load_quietly(snap)
    pinned = f"hf-hub:{OPENPHENOM_REPO}@{COMMIT}"
    for source in ("openphenom", f"hf-hub:{OPENPHENOM_REPO}", OPENPHENOM_REPO, pinned):
        b = _load_quietly(source)
        assert b.source == pinned, source
        assert b.model_id == OPENPHENOM_REPO
        assert b.weights_hash == by_path.weights_hash == hash_file(weights)
        assert b.default_block == intermediate_block(3) == 1
    _same_backend(b, _load_quietly(b.source))
    # Any other repository in the cache, here in timm's layout, with a channel rule.
    _timm_repo(_hf_cache(offline_cache, "someone/tiny-vit"))
    t = _load_quietly("hf-hub:someone/tiny-vit?channel_rule=mean")
    assert t.source == f"hf-hub:someone/tiny-vit@{COMMIT}?channel_rule=mean"
    assert isinstance(t, TimmViTBackend) and t.channel_rule == "mean"
    _same_backend(t, _load_quietly(t.source))


def test_hf_hub_offline_messages(offline_cache):
    with pytest.raises(ModelError) as err:
        load_model("nobody-here/uncached-model")
    msg = str(err.value)
    assert "read as hf-hub:nobody-here/uncached-model" in msg
    assert "HF_HUB_OFFLINE is set" in msg and "hf download nobody-here/uncached-model" in msg
    with pytest.raises(ModelError, match="not in the local cache"):
        load_model(f"hf-hub:{OPENPHENOM_REPO}@{COMMIT}")


def test_timm_sources(offline_cache):
    rng = torch.get_rng_state()
    a = _load_quietly("timm:vit_tiny_patch16_224:random")
    assert torch.equal(torch.get_rng_state(), rng)  # seeded without touching the global RNG
    assert a.source == "timm:vit_tiny_patch16_224:random" and a.num_blocks == 12
    _same_backend(a, _load_quietly(a.source))
    other = _load_quietly("timm:vit_tiny_patch16_224:random?seed=1")
    assert other.source == "timm:vit_tiny_patch16_224:random?seed=1"
    assert other.weights_hash != a.weights_hash
    assert _load_quietly(other.source).weights_hash == other.weights_hash
    # timm's pretrained weights come from the cache only, under the hub id timm's config names.
    with pytest.raises(ModelError) as err:
        load_model("timm:vit_tiny_patch16_224")
    assert "never download" in str(err.value) and "timm:vit_tiny_patch16_224:random" in str(
        err.value
    )
    hub_id = "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    snap = _hf_cache(offline_cache, hub_id)
    ref = _timm_repo(snap)
    p = _load_quietly("timm:vit_tiny_patch16_224", channel_rule="mean")
    assert p.source == "timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k?channel_rule=mean"
    assert p.num_blocks == 2 and p.channel_rule == "mean"
    _same_backend(p, _load_quietly(p.source))
    assert p.weights_hash == hash_file(snap / "model.safetensors")
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        ref_mean = TimmViTBackend(ref.model, model_id="r", weights_hash="-", channel_rule="mean")
        assert torch.allclose(p.tokens(x), ref_mean.tokens(x), atol=1e-6)
    with pytest.raises(ModelError, match="timm has no model 'no_such_vit'"):
        load_model("timm:no_such_vit:random")


def test_list_models_offers_default_openphenom_and_cached_vits(offline_cache):
    infos = {i.source: i for i in list_models()}
    assert infos["default"].available and infos["default"].name == "default"
    assert "synthetic" in infos["default"].description
    phenom = infos[f"hf-hub:{OPENPHENOM_REPO}"]
    assert phenom.name == "OpenPhenom" and not phenom.available
    assert list(infos) == ["default", f"hf-hub:{OPENPHENOM_REPO}"]

    _tiny_phenom_folder(_hf_cache(offline_cache, OPENPHENOM_REPO))
    _timm_repo(_hf_cache(offline_cache, "someone/tiny-vit"))
    not_vit = _hf_cache(offline_cache, "someone/resnet")
    (not_vit / "config.json").write_text(json.dumps({"architecture": "resnet18"}))
    (not_vit / "model.safetensors").write_bytes(b"")
    (offline_cache / "models--someone--partial").mkdir()  # no snapshot: not offered
    infos = {i.source: i for i in list_models()}
    assert list(infos) == ["default", f"hf-hub:{OPENPHENOM_REPO}", "hf-hub:someone/tiny-vit"]
    assert infos[f"hf-hub:{OPENPHENOM_REPO}"].available
    assert infos["hf-hub:someone/tiny-vit"].available
    assert "vit_tiny_patch16_224" in infos["hf-hub:someone/tiny-vit"].description
    for info in infos.values():  # every offered source loads as offered
        assert _load_quietly(info.source).weights_hash


@pytest.mark.parametrize(
    "source, why",
    [
        ("foo", "not a known model name"),
        ("gguf:some/model", "unknown scheme 'gguf'"),
        ("./missing/model.pt", "no file or folder './missing/model.pt' exists"),
        ("weights.safetensors", "no file or folder 'weights.safetensors' exists"),
        ("hf-hub:not a repo", "is not a hub repository id"),
        ("default?arch=vit_tiny_patch16_224", "arch applies to weights files and folders"),
        ("default?seed=2", "seed applies to timm:<name>:random only"),
        ("timm:vit_tiny_patch16_224:random?colour=red", "option 'colour=red' is not one of"),
    ],
)
def test_unknown_sources_list_the_accepted_forms(source, why):
    with pytest.raises(ModelError) as err:
        load_model(source)
    msg = str(err.value)
    assert why in msg and "Accepted forms" in msg
    for form in ("default", "openphenom", "hf-hub:<owner>/<name>", "timm:<name>:random", "<file>"):
        assert form in msg


def test_options_given_twice_must_agree():
    with pytest.raises(ModelError, match="channel_rule=mean but channel_rule=identity"):
        load_model("timm:vit_tiny_patch16_224:random?channel_rule=mean", channel_rule="identity")
    with pytest.raises(ModelError, match="unknown channel rule 'sum'"):
        load_model("timm:vit_tiny_patch16_224:random", channel_rule="sum")
    # A channel rule means nothing to a channel-agnostic model, so its source does not carry it.
    assert load_model("default", channel_rule="mean").source == "default"


def test_cli_models_lists_sources(offline_cache, capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["SOURCE", "OFFLINE", "DESCRIPTION"]
    assert lines[1].split()[:2] == ["default", "yes"]
    assert lines[2].split()[:2] == [f"hf-hub:{OPENPHENOM_REPO}", "no"]
    assert "timm:<name>:random" in out and "channel_rule=" in out


# --- one block rule ----------------------------------------------------------------------------


def test_block_rule_is_one_rule(tmp_path):
    bare = _tiny(depth=3)
    x = torch.rand(1, 2, 32, 32)
    with torch.inference_mode():
        assert torch.equal(bare.forward_tokens(x), bare.forward_features(x))  # default: last
    assert bare.resolve_block(None) == bare.resolve_block(-1) == 2
    backend = ChannelAgnosticBackend(bare, model_id="tiny", weights_hash="-", default_block=-2)
    assert backend.default_block == backend.resolve_block(None) == bare.resolve_block(None) == 1
    with torch.inference_mode():
        assert torch.equal(backend.tokens(x), backend.tokens(x, 1))
        assert torch.equal(backend.tokens(x).reshape(1, -1, 64), bare.forward_tokens(x)[:, 1:])
    for resolve in (backend.resolve_block, bare.resolve_block):
        assert resolve(-3) == 0
        with pytest.raises(ModelError, match=r"block 3 out of range: .* has 3 blocks"):
            resolve(3)
    # Defaults: the card's block; two thirds of the depth for a channel-agnostic ViT without a
    # card; the last block of a timm ViT.
    default = load_model("default", "cpu")
    card_block = default.card["default_block"]
    assert default.resolve_block(None) == default.model.resolve_block(None) == card_block
    path = tmp_path / "ca.safetensors"
    save_file({k: v.contiguous() for k, v in _tiny(depth=6).state_dict().items()}, str(path))
    ca = load_model(path, "cpu")
    assert ca.default_block == ca.model.default_block == intermediate_block(6) == 3
    assert load_model(path, "cpu", default_block=0).resolve_block(None) == 0
    timm_b = load_model("timm:vit_tiny_patch16_224:random", "cpu")
    assert timm_b.resolve_block(None) == 11


def test_pickle_protocol_note_is_not_shown(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False, pickle_protocol=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(read_state_dict(path)["w"], torch.ones(2))
    with warnings.catch_warnings(record=True) as seen:  # scoped: the process filters are untouched
        warnings.simplefilter("always")
        warnings.warn("Detected pickle protocol 9 elsewhere", UserWarning, stacklevel=1)
    assert len(seen) == 1
