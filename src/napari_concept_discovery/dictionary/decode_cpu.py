"""ICFL's reconstruction loss and its gradient on a CPU, as compiled kernels.

ICFL's codes come from a pursuit and carry no gradient, so a training step needs only
x_hat = b + sum_s v_s W[i_s], the loss mean ||x_hat - x||^2, and, going back, the atoms'
gradient: row W[i] collects v * (2/B)(x_hat - x) from every slot that chose atom i. Through
torch that is a gather (``embedding_bag``), three elementwise passes for the loss and their
backward, and a sparse matrix product for the scatter: 28-36 ms per step of 4,096 tokens at
D = 384 here, against 23-26 ms for these kernels (benchmarks/profile_icfl.py), with fewer
fresh (B, D) buffers. Both walks are bound by reading the chosen rows of W from the last-level
cache, not by arithmetic.

The scatter splits the atoms, not the tokens, between threads: every atom's sum runs over the
tokens in order whatever the thread count, so the gradient is the same to the bit.
"""

from __future__ import annotations

import numpy as np
import torch

from .pursuit_cpu import _compiled, _runs, _threaded


@_compiled
def _reconstruct(values, indices, atoms, bias, x, out, err, scale, lo, hi):
    """Rows lo:hi: out = bias + sum_s values[b, s] atoms[indices[b, s]], err = scale (out - x);
    returns the sum of the squared errors (before scaling) over those rows."""
    slots, d = values.shape[1], atoms.shape[1]
    total = 0.0  # the rows' sums add up in float64
    for b in range(lo, hi):
        o = out[b]
        for t in range(d):
            o[t] = bias[t]
        for s in range(slots):
            v = values[b, s]
            if v == 0:
                continue
            a = atoms[indices[b, s]]
            for t in range(d):
                o[t] += v * a[t]
        xb, eb = x[b], err[b]
        acc = scale - scale  # a zero of the arrays' type, so the sum vectorises
        for t in range(d):
            r = o[t] - xb[t]
            acc += r * r
            eb[t] = scale * r
        total += acc
    return total


@_compiled
def _scatter(values, indices, grad, out, lo, hi):
    """out[i] += values[b, s] * grad[b] for every slot (b, s) with lo <= indices[b, s] < hi."""
    n, slots = values.shape
    d = grad.shape[1]
    for b in range(n):
        g = grad[b]
        for s in range(slots):
            i = indices[b, s]
            v = values[b, s]
            if i < lo or i >= hi or v == 0:
                continue
            o = out[i]
            for t in range(d):
                o[t] += v * g[t]


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


class _FixedCodesLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, atoms, bias, values, indices):
        ctx.set_materialize_grads(False)  # no zero gradient for an x_hat the loss ignores
        b, d = x.shape
        w = _numpy(atoms)
        out = torch.empty(b, d, dtype=atoms.dtype)
        err = torch.empty(b, d, dtype=atoms.dtype)
        scale = w.dtype.type(2 / max(b, 1))
        args = (_numpy(values.to(atoms.dtype)), _numpy(indices), w, _numpy(bias))
        args += (_numpy(x.to(atoms.dtype)), out.numpy(), err.numpy(), scale)
        sums = _threaded(_reconstruct, _runs(b), *args)
        loss = torch.tensor(sum(sums) / max(b, 1), dtype=atoms.dtype)
        ctx.save_for_backward(err, values, indices)
        ctx.n_atoms = atoms.shape[0]
        return out, loss

    @staticmethod
    def backward(ctx, grad_out, grad_loss):
        err, values, indices = ctx.saved_tensors
        # d loss / d x_hat = (2/B)(x_hat - x) = err, times the loss's own gradient; x enters
        # only through the loss, x_hat's own gradient reaches the atoms and the bias alone
        from_loss = None if grad_loss is None else err * grad_loss
        grad = from_loss
        if grad_out is not None:
            grad = grad_out if grad is None else grad + grad_out
        if grad is None:
            return None, None, None, None, None
        grad_x = None
        if ctx.needs_input_grad[0] and from_loss is not None:
            grad_x = -from_loss
        grad_atoms = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_atoms = torch.zeros(ctx.n_atoms, grad.shape[1], dtype=grad.dtype)
            v, i = _numpy(values.to(grad.dtype)), _numpy(indices)
            _threaded(_scatter, _runs(ctx.n_atoms), v, i, _numpy(grad), grad_atoms.numpy())
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_x, grad_atoms, grad_bias, None, None


def fixed_codes_loss(x: torch.Tensor, codes, atoms: torch.Tensor, bias: torch.Tensor):
    """(x_hat, mean squared error per token) for codes held fixed, on CPU tensors.

    Gradients flow to ``atoms``, ``bias`` and ``x``, never to the codes (the caller's codes
    must not require one). x_hat is differentiable too, for callers that add terms on it.
    """
    if codes.values.requires_grad:
        raise ValueError("fixed_codes_loss: the codes must not require a gradient")
    if x.device.type != "cpu" or atoms.device.type != "cpu":
        raise ValueError("fixed_codes_loss runs on CPU tensors")
    return _FixedCodesLoss.apply(x, atoms, bias, codes.values, codes.indices)
