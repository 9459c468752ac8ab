"""Backends: channel-agnostic ViT, OpenPhenom-format loading, timm checkpoints, input scaling."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from napari_concept_discovery.errors import ModelError
from napari_concept_discovery.models import (
    ChannelAgnosticBackend,
    ChannelAgnosticViT,
    hash_file,
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


def test_hub_offline_message(tmp_path, monkeypatch):
    import huggingface_hub.constants as hfc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError) as err:
        load_model("nobody-here/uncached-model-for-test")
    msg = str(err.value)
    assert "HF_HUB_OFFLINE is set" in msg and "hf download" in msg


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
