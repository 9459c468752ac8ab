"""The compiled bf16 attention kernel against torch's SDPA, its fallback, and its use in the ViT.

Kernel tests run where the CPU has AVX512-BF16 and a C++ compiler is found (they are skipped
elsewhere, where the SDPA fallback is what runs and is tested instead).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_concept_discovery.models import cpu_bf16, load_model
from napari_concept_discovery.models.cpu_bf16 import ENV, attention, bias_gelu, kernels_path

torch.set_num_threads(2)

needs_kernel = pytest.mark.skipif(
    cpu_bf16._library() is None, reason="no AVX512-BF16 or no C++ compiler here"
)


def _qkv(b, n, h, d, seed=0, joint=False):
    """bf16 q, k, v of shape (B, N, H, D); ``joint``: strided views of one projection output,
    as a ViT block hands them over."""
    g = torch.Generator().manual_seed(seed)
    if joint:
        y = torch.randn(b, n, 3 * h * d + 8, generator=g).bfloat16()
        return tuple(t.view(b, n, h, d) for t in y[..., 8:].split(h * d, dim=-1))
    return tuple(torch.randn(b, n, h, d, generator=g).bfloat16() for _ in range(3))


def _norms(d, seed):
    g = torch.Generator().manual_seed(seed)
    norms = []
    for _ in range(2):
        ln = torch.nn.LayerNorm(d)
        with torch.no_grad():
            ln.weight.normal_(1.0, 0.3, generator=g)
            ln.bias.normal_(0.0, 0.3, generator=g)
        norms.append(ln.bfloat16())
    return norms


def _reference(q, k, v, q_norm=None, k_norm=None):
    """fp32 math on the same bf16 inputs (norms in torch's bf16, as timm runs them)."""
    b, n, h, d = q.shape
    with torch.no_grad():
        q = q if q_norm is None else q_norm(q)
        k = k if k_norm is None else k_norm(k)
        out = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)))
    return out.transpose(1, 2).reshape(b, n, h * d)


SHAPES = [
    (1, 1, 1, 32),  # one token
    (2, 17, 3, 64),  # odd length, shorter than a key block
    (3, 2, 2, 64),
    (1, 255, 2, 64),  # one key short of a softmax chunk
    (1, 257, 6, 64),  # one past a chunk: the online softmax rescales
    (2, 100, 2, 96),  # head dim 96: a 64-wide and a 32-wide slab of V
    (1, 33, 1, 128),
    (1, 600, 1, 32),
]


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normed", [False, True])
def test_kernel_matches_fp32_sdpa(shape, normed):
    b, n, h, d = shape
    q, k, v = _qkv(*shape, seed=n + d, joint=normed)
    norms = _norms(d, seed=h) if normed else [None, None]
    got = attention(q, k, v, None, *norms)
    assert got.shape == (b, n, h * d) and got.dtype == torch.bfloat16
    ref = _reference(q, k, v, *norms)
    # bf16 output (8 bits of mantissa) and bf16 probabilities: ~1e-2 absolute at unit scale
    assert (got.float() - ref).abs().max() < 3e-2
    cos = F.cosine_similarity(got.float().reshape(-1, d), ref.reshape(-1, d), dim=-1)
    assert cos.min() > 0.9995
    # and about as close to fp32 as torch's own bf16 SDPA is
    with torch.no_grad():
        qn = q if norms[0] is None else norms[0](q)
        kn = k if norms[1] is None else norms[1](k)
        sdpa = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (qn, kn, v)))
    sdpa = sdpa.transpose(1, 2).reshape(b, n, h * d).float()
    assert (got.float() - ref).abs().mean() <= 1.5 * (sdpa - ref).abs().mean() + 1e-4


@needs_kernel
def test_scale_and_a_peaked_softmax():
    """A large scale makes each row's softmax nearly one-hot: the answer is v of the key with
    the largest score (here every query's own key, by construction)."""
    n, d = 40, 64
    g = torch.Generator().manual_seed(3)
    keys = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    q = keys.bfloat16().view(1, n, 1, d)
    v = torch.randn(1, n, 1, d, generator=g).bfloat16()
    got = attention(q, q, v, scale=200.0)
    np.testing.assert_allclose(got.float().view(n, d), v.float().view(n, d), atol=2e-2)


