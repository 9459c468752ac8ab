"""ICFL's compiled reconstruction loss (``decode_cpu``) and the huge-page buffers of its pursuit:
the same loss, reconstruction and gradients as autograd through torch's ops, the same bits on
any thread count, and buffers that are aligned, writable and unmapped when freed."""

from __future__ import annotations

import mmap

import numpy as np
import pytest
import torch

from napari_concept_discovery.dictionary import ICFL, ICFLConfig
from napari_concept_discovery.dictionary import base as B
from napari_concept_discovery.dictionary.base import Codes, sparse_decode
from napari_concept_discovery.dictionary.decode_cpu import fixed_codes_loss


def _case(dtype, n=200, m=300, d=48, slots=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(m, d, generator=g, dtype=dtype)
    bias = torch.randn(d, generator=g, dtype=dtype)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    values = torch.randn(n, slots, generator=g, dtype=dtype)
    indices = torch.randint(0, m, (n, slots), generator=g)
    values[0, 2] = 0  # an inactive slot
    indices[1, 3] = indices[1, 4]  # an atom chosen twice by one token: the slots add up
    return x, atoms, bias, Codes(values, indices)


def _reference(x, atoms, bias, codes, extra: bool):
    """Loss, x_hat and the gradients of atoms, bias and x through torch's own ops."""
    atoms, bias, x = (t.clone().requires_grad_() for t in (atoms, bias, x))
    x_hat = sparse_decode(codes, atoms) + bias
    loss = (x - x_hat).pow(2).sum(1).mean()
    total = loss + x_hat.sin().sum() if extra else loss
    total.backward()
    return loss.detach(), x_hat.detach(), atoms.grad, bias.grad, x.grad


def _ours(x, atoms, bias, codes, extra: bool):
    atoms, bias, x = (t.clone().requires_grad_() for t in (atoms, bias, x))
    x_hat, loss = fixed_codes_loss(x, codes, atoms, bias)
    total = loss + x_hat.sin().sum() if extra else loss
    total.backward()
    return loss.detach(), x_hat.detach(), atoms.grad, bias.grad, x.grad


@pytest.mark.parametrize(
    "dtype,extra,tol,seed",
    [
        (torch.float64, False, 1e-12, 0),
        (torch.float64, True, 1e-12, 0),
        (torch.float32, False, 1e-5, 1),
    ],
    ids=["float64 loss", "float64 loss+term on x_hat", "float32 loss"],
)
def test_equals_autograd_through_torch(dtype, extra, tol, seed):
    """Same loss, reconstruction and gradients (atoms, bias, tokens) as autograd through
    ``sparse_decode`` and the squared error: to 1e-12 in float64, including a further term on
    x_hat (the gradient that arrives through x_hat adds to the loss's), and within rounding in
    float32."""
    case = _case(dtype, seed=seed)
    for ours, ref, name in zip(
        _ours(*case, extra),
        _reference(*case, extra),
        ["loss", "x_hat", "dW", "db", "dx"],
        strict=True,
    ):
        np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=tol, atol=tol, err_msg=name)


def test_tokens_of_another_dtype_get_their_gradient_in_their_dtype():
    """float64 tokens against float32 atoms: computed in the atoms' dtype, and the tokens'
    gradient comes back as float64, as autograd requires."""
    x, atoms, bias, codes = _case(torch.float32, seed=4)
    x64 = x.double().requires_grad_()
    x_hat, loss = fixed_codes_loss(x64, codes, atoms, bias)
    loss.backward()
    assert x_hat.dtype == torch.float32 and x64.grad.dtype == torch.float64
    ref = _reference(x, atoms, bias, codes, extra=False)[4]
    np.testing.assert_allclose(x64.grad.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)


def test_same_bits_on_one_and_two_threads():
    """The scatter splits atoms between threads, so every atom's sum keeps its order."""
    case = _case(torch.float32, n=1000, m=64, seed=2)  # many tokens per atom: order would show
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _ours(*case, False)
        torch.set_num_threads(2)
        two = _ours(*case, False)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


def test_refuses_codes_with_a_gradient_and_handles_an_empty_batch():
    x, atoms, bias, codes = _case(torch.float32)
    with pytest.raises(ValueError, match="codes must not require a gradient"):
        fixed_codes_loss(x, Codes(codes.values.requires_grad_(), codes.indices), atoms, bias)
    empty = Codes(torch.zeros(0, 7), torch.zeros(0, 7, dtype=torch.long))
    w = atoms.clone().requires_grad_()
    x_hat, loss = fixed_codes_loss(x[:0], empty, w, bias)
    loss.backward()
    assert (
        x_hat.shape == (0, x.shape[1])
        and float(loss.detach()) == 0
        and float(w.grad.abs().sum()) == 0
    )


def test_icfl_training_step_takes_it_with_the_same_loss_and_gradient():
    """ICFL's forward on a CPU goes through the compiled loss: its loss and the atoms' gradient
    equal decoding the same codes with torch."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 32, generator=g, dtype=torch.float64)
    model = ICFL(32, ICFLConfig(n_atoms=128, n_iter=3, n_pick=2), seed=0).double().train()
    out = model(x)
    out.loss.backward()
    ref = _reference(x, model.W.detach(), model.b.detach(), out.codes, extra=False)
    np.testing.assert_allclose(float(out.loss), float(ref[0]), rtol=1e-12)
    np.testing.assert_allclose(model.W.grad.numpy(), ref[2].numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(model.b.grad.numpy(), ref[3].numpy(), rtol=1e-10, atol=1e-12)


def _huge_page_eligible(address: int) -> bool:
    """Whether the kernel may back the mapping holding ``address`` with huge pages."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "THPeligible:":
                return line.split()[1] == "1"
    return False


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no madvise(MADV_HUGEPAGE) here")
def test_huge_buffer_is_aligned_advised_and_owned_by_torch():
    like = torch.empty(0, dtype=torch.float32)
    t = B.huge_empty(3 * B.HUGE_PAGE // 4 + 5, like)
    assert t.dtype == torch.float32 and t.numel() == 3 * B.HUGE_PAGE // 4 + 5
    assert t.data_ptr() % B.HUGE_PAGE == 0
    t.fill_(2.5)
    assert float(t.sum()) == 2.5 * t.numel()
    mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    if "[never]" not in mode:
        assert _huge_page_eligible(t.data_ptr())
    # torch's allocator owns the memory (a frombuffer/from_numpy storage cannot be resized):
    # freeing it never re-enters Python, whichever thread drops it (test_thread_teardown.py)
    assert t.untyped_storage().resizable()


def test_small_buffers_and_systems_without_madvise_get_ordinary_tensors(monkeypatch):
    like = torch.empty(0, dtype=torch.float64)
    small = B.huge_empty(100, like)
    assert small.dtype == torch.float64 and small.numel() == 100
    monkeypatch.delattr(mmap, "MADV_HUGEPAGE", raising=False)
    big = B.huge_empty(B.HUGE_PAGE, like)
    assert big.numel() == B.HUGE_PAGE and big.dtype == torch.float64
    ws: dict = {}
    buf = B.workspace_buffer(ws, "g", (512, 1024), like, huge=True)
    assert buf.shape == (512, 1024) and B.workspace_buffer(ws, "g", (8, 8), like).data_ptr() == (
        buf.data_ptr()
    )