@needs_kernel
def test_strided_views_equal_contiguous_inputs():
    q, k, v = _qkv(2, 70, 3, 64, seed=5, joint=True)
    assert not q.is_contiguous()
    assert torch.equal(
        attention(q, k, v), attention(q.contiguous(), k.contiguous(), v.contiguous())
    )


def test_fallback_when_turned_off(monkeypatch):
    """With the kernels turned off, the answers are torch's (bf16 SDPA, add + GELU), bit for
    bit."""
    monkeypatch.setenv(ENV, "0")
    assert kernels_path() == f"torch SDPA ({ENV}=0)"
    q, k, v = _qkv(2, 50, 2, 64, seed=7)
    assert not cpu_bf16.kernel_usable(q, 64)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    assert torch.equal(attention(q, k, v), want.transpose(1, 2).reshape(2, 50, 128))
    bias = torch.ones(64, dtype=torch.bfloat16)
    assert torch.equal(bias_gelu(q[..., 0, :], bias), F.gelu(q[..., 0, :] + bias))


def test_fallback_when_the_kernel_cannot_be_built(monkeypatch, tmp_path):
    """No compiler (or a failing one): the reason is said and torch's ops run, nothing raises."""
    monkeypatch.setattr(cpu_bf16, "_STATE", {})
    monkeypatch.setattr(cpu_bf16, "_cache_dirs", lambda: [tmp_path / "kernels"])
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    path = kernels_path()
    assert path.startswith("torch SDPA (")
    if cpu_bf16._cpu_has_avx512_bf16():
        assert "compiling the kernel failed" in path and "no-such-g++" in path
    q, k, v = _qkv(1, 30, 2, 64, seed=4)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    assert torch.equal(attention(q, k, v), want.transpose(1, 2).reshape(1, 30, 128))
    assert not list((tmp_path / "kernels").glob("*.so"))  # no half-written library left


def test_fallback_for_fp32_odd_head_dims_and_gradients():
    q, k, v = _qkv(1, 20, 2, 48, seed=8)  # head dim 48: not a multiple of 32
    assert not cpu_bf16.kernel_usable(q, 48)
    ref = _reference(q, k, v)
    assert (attention(q, k, v).float() - ref).abs().max() < 3e-2
    qf, kf, vf = (t.float().requires_grad_() for t in _qkv(1, 9, 1, 64, seed=9))
    out = attention(qf, kf, vf)  # fp32 with gradients: SDPA, differentiable
    out.sum().backward()
    assert qf.grad is not None and torch.isfinite(qf.grad).all()
    with pytest.raises(ValueError, match="one shape"):
        attention(qf, kf[:, :5], vf)


@needs_kernel
def test_two_threads_at_once_give_the_sequential_answers():
    inputs = [_qkv(2, 300, 3, 64, seed=s, joint=True) for s in range(4)]
    norms = _norms(64, seed=1)
    want = [attention(*x, None, *norms) for x in inputs]
    got: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    start = threading.Barrier(2)

    def work(t):
        start.wait()
        for _rep in range(3):
            for i in range(t, len(inputs), 2):
                got[t].append((i, attention(*inputs[i], None, *norms)))

    threads = [threading.Thread(target=work, args=(t,)) for t in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sum(len(v) for v in got.values()) == 3 * len(inputs)
    for results in got.values():
        for i, out in results:
            assert torch.equal(out, want[i])


@needs_kernel
@pytest.mark.parametrize("cols", [1, 37, 1536])
def test_bias_gelu_matches_torch_on_a_slice(cols):
    g = torch.Generator().manual_seed(cols)
    y = (torch.randn(3, 50, cols + 20, generator=g) * 4).bfloat16()
    y[0, 0, :cols] = torch.linspace(-12, 12, cols)  # deep tails on both sides, and 0
    x = y[..., :cols]  # rows cols + 20 apart, as the MLP part of the joint projection
    bias = torch.randn(cols, generator=g).bfloat16()
    got = bias_gelu(x, bias)
    assert got.shape == x.shape and got.is_contiguous() and got.dtype == torch.bfloat16
    ref = F.gelu(x.float() + bias.float())
    # one rounding to bf16 (relative 2^-8) of an fp32 GELU good to ~1e-7
    assert ((got.float() - ref).abs() <= ref.abs() * 2**-8 + 1e-6).all()
    ref = F.gelu(x.float())  # no bias (torch's own bf16 GELU rounds its deep tails to 0)
    assert ((bias_gelu(x, None).float() - ref).abs() <= ref.abs() * 2**-8 + 1e-6).all()


@needs_kernel
def test_bundled_model_tokens_with_and_without_the_kernel(monkeypatch):
    """The bundled model in bf16: tokens with the kernel at cosine >= 0.999 to fp32, as with
    torch's SDPA; the kernel path is really taken (a different result from SDPA's)."""
    from napari_concept_discovery.embed.compute import with_precision

    backend = load_model("default", "cpu")
    bf16 = with_precision(backend, "bf16").model
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 5, 256, 256, generator=g)
    with torch.inference_mode():
        ref = backend.model.forward_tokens(x).float()
        kernel = bf16.forward_tokens(x).float()
        monkeypatch.setenv(ENV, "0")
        sdpa = bf16.forward_tokens(x).float()
    d = ref.shape[-1]
    for got in (kernel, sdpa):
        cos = F.cosine_similarity(got.reshape(-1, d), ref.reshape(-1, d), dim=-1)
        assert cos.min() >= 0.999
    assert not torch.equal(kernel, sdpa)
    cos_kernel = F.cosine_similarity(kernel.reshape(-1, d), ref.reshape(-1, d), dim=-1).mean()
    cos_sdpa = F.cosine_similarity(sdpa.reshape(-1, d), ref.reshape(-1, d), dim=-1).mean()
    assert cos_kernel >= cos_sdpa - 1e-4


@needs_kernel
def test_blocks_reusing_buffers_give_the_same_tokens():
    """A forward pass reuses the blocks' large intermediates from block to block: the tokens
    are those of blocks run one by one with fresh buffers, and a later forward does not change
    the tokens an earlier one returned."""
    from napari_concept_discovery.models import ChannelAgnosticViT

    torch.manual_seed(0)
    vit = ChannelAgnosticViT(embed_dim=128, depth=3, num_heads=2, max_channels=4).eval()
    with torch.no_grad():
        for blk in vit.blocks:
            blk.ls.gamma.fill_(1.0)
    vit = vit.to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    with torch.inference_mode():
        got = vit.forward_tokens(x1)
        kept = got.clone()
        t = vit.prepend_cls(vit.embed_patches(x1)[0])
        for blk in vit.blocks:  # outside a forward pass: every buffer fresh
            t = blk(t)
        vit.forward_tokens(x2)
    assert torch.equal(got, t)
    assert torch.equal(got, kept)


@needs_kernel
def test_timm_backend_runs_the_kernel_in_bf16(monkeypatch):
    """A timm ViT's plain Attention modules take the kernel in bf16: tokens at cosine >= 0.999
    to fp32, as with torch's SDPA, and not SDPA's tokens bit for bit (the kernel really ran)."""
    import warnings

    from napari_concept_discovery.embed.compute import with_precision
    from napari_concept_discovery.models.timm_vit import KernelAttention

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backend = load_model("timm:vit_tiny_patch16_224:random")
    assert all(type(blk.attn) is KernelAttention for blk in backend.model.blocks)
    bf16 = with_precision(backend, "bf16")
    x = torch.rand(1, 2, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = backend.tokens(x).float()
        kernel = bf16.tokens(x).float()
        monkeypatch.setenv(ENV, "0")
        sdpa = bf16.tokens(x).float()
    d = ref.shape[-1]
    for got in (kernel, sdpa):
        assert F.cosine_similarity(got.reshape(-1, d), ref.reshape(-1, d), dim=-1).min() >= 0.999
    assert not torch.equal(kernel, sdpa)
